//! The Envoy-side gate: a matcher on `:method` and `:path` that lets only streams some rule could
//! match reach the filter, so that the rest of a service's traffic never enters the VM.
//!
//! It is a superset pre-filter built from the rules' methods and path templates: the filter keeps
//! its own exact matching ([`crate::rules::EventRule::matches_request`]), and the gate only has to
//! admit every request a rule matches. The predicate goes into an `ExtensionWithMatcher` that
//! wraps a `composite` filter whose `ExecuteFilterAction` holds the wasm filter (see
//! `envoy/envoy.yaml`); `webhook-emitter envoy-matcher` prints it for a configuration.

use crate::rules::{EventRule, PathTemplate};
use serde_json::{json, Value};

const HEADER_INPUT: &str = "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput";

/// The RE2 regex (matched whole, as Envoy's `safe_regex` does) of the paths a template matches:
/// each literal segment as is, each capture one non-empty segment, then any query or fragment.
pub fn path_regex(template: &PathTemplate) -> String {
    let mut regex = String::new();
    for part in template.parts() {
        regex.push('/');
        match part {
            Some(literal) => escape_into(&mut regex, literal),
            None => regex.push_str("[^/?#]+"),
        }
    }
    // (?s): a query may hold any byte, newlines included.
    format!("(?s){regex}(?:[?#].*)?")
}

/// The regex of a set of methods, or None for a single method (matched exactly instead).
fn methods_match(rule: &EventRule) -> Value {
    let names: Vec<&str> = rule.methods.names().collect();
    match names.as_slice() {
        [one] => json!({"exact": one}),
        many => regex_match(&many.join("|")),
    }
}

fn escape_into(out: &mut String, literal: &str) {
    for c in literal.chars() {
        // The metacharacters of RE2 (and of the `regex` crate); other punctuation is literal in
        // both, and escaping it is not (`\<` is a word boundary in one, unsupported in the other).
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
            out.push(c);
        } else if c.is_ascii_control() || c == ' ' {
            out.push_str(&format!("\\x{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
}

/// An `xds.type.matcher.v3.StringMatcher` by RE2 regex, which must match the whole value.
fn regex_match(regex: &str) -> Value {
    json!({"safe_regex": {"google_re2": {}, "regex": regex}})
}

fn header_predicate(header: &str, value_match: Value) -> Value {
    json!({"single_predicate": {
        "input": {"name": header, "typed_config": {"@type": HEADER_INPUT, "header_name": header}},
        "value_match": value_match,
    }})
}

/// The predicate of one rule: its methods and its path.
fn rule_predicate(rule: &EventRule) -> Value {
    json!({"and_matcher": {"predicate": [
        header_predicate(":method", methods_match(rule)),
        header_predicate(":path", regex_match(&path_regex(&rule.path))),
    ]}})
}

/// The gate's predicate (an `xds.type.matcher.v3.Matcher.MatcherList.Predicate`): true for every
/// request some rule can match. Rules with the same methods and path share one entry.
pub fn predicate(rules: &[EventRule]) -> Value {
    let mut each: Vec<Value> = Vec::new();
    for rule in rules {
        let p = rule_predicate(rule);
        if !each.contains(&p) {
            each.push(p);
        }
    }
    match each.len() {
        // Only for no rules at all, which a valid configuration never has: admit nothing.
        0 => header_predicate(":method", regex_match("[^\\s\\S]")),
        1 => each.remove(0),
        _ => json!({"or_matcher": {"predicate": each}}),
    }
}

/// The `xds_matcher` of the gate: `action` (an `ExecuteFilterAction` holding the wasm filter) for
/// the requests of [`predicate`], nothing for the others.
pub fn xds_matcher(rules: &[EventRule], action: Value) -> Value {
    json!({"matcher_list": {"matchers": [{
        "predicate": predicate(rules),
        "on_match": {"action": action},
    }]}})
}

// Native only: the regex crate (a native dev-dependency) evaluates the predicates.
#[cfg(test)]
#[cfg(not(target_arch = "wasm32"))]
mod tests {
    use super::*;
    use crate::rules::{MethodSet, OrganisationSource};
    use proptest::prelude::*;
    use regex::Regex;

    fn rule(methods: &[&str], path: &str) -> EventRule {
        let mut set = MethodSet::default();
        for m in methods {
            set.insert(MethodSet::bit(m).unwrap());
        }
        EventRule {
            event_type: "job.completed".into(),
            object_type: "job".into(),
            methods: set,
            path: PathTemplate::parse(path).unwrap(),
            statuses: vec![200],
            when: vec![],
            object_pointer: String::new(),
            organisation: OrganisationSource::Pointer("/org".into()),
            refetch: None,
        }
    }

    /// Evaluates a predicate the way Envoy does (single, and, or; exact or whole-string RE2),
    /// with the `regex` crate, whose syntax agrees with RE2 on what the gate writes.
    fn admits(p: &Value, method: &str, path: &str) -> bool {
        if let Some(all) = p
            .pointer("/and_matcher/predicate")
            .and_then(Value::as_array)
        {
            return all.iter().all(|q| admits(q, method, path));
        }
        if let Some(any) = p.pointer("/or_matcher/predicate").and_then(Value::as_array) {
            assert!(
                any.len() >= 2,
                "Envoy wants at least two predicates in an or_matcher"
            );
            return any.iter().any(|q| admits(q, method, path));
        }
        let single = &p["single_predicate"];
        let header = single["input"]["typed_config"]["header_name"]
            .as_str()
            .unwrap();
        assert_eq!(
            single["input"]["typed_config"]["@type"], HEADER_INPUT,
            "{p}"
        );
        let value = match header {
            ":method" => method,
            ":path" => path,
            other => panic!("unexpected header {other}"),
        };
        let m = &single["value_match"];
        if let Some(exact) = m["exact"].as_str() {
            return exact == value;
        }
        let re = m["safe_regex"]["regex"].as_str().unwrap();
        Regex::new(&format!("^(?:{re})$")).unwrap().is_match(value)
    }

    #[test]
    fn one_rule_is_methods_and_path() {
        let r = rule(&["POST", "PUT", "PATCH"], "/jobs/{jobId}/complete");
        let p = predicate(std::slice::from_ref(&r));
        assert_eq!(
            p["and_matcher"]["predicate"][1]["single_predicate"]["value_match"]["safe_regex"]
                ["regex"],
            "(?s)/jobs/[^/?#]+/complete(?:[?#].*)?"
        );
        for (method, path, want) in [
            ("POST", "/jobs/42/complete", true),
            ("PUT", "/jobs/42/complete?x=1&y=/2", true),
            ("PATCH", "/jobs/42/complete#frag", true),
            ("GET", "/jobs/42/complete", false),
            ("POST", "/jobs/42/progress", false),
            ("POST", "/jobs//complete", false),
            ("POST", "/jobs/4/2/complete", false),
            ("POST", "/jobs/42/complete/", false),
            ("POST", "/v1/jobs/42/complete", false),
        ] {
            assert_eq!(admits(&p, method, path), want, "{method} {path}");
            assert_eq!(r.matches_request(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn several_rules_are_or_and_duplicates_merge() {
        let rules = [
            rule(&["POST"], "/jobs/{jobId}/complete"),
            rule(&["POST"], "/jobs/{jobId}/complete"),
            rule(&["DELETE"], "/orgs/{org}/jobs/{id}"),
        ];
        let p = predicate(&rules);
        assert_eq!(p["or_matcher"]["predicate"].as_array().unwrap().len(), 2);
        assert!(admits(&p, "POST", "/jobs/1/complete"));
        assert!(admits(&p, "DELETE", "/orgs/o/jobs/1?force=1"));
        assert!(!admits(&p, "DELETE", "/jobs/1/complete"));
        assert!(!admits(&p, "POST", "/orgs/o/jobs/1"));
        // A single method is matched exactly.
        assert_eq!(
            predicate(&rules[2..])["and_matcher"]["predicate"][0]["single_predicate"]
                ["value_match"],
            json!({"exact": "DELETE"})
        );
    }

    #[test]
    fn literals_are_escaped() {
        let r = rule(&["POST"], "/a.b/(c)+/{x}/$d*|e");
        let p = predicate(std::slice::from_ref(&r));
        assert!(admits(&p, "POST", "/a.b/(c)+/1/$d*|e"));
        assert!(!admits(&p, "POST", "/aXb/(c)+/1/$d*|e"));
        assert!(!admits(&p, "POST", "/a.b/cc/1/$d*|e"));
    }

    #[test]
    fn the_matcher_wraps_the_action() {
        let rules = [rule(&["POST"], "/")];
        let m = xds_matcher(&rules, json!({"name": "a"}));
        assert_eq!(
            m["matcher_list"]["matchers"][0]["on_match"]["action"]["name"],
            "a"
        );
        assert_eq!(
            m["matcher_list"]["matchers"][0]["predicate"],
            predicate(&rules)
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9._~!$&'()*+,;=:@%-]{1,6}",
            "[a-zA-Z]{1,3}",
            "\\PC{1,3}",
        ]
    }

    fn template() -> impl Strategy<Value = (Vec<Option<String>>, String)> {
        prop::collection::vec(prop::option::weighted(0.7, segment()), 1..5).prop_map(|parts| {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                text.push('/');
                match p {
                    Some(lit) => text.push_str(&lit.replace(['{', '}', '/', '?', '#'], "")),
                    None => text.push_str(&format!("{{c{i}}}")),
                }
            }
            (parts, text)
        })
    }

    proptest! {
        /// The gate admits every request a rule matches: paths built from the template (captures
        /// filled with any segment, any query or fragment), and random paths near it.
        #[test]
        fn admits_every_request_a_rule_matches(
            (_, text) in template(),
            methods in prop::sample::subsequence(crate::rules::KNOWN_METHODS.to_vec(), 1..4),
            fills in prop::collection::vec("[^/?#]{1,5}", 5),
            tail in prop::option::of("[?#]\\PC{0,12}"),
            noise in "[/a-z0-9{}?#]{0,12}",
            method in prop::sample::select(crate::rules::KNOWN_METHODS.to_vec()),
        ) {
            prop_assume!(PathTemplate::parse(&text).is_ok());
            let r = rule(&methods, &text);
            let p = predicate(std::slice::from_ref(&r));
            let mut fill = fills.iter();
            let mut path = String::new();
            for part in r.path.parts() {
                path.push('/');
                path.push_str(part.unwrap_or_else(|| fill.next().unwrap()));
            }
            path.push_str(tail.as_deref().unwrap_or(""));
            prop_assert!(r.matches_request(methods[0], &path));
            for m in &methods {
                prop_assert!(admits(&p, m, &path), "{} {} vs {}", m, path, p);
            }
            for candidate in [format!("{path}{noise}"), noise.clone(), format!("/{noise}")] {
                if r.matches_request(method, &candidate) {
                    prop_assert!(admits(&p, method, &candidate), "{} {}", method, candidate);
                }
            }
        }
    }
}
