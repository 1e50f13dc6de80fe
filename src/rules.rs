//! Event rules: which responses become events, and what goes into them.
//!
//! Matching is split the way the data path needs it: the request line decides whether a stream
//! can be a candidate at all ([`EventRule::matches_request`]), the status narrows it
//! ([`EventRule::matches_status`]), and only then is the body parsed ([`EventRule::evaluate`]).

use crate::headers::{hex_preview, Lookup};
use crate::json::{Document, Object};
use crate::path::{self, BadPath};
use serde_json::Value;

/// `match.path`: literal segments and `{name}` captures of exactly one non-empty segment, matched
/// against a request's canonical path ([`crate::path::canonical`]). The template is canonical
/// too: its empty segments are dropped and its literals' escapes of unreserved characters decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    /// `match.caseInsensitive`: literals compare ASCII letters without case.
    case_insensitive: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Capture(String),
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| "must start with '/'".to_string())?;
        if template.contains(['?', '#']) {
            return Err(
                "must not contain a query or fragment (the query string is ignored when matching)"
                    .into(),
            );
        }
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        // Empty segments (`//`, a trailing `/`) are dropped, as in a request's canonical path.
        for part in rest.split('/').filter(|p| !p.is_empty()) {
            if let Some(inner) = part.strip_prefix('{') {
                let name = inner
                    .strip_suffix('}')
                    .ok_or_else(|| format!("segment {part:?} opens '{{' without closing it"))?;
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "capture {part:?} must be a name of letters, digits or '_'"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("capture {{{name}}} appears twice"));
                }
                names.push(name);
                segments.push(Segment::Capture(name.to_string()));
            } else if part.contains(['{', '}']) {
                return Err(format!(
                    "segment {part:?} must be a literal or a whole {{name}}"
                ));
            } else if part.contains(';') {
                return Err(format!(
                    "segment {part:?} must not contain ';': path parameters are ignored when matching (write %3B for a literal ';')"
                ));
            } else {
                let literal = path::canonical_segment(part).map_err(|e| match e {
                    BadPath::EscapedSlash => format!(
                        "segment {part:?} must not encode '/' or '\\' (%2F, %5C): such a request path never matches"
                    ),
                    BadPath::BadEscape | BadPath::NotUtf8 => {
                        format!("segment {part:?} has a '%' not followed by two hex digits")
                    }
                })?;
                if literal == "." || literal == ".." {
                    return Err(format!(
                        "segment {part:?} is a dot segment, which a request's canonical path never holds"
                    ));
                }
                segments.push(Segment::Literal(literal.into_owned()));
            }
        }
        Ok(PathTemplate {
            segments,
            case_insensitive: false,
        })
    }

    /// The same template, its literals compared with or without ASCII case.
    pub fn with_case_insensitive(mut self, case_insensitive: bool) -> Self {
        self.case_insensitive = case_insensitive;
        self
    }

    pub fn is_case_insensitive(&self) -> bool {
        self.case_insensitive
    }

    /// The segments in order (none for `/`): `Some(literal)`, or `None` for a capture.
    pub fn parts(&self) -> impl Iterator<Item = Option<&str>> {
        self.segments.iter().map(|s| match s {
            Segment::Literal(lit) => Some(lit.as_str()),
            Segment::Capture(_) => None,
        })
    }

    pub fn has_capture(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) if n == name))
    }

    /// Matches a canonical request path ([`crate::path::canonical`]).
    pub fn matches(&self, path: &str) -> bool {
        self.capture(path, "").is_some()
    }

    /// Matches a canonical path and returns the value of capture `name` (or `Some("")` when
    /// `name` is not a capture).
    pub fn capture<'p>(&self, path: &'p str, name: &str) -> Option<&'p str> {
        let mut parts = path.strip_prefix('/')?.split('/').filter(|p| !p.is_empty());
        let mut found = "";
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(lit) if lit == part => {}
                Segment::Literal(lit)
                    if self.case_insensitive && lit.eq_ignore_ascii_case(part) => {}
                Segment::Literal(_) => return None,
                Segment::Capture(n) => {
                    if n == name {
                        found = part;
                    }
                }
            }
        }
        parts.next().is_none().then_some(found)
    }
}

/// Checks RFC 6901 syntax: empty, or `/`-separated tokens where `~` is only `~0` or `~1`.
pub fn validate_json_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err("must be empty or start with '/' (an RFC 6901 JSON pointer)".into());
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err("'~' must be followed by 0 or 1 (an RFC 6901 JSON pointer)".into());
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Equals(Value),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub pointer: String,
    pub check: Check,
}

impl Condition {
    pub fn holds<'a>(&self, body: impl Into<Document<'a>>) -> bool {
        let found = body.into().pointer(&self.pointer);
        match &self.check {
            Check::Equals(expected) => found.and_then(|f| f.to_value()).as_ref() == Some(expected),
            Check::Exists(expected) => found.is_some() == *expected,
        }
    }
}

/// Where an event's organisation comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum OrganisationSource {
    /// A request header (lowercase name).
    Header(String),
    /// A JSON pointer into the response body; the value must be a string.
    Pointer(String),
    /// A `{name}` capture of the path template.
    PathParam(String),
}

/// HTTP methods as a bit set, so the request-time check is one AND.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MethodSet(u16);

pub const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

impl MethodSet {
    pub fn bit(method: &str) -> Option<u16> {
        KNOWN_METHODS
            .iter()
            .position(|m| *m == method)
            .map(|i| 1 << i)
    }
    pub fn insert(&mut self, bit: u16) {
        self.0 |= bit;
    }
    pub fn contains(&self, method: &str) -> bool {
        Self::bit(method).is_some_and(|b| self.0 & b != 0)
    }
    /// The methods in the set, in [`KNOWN_METHODS`] order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        KNOWN_METHODS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, m)| *m)
    }
}

/// One compiled rule of `events[]`.
#[derive(Debug, Clone)]
pub struct EventRule {
    pub event_type: String,
    pub object_type: String,
    pub methods: MethodSet,
    pub path: PathTemplate,
    pub statuses: Vec<u16>,
    pub when: Vec<Condition>,
    pub object_pointer: String,
    pub organisation: OrganisationSource,
    /// How to read the object again when the response was cut short (`refetch`).
    pub refetch: Option<RefetchSpec>,
}

/// A rule's `refetch`: the request that reads the object again.
#[derive(Debug, Clone, PartialEq)]
pub struct RefetchSpec {
    pub method: String,
    /// The path template; every capture is one of `match.path`'s.
    pub path: Vec<PathPart>,
    /// The cluster to send it to; None: the route's upstream cluster as Envoy reports it.
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathPart {
    Literal(String),
    Capture(String),
}

impl RefetchSpec {
    /// Parses `refetch.path` against the rule's `match.path` (whose captures fill it).
    pub fn parse_path(template: &str, matching: &PathTemplate) -> Result<Vec<PathPart>, String> {
        // Same syntax and canonical form as match.path, so the same errors.
        let parsed = PathTemplate::parse(template)?;
        // Canonicalising drops empty segments but never reorders captures: they come in the
        // template's order.
        let mut names = template
            .split('/')
            .filter_map(|part| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')));
        let mut parts = Vec::new();
        for part in parsed.parts() {
            match part {
                Some(literal) => parts.push(PathPart::Literal(literal.to_string())),
                None => {
                    let name = names.next().ok_or("a capture without a name")?;
                    if !matching.has_capture(name) {
                        return Err(format!(
                            "{{{name}}} is not a capture of match.path (refetch.path is filled from it)"
                        ));
                    }
                    parts.push(PathPart::Capture(name.to_string()));
                }
            }
        }
        Ok(parts)
    }

    /// The refetch path for a request `path` the rule matched, each capture percent-encoded
    /// where a path segment needs it. None if a capture is missing (the rule did not match).
    pub fn fill(&self, matching: &PathTemplate, path: &str) -> Option<String> {
        let mut out = String::new();
        for part in &self.path {
            out.push('/');
            match part {
                PathPart::Literal(lit) => out.push_str(lit),
                PathPart::Capture(name) => encode_segment(&mut out, matching.capture(path, name)?),
            }
        }
        Some(out)
    }
}

/// Copies a captured segment, percent-encoding what a path segment may not hold as is. `%` stays:
/// a capture keeps the escapes the client sent.
fn encode_segment(out: &mut String, segment: &str) {
    for b in segment.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// What the request told us, kept only for candidate streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestFacts {
    /// The organisation, when the rule takes it from a request header or a path capture.
    pub organisation: OrganisationFact,
}

/// The organisation as the request gave it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OrganisationFact {
    /// The rule takes it from the response body.
    #[default]
    FromBody,
    Missing,
    Value(String),
    /// The header's bytes are not UTF-8 (a short hex preview, for the log line).
    NotUtf8(String),
    /// The header appears more than once: which copy the upstream used is unknown.
    Repeated,
}

/// The result of a rule applied to a parsed response body.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluation<'a> {
    Matched {
        organisation_id: String,
        /// Borrowed from the body.
        object: Object<'a>,
    },
    ConditionsNotMet,
    NoOrganisation,
    /// The organisation header is not UTF-8 (a hex preview of its bytes).
    OrganisationNotUtf8(String),
    /// The organisation header appears more than once.
    OrganisationRepeated,
    ObjectNotFound,
    ObjectNotAnObject,
}

impl EventRule {
    /// `path` is the request's canonical path ([`crate::path::canonical`]).
    pub fn matches_request(&self, method: &str, path: &str) -> bool {
        self.methods.contains(method) && self.path.matches(path)
    }

    pub fn matches_status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }

    /// The request facts this rule needs; `header` looks a request header up (as bytes: a
    /// client may send anything).
    pub fn request_facts<'h>(
        &self,
        path: &str,
        header: impl FnOnce(&str) -> Lookup<'h>,
    ) -> RequestFacts {
        let organisation = match &self.organisation {
            OrganisationSource::Header(name) => match header(name) {
                Lookup::Absent => OrganisationFact::Missing,
                Lookup::Repeated => OrganisationFact::Repeated,
                Lookup::One(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => OrganisationFact::Value(text.to_string()),
                    Err(_) => OrganisationFact::NotUtf8(hex_preview(bytes)),
                },
            },
            OrganisationSource::PathParam(name) => match self.path.capture(path, name) {
                Some(value) => OrganisationFact::Value(value.to_string()),
                None => OrganisationFact::Missing,
            },
            OrganisationSource::Pointer(_) => OrganisationFact::FromBody,
        };
        RequestFacts { organisation }
    }

    pub fn evaluate<'a>(
        &self,
        facts: &RequestFacts,
        body: impl Into<Document<'a>>,
    ) -> Evaluation<'a> {
        let body = body.into();
        if !self.when.iter().all(|c| c.holds(body)) {
            return Evaluation::ConditionsNotMet;
        }
        let organisation_id = match (&self.organisation, &facts.organisation) {
            (OrganisationSource::Pointer(p), _) => body.pointer(p).and_then(|f| f.as_string()),
            (_, OrganisationFact::Value(v)) => Some(v.clone()),
            (_, OrganisationFact::NotUtf8(preview)) => {
                return Evaluation::OrganisationNotUtf8(preview.clone())
            }
            (_, OrganisationFact::Repeated) => return Evaluation::OrganisationRepeated,
            (_, OrganisationFact::Missing | OrganisationFact::FromBody) => None,
        };
        let Some(organisation_id) = organisation_id.filter(|o| !o.is_empty()) else {
            return Evaluation::NoOrganisation;
        };
        match body.pointer(&self.object_pointer) {
            None => Evaluation::ObjectNotFound,
            Some(found) => match found.as_object() {
                Some(object) => Evaluation::Matched {
                    organisation_id,
                    object,
                },
                None => Evaluation::ObjectNotAnObject,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(org: OrganisationSource) -> EventRule {
        let mut methods = MethodSet::default();
        for m in ["POST", "PUT"] {
            methods.insert(MethodSet::bit(m).unwrap());
        }
        EventRule {
            event_type: "job.completed".into(),
            object_type: "job".into(),
            methods,
            path: PathTemplate::parse("/jobs/{jobId}/complete").unwrap(),
            statuses: vec![200],
            when: vec![Condition {
                pointer: "/status".into(),
                check: Check::Equals(json!("completed")),
            }],
            object_pointer: String::new(),
            organisation: org,
            refetch: None,
        }
    }

    #[test]
    fn path_templates_match_one_segment_per_capture() {
        let t = PathTemplate::parse("/jobs/{jobId}/complete").unwrap();
        assert!(t.matches("/jobs/42/complete"));
        assert!(!t.matches("/jobs/complete"));
        assert!(!t.matches("/jobs/4/2/complete"));
        assert!(!t.matches("/jobs/42"));
        assert!(!t.matches("/jobs/42/completed"));
        assert!(!t.matches("/Jobs/42/complete"));
        assert!(!t.matches("jobs/42/complete"));
        assert_eq!(t.capture("/jobs/42/complete", "jobId"), Some("42"));
        assert!(PathTemplate::parse("/").unwrap().matches("/"));
        assert!(!PathTemplate::parse("/").unwrap().matches("/a"));
    }

    #[test]
    fn path_templates_are_canonical() {
        let t = PathTemplate::parse("//j%6Fbs/{jobId}/complete/").unwrap();
        assert_eq!(t, PathTemplate::parse("/jobs/{jobId}/complete").unwrap());
        let t = PathTemplate::parse("/a%3bb").unwrap();
        assert!(t.matches("/a%3Bb"));
        assert!(PathTemplate::parse("/").unwrap().parts().next().is_none());
    }

    #[test]
    fn case_insensitive_templates_ignore_the_case_of_literals_only() {
        let t = PathTemplate::parse("/Jobs/{jobId}/complete")
            .unwrap()
            .with_case_insensitive(true);
        assert!(t.matches("/JOBS/42/Complete"));
        assert_eq!(t.capture("/jobs/AbC/COMPLETE", "jobId"), Some("AbC"));
        assert!(!t.matches("/jobs/42/completed"));
        assert!(!PathTemplate::parse("/Jobs").unwrap().matches("/jobs"));
    }

    #[test]
    fn path_templates_reject_bad_syntax() {
        for bad in [
            "jobs",
            "/jobs/{id",
            "/jobs/{}",
            "/jobs/x{id}",
            "/a/{id}/{id}",
            "/a?b",
            "/a/{i-d}",
            "/a;v=1",
            "/a/%zz",
            "/a/%4",
            "/a/b%2Fc",
            "/a/%5c",
            "/a/./b",
            "/a/../b",
            "/a/%2e%2E",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_pointer_syntax() {
        for ok in ["", "/", "/status", "/a~0b/c~1d", "/0"] {
            assert!(validate_json_pointer(ok).is_ok(), "{ok}");
        }
        for bad in ["status", "/a~2", "/a~", "#/a"] {
            assert!(validate_json_pointer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn methods_and_status() {
        let r = rule(OrganisationSource::Header("x-organisation-id".into()));
        assert!(r.matches_request("POST", "/jobs/1/complete"));
        assert!(!r.matches_request("GET", "/jobs/1/complete"));
        assert!(!r.matches_request("post", "/jobs/1/complete"));
        assert!(!r.matches_request("BREW", "/jobs/1/complete"));
        assert!(r.matches_status(200));
        assert!(!r.matches_status(404));
    }

    #[test]
    fn evaluation_outcomes() {
        let r = rule(OrganisationSource::Header("x-organisation-id".into()));
        let facts = r.request_facts("/jobs/1/complete", |h| {
            assert_eq!(h, "x-organisation-id");
            Lookup::One(b"org1")
        });
        let body = json!({"id": "1", "status": "completed"});
        assert_eq!(
            r.evaluate(&facts, &body),
            Evaluation::Matched {
                organisation_id: "org1".into(),
                object: Object::Tree(body.as_object().unwrap())
            }
        );
        assert_eq!(
            r.evaluate(&facts, &json!({"status": "failed"})),
            Evaluation::ConditionsNotMet
        );
        assert_eq!(
            r.evaluate(&facts, &json!(["completed"])),
            Evaluation::ConditionsNotMet
        );
        assert_eq!(
            r.evaluate(&RequestFacts::default(), &body),
            Evaluation::NoOrganisation
        );
        let empty = RequestFacts {
            organisation: OrganisationFact::Value(String::new()),
        };
        assert_eq!(r.evaluate(&empty, &body), Evaluation::NoOrganisation);
    }

    #[test]
    fn an_organisation_header_that_is_not_utf8_or_repeated_makes_no_event() {
        let r = rule(OrganisationSource::Header("x-organisation-id".into()));
        let body = json!({"status": "completed"});
        let facts = r.request_facts("/jobs/1/complete", |_| Lookup::One(b"caf\xe9"));
        assert_eq!(
            r.evaluate(&facts, &body),
            Evaluation::OrganisationNotUtf8("636166e9".into())
        );
        let facts = r.request_facts("/jobs/1/complete", |_| Lookup::Repeated);
        assert_eq!(r.evaluate(&facts, &body), Evaluation::OrganisationRepeated);
        // Only once the conditions hold: a response that is no event stays silent.
        assert_eq!(
            r.evaluate(&facts, &json!({"status": "failed"})),
            Evaluation::ConditionsNotMet
        );
        let facts = r.request_facts("/jobs/1/complete", |_| Lookup::Absent);
        assert_eq!(r.evaluate(&facts, &body), Evaluation::NoOrganisation);
    }

    #[test]
    fn organisation_from_pointer_and_path() {
        let by_pointer = rule(OrganisationSource::Pointer("/org".into()));
        let facts = by_pointer.request_facts("/jobs/1/complete", |_| panic!("no header needed"));
        let body = json!({"status": "completed", "org": "o9"});
        assert!(
            matches!(by_pointer.evaluate(&facts, &body), Evaluation::Matched { organisation_id, .. } if organisation_id == "o9")
        );
        let numeric = json!({"status": "completed", "org": 9});
        assert_eq!(
            by_pointer.evaluate(&facts, &numeric),
            Evaluation::NoOrganisation
        );

        let by_path = rule(OrganisationSource::PathParam("jobId".into()));
        let facts = by_path.request_facts("/jobs/o7/complete", |_| Lookup::Absent);
        assert!(
            matches!(by_path.evaluate(&facts, &body), Evaluation::Matched { organisation_id, .. } if organisation_id == "o7")
        );
    }

    #[test]
    fn conditions_equals_and_exists() {
        let eq = Condition {
            pointer: "/a/b".into(),
            check: Check::Equals(json!(null)),
        };
        assert!(eq.holds(&json!({"a": {"b": null}})));
        assert!(!eq.holds(&json!({"a": {}})));
        let exists = Condition {
            pointer: "/a".into(),
            check: Check::Exists(true),
        };
        let absent = Condition {
            pointer: "/a".into(),
            check: Check::Exists(false),
        };
        assert!(exists.holds(&json!({"a": 0})) && !absent.holds(&json!({"a": 0})));
        assert!(!exists.holds(&json!({})) && absent.holds(&json!({})));
    }

    #[test]
    fn object_pointer() {
        let mut r = rule(OrganisationSource::Header("h".into()));
        r.object_pointer = "/job".into();
        let facts = RequestFacts {
            organisation: OrganisationFact::Value("o".into()),
        };
        assert_eq!(
            r.evaluate(&facts, &json!({"status": "completed"})),
            Evaluation::ObjectNotFound
        );
        assert_eq!(
            r.evaluate(&facts, &json!({"status": "completed", "job": 3})),
            Evaluation::ObjectNotAnObject
        );
        assert!(matches!(
            r.evaluate(&facts, &json!({"status": "completed", "job": {"id": 1}})),
            Evaluation::Matched { .. }
        ));
    }
}
