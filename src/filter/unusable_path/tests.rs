use super::*;
use crate::config::Plan;
use crate::filter::host::LogLevel;
use crate::filter::testing::{job_completed_rule, FakeHost};
use crate::stream::Stream;

fn plan() -> Plan {
    let config = serde_json::json!({"events": [job_completed_rule()], "webhooks": []});
    Plan::from_json(config.to_string().as_bytes(), &|_| None).unwrap()
}

fn request(plan: &Plan, method: &[u8], path: &[u8]) -> Option<UnusablePath> {
    Stream::new().on_request_headers(plan, &[(b":method", method), (b":path", path)])
}

#[test]
fn bad_paths_of_a_rules_method_are_counted_and_logged_once_a_second() {
    let plan = plan();
    let host = FakeHost::default();
    let metrics = Metrics::define(&host);
    let sampler = LogSampler::default();
    let bad = request(&plan, b"POST", b"/jobs/X\xff/complete?q").unwrap();
    assert_eq!(bad.why, BadPath::NotUtf8);
    assert_eq!(bad.preview, "hex 2f6a6f62732f58ff2f636f6d706c6574…");
    report(&host, metrics, &sampler, &bad, 10_000);
    let escaped = request(&plan, b"POST", b"/jobs/a%2Fb/complete").unwrap();
    report(&host, metrics, &sampler, &escaped, 10_500);
    let escape = request(&plan, b"POST", b"/jobs/%zz/complete").unwrap();
    report(&host, metrics, &sampler, &escape, 11_000);
    assert_eq!(host.metric("requests_bad_path.not_utf8"), 1);
    assert_eq!(host.metric("requests_bad_path.escaped_slash"), 1);
    assert_eq!(host.metric("requests_bad_path.bad_escape"), 1);
    assert_eq!(host.logs.borrow().len(), 2, "{:?}", host.logs.borrow());
    assert_eq!(
        host.logged(LogLevel::Warn, "request path is not UTF-8: POST hex 2f6a"),
        1
    );
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            "request path has a '%' not followed by two hex digits: POST \"/jobs/%zz/complete\": matched against no rule, no event; counted in requests_bad_path.bad_escape (1 more since the last such line)"
        ),
        1,
        "{:?}",
        host.logs.borrow()
    );
}

#[test]
fn only_requests_with_a_rules_method_are_looked_at() {
    let plan = plan();
    assert_eq!(request(&plan, b"GET", b"/jobs/X\xff/complete"), None);
    assert_eq!(request(&plan, b"PUT", b"/a%2F"), None);
    assert_eq!(request(&plan, b"\xff", b"/a%2F"), None);
    // A good path is no business of this module, matched or not.
    assert_eq!(request(&plan, b"POST", b"/x/%41"), None);
    let mut stream = Stream::new();
    assert_eq!(
        stream.on_request_headers(
            &plan,
            &[
                (b":method", b"POST"),
                (b":path", b"//jobs/X/complet%65/;v=1?x")
            ]
        ),
        None
    );
    assert!(stream.on_response_headers(&plan, &[(b":status", b"200")]));
}
