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

/// The RE2 regex (matched whole, as Envoy's `safe_regex` does) of the raw `:path`s whose
/// canonical form ([`crate::path::canonical`]) a template can match. Envoy's matcher sees the raw
/// path, so it admits two kinds:
/// - paths spelled canonically but for merged or trailing slashes: each literal segment as is
///   (without case when the rule says so), each capture one or more bytes, then any query or
///   fragment;
/// - every path that holds a `%`, a `;` or a segment starting with `.` before its query: its
///   escapes, path parameters or dot segments could make it any path, and telling would cost more
///   than the filter's own exact matching, which it only reaches for a rule's methods.
///
/// A capture and a query are `\C` (RE2's any byte), so that a capture or query that is not
/// UTF-8 still reaches the filter (a query is ignored; a bad capture is counted). Kept under
/// RE2's default program size limit (100) in Envoy for templates of a few segments.
pub fn path_regex(template: &PathTemplate) -> String {
    let mut spelled = String::new();
    for part in template.parts() {
        spelled.push_str("/+");
        match part {
            Some(literal) if template.is_case_insensitive() => {
                spelled.push_str("(?i:");
                escape_into(&mut spelled, literal);
                spelled.push(')');
            }
            Some(literal) => escape_into(&mut spelled, literal),
            None => spelled.push_str("\\C+"),
        }
    }
    spelled.push_str(if spelled.is_empty() { "/+" } else { "/*" });
    // (?s): a query may hold any byte, newlines included.
    format!("(?s)(?:{spelled}(?:[?#]\\C*)?|[^?#]*(?:%|;|/\\.)\\C*)")
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
mod tests;
