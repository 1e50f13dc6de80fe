use super::*;
use crate::path::{canonical, is_unreserved};
use crate::rules::{MethodSet, OrganisationSource};
use proptest::prelude::*;
use regex::bytes::Regex;

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

/// Whether the filter's own matching takes the request (on the canonical form of its raw path).
fn rule_matches(r: &EventRule, method: &str, raw: &[u8]) -> bool {
    canonical(raw).is_ok_and(|path| r.matches_request(method, &path))
}

/// An RE2 regex as the `regex` crate's bytes regex: `\C` (any byte) becomes `(?s-u:.)`; the rest
/// of what the gate writes means the same in both (classes and `.` match whole UTF-8 characters).
fn bytes_regex(re2: &str) -> Regex {
    let mut out = String::new();
    let mut chars = re2.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('C') => out.push_str("(?s-u:.)"),
            Some(next) => {
                out.push('\\');
                out.push(next);
            }
            None => out.push('\\'),
        }
    }
    Regex::new(&format!("^(?:{out})$")).unwrap()
}

/// Evaluates a predicate the way Envoy does (single, and, or; exact or whole-string RE2) on the
/// raw header bytes.
fn admits(p: &Value, method: &str, path: &[u8]) -> bool {
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
        ":method" => method.as_bytes(),
        ":path" => path,
        other => panic!("unexpected header {other}"),
    };
    let m = &single["value_match"];
    if let Some(exact) = m["exact"].as_str() {
        return exact.as_bytes() == value;
    }
    bytes_regex(m["safe_regex"]["regex"].as_str().unwrap()).is_match(value)
}

#[test]
fn one_rule_is_methods_and_path() {
    let r = rule(&["POST", "PUT", "PATCH"], "/jobs/{jobId}/complete");
    let p = predicate(std::slice::from_ref(&r));
    assert_eq!(
        p["and_matcher"]["predicate"][1]["single_predicate"]["value_match"]["safe_regex"]["regex"],
        r"(?s)(?:/+jobs/+\C+/+complete/*(?:[?#]\C*)?|[^?#]*(?:%|;|/\.)\C*)"
    );
    for (method, path, gate, filter) in [
        ("POST", "/jobs/42/complete", true, true),
        ("PUT", "/jobs/42/complete?x=1&y=/2", true, true),
        ("PATCH", "/jobs/42/complete#frag", true, true),
        ("POST", "//jobs/42//complete/", true, true),
        ("POST", "/jobs/42/complet%65", true, true),
        ("POST", "/j%6fbs/42/complete", true, true),
        ("POST", "/jobs/./42/complete", true, true),
        ("POST", "/jobs/41/../42/complete", true, true),
        ("POST", "/jobs/42/complete;v=1", true, true),
        ("POST", "/jobs/42/complete?q=\u{ff}", true, true),
        ("GET", "/jobs/42/complete", false, false),
        ("POST", "/jobs/42/progress", false, false),
        ("POST", "/jobs//complete", false, false),
        ("POST", "/jobs/42/completed", false, false),
        ("POST", "/Jobs/42/complete", false, false),
        ("POST", "/v1/jobs/42/complete", false, false),
        // Admitted, but not a match: the gate is a superset.
        ("POST", "/jobs/4/2/complete", true, false),
        ("POST", "/jobs/42/completed%21", true, false),
    ] {
        assert_eq!(admits(&p, method, path.as_bytes()), gate, "{method} {path}");
        assert_eq!(
            rule_matches(&r, method, path.as_bytes()),
            filter,
            "{method} {path}"
        );
    }
    // Bytes that are not UTF-8: in a query, an event; in a capture, a bad path the filter counts.
    assert!(admits(&p, "POST", b"/jobs/42/complete?\xff"));
    assert!(rule_matches(&r, "POST", b"/jobs/42/complete?\xff"));
    assert!(admits(&p, "POST", b"/jobs/4\xff2/complete"));
}

#[test]
fn case_insensitive_rules_admit_every_case() {
    let mut r = rule(&["POST"], "/Jobs/{jobId}/complete");
    r.path = r.path.clone().with_case_insensitive(true);
    let p = predicate(std::slice::from_ref(&r));
    for path in ["/jobs/X/complete", "/JOBS/x/COMPLETE", "/jObS/X/Complete/"] {
        assert!(admits(&p, "POST", path.as_bytes()), "{path}");
        assert!(rule_matches(&r, "POST", path.as_bytes()), "{path}");
    }
    let sensitive = rule(&["POST"], "/Jobs/{jobId}/complete");
    let p = predicate(std::slice::from_ref(&sensitive));
    assert!(!admits(&p, "POST", b"/jobs/X/complete"));
    assert!(admits(&p, "POST", b"/Jobs/X/complete"));
}

#[test]
fn the_root_template_admits_the_root() {
    let r = rule(&["POST"], "/");
    let p = predicate(std::slice::from_ref(&r));
    for path in ["/", "//", "/?x", "/.", "/a/.."] {
        assert!(admits(&p, "POST", path.as_bytes()), "{path}");
        assert!(rule_matches(&r, "POST", path.as_bytes()), "{path}");
    }
    assert!(!admits(&p, "POST", b"/a"));
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
    assert!(admits(&p, "POST", b"/jobs/1/complete"));
    assert!(admits(&p, "DELETE", b"/orgs/o/jobs/1?force=1"));
    assert!(!admits(&p, "DELETE", b"/jobs/1/complete"));
    assert!(!admits(&p, "POST", b"/orgs/o/jobs/1"));
    // A single method is matched exactly.
    assert_eq!(
        predicate(&rules[2..])["and_matcher"]["predicate"][0]["single_predicate"]["value_match"],
        json!({"exact": "DELETE"})
    );
}

#[test]
fn literals_are_escaped() {
    let r = rule(&["POST"], "/a.b/(c)+/{x}/$d*|e");
    let p = predicate(std::slice::from_ref(&r));
    assert!(admits(&p, "POST", b"/a.b/(c)+/1/$d*|e"));
    assert!(!admits(&p, "POST", b"/aXb/(c)+/1/$d*|e"));
    assert!(!admits(&p, "POST", b"/a.b/cc/1/$d*|e"));
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

fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::option::weighted(0.7, segment()), 1..5).prop_map(|parts| {
        let mut text = String::new();
        for (i, p) in parts.iter().enumerate() {
            text.push('/');
            match p {
                Some(lit) => text.push_str(&lit.replace(['{', '}', '/', '?', '#'], "")),
                None => text.push_str(&format!("{{c{i}}}")),
            }
        }
        text
    })
}

/// Another spelling of a canonical segment, steered by `choices`: unreserved characters
/// percent-encoded (hex in either case), the hex of other escapes in lowercase, and when `fold`,
/// ASCII letters in the other case.
fn spell(segment: &str, choices: &[u8], fold: bool) -> String {
    let mut out = String::new();
    let mut rest = segment;
    let mut i = 0;
    while let Some(c) = rest.chars().next() {
        let choice = choices[i % choices.len()];
        i += 1;
        if c == '%' && rest.len() >= 3 {
            out.push('%');
            let hex = &rest[1..3];
            out.push_str(&if choice % 2 == 0 {
                hex.to_lowercase()
            } else {
                hex.to_string()
            });
            rest = &rest[3..];
            continue;
        }
        let c = if fold && choice % 5 == 1 {
            if c.is_ascii_lowercase() {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        } else {
            c
        };
        if c.is_ascii() && is_unreserved(c as u8) && choice % 3 == 0 {
            let hex = format!("{:02X}", c as u8);
            out.push('%');
            out.push_str(&if choice % 2 == 0 {
                hex.to_lowercase()
            } else {
                hex
            });
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

proptest! {
    /// The gate admits every request a rule matches: the template's paths (captures filled
    /// with any segment) in any of their spellings (escapes of unreserved characters in either
    /// hex case, merged and trailing slashes, dot segments, path parameters, a query or fragment,
    /// other letter cases when the rule is case-insensitive), and random paths near them.
    #[test]
    fn admits_every_request_a_rule_matches(
        text in template(),
        fold in any::<bool>(),
        methods in prop::sample::subsequence(crate::rules::KNOWN_METHODS.to_vec(), 1..4),
        fills in prop::collection::vec("[A-Za-z0-9_~!$&'()*+,=:@é-]{1,5}", 5),
        choices in prop::collection::vec(any::<u8>(), 8..32),
        tail in prop::option::of("[?#]\\PC{0,12}"),
        noise in "[/a-z0-9{}?#%.;]{0,12}",
        method in prop::sample::select(crate::rules::KNOWN_METHODS.to_vec()),
    ) {
        prop_assume!(PathTemplate::parse(&text).is_ok());
        let mut r = rule(&methods, &text);
        r.path = r.path.clone().with_case_insensitive(fold);
        let p = predicate(std::slice::from_ref(&r));
        let mut fill = fills.iter();
        let (mut plain, mut spelled) = (String::new(), String::new());
        for (i, part) in r.path.parts().enumerate() {
            let segment = part.unwrap_or_else(|| fill.next().unwrap());
            plain.push('/');
            plain.push_str(segment);
            let c = choices[i % choices.len()];
            spelled.push_str(["/", "//", "/./", "/x/../", "/%2e/", "/;a/"][usize::from(c % 6)]);
            spelled.push_str(&spell(segment, &choices[i..], fold && part.is_some()));
            if c % 7 == 0 {
                spelled.push_str(";v=1");
            }
        }
        if choices[0] % 2 == 0 || spelled.is_empty() {
            spelled.push('/');
        }
        if plain.is_empty() {
            plain.push('/');
        }
        let tail = tail.as_deref().unwrap_or("");
        for path in [plain.clone(), format!("{plain}{tail}"), format!("{spelled}{tail}")] {
            prop_assert!(rule_matches(&r, methods[0], path.as_bytes()), "{}", path);
            for m in &methods {
                prop_assert!(admits(&p, m, path.as_bytes()), "{} {} vs {}", m, path, p);
            }
        }
        for candidate in [format!("{spelled}{noise}"), noise.clone(), format!("/{noise}"), format!("{plain}/{noise}")] {
            if rule_matches(&r, method, candidate.as_bytes()) {
                prop_assert!(admits(&p, method, candidate.as_bytes()), "{} {}", method, candidate);
            }
        }
    }
}
