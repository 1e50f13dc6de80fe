use super::*;
use serde_json::json;

fn plan() -> Plan {
    let config = json!({
        "events": [{
            "type": "job.completed",
            "objectType": "job",
            "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
            "organisationId": {"header": "x-organisation-id"},
        }],
        "webhooks": [],
        "delivery": {"cluster": "webhooks"},
    });
    match Plan::from_json(config.to_string().as_bytes(), &|_| None) {
        Ok(plan) => plan,
        Err(errors) => panic!("{errors:?}"),
    }
}

#[test]
fn only_a_stream_a_rule_matched_is_a_candidate_until_its_response_headers() {
    let plan = plan();
    let mut other = Stream::new();
    assert!(!other.is_candidate(), "a new stream is no candidate");
    other.on_request_headers(
        &plan,
        &[(b":method", b"POST"), (b":path", b"/jobs/1/progress")],
    );
    assert!(!other.is_candidate(), "no rule matches the path");
    let mut get = Stream::new();
    get.on_request_headers(
        &plan,
        &[(b":method", b"GET"), (b":path", b"/jobs/1/complete")],
    );
    assert!(!get.is_candidate(), "no rule matches the method");

    let mut job = Stream::new();
    job.on_request_headers(
        &plan,
        &[
            (b":method", b"POST"),
            (b":path", b"/jobs/1/complete"),
            (b"x-organisation-id", b"org_1"),
        ],
    );
    assert!(job.is_candidate());
    assert!(job.on_response_headers(&plan, &[(b":status", b"200")]));
    assert!(!job.is_candidate(), "collecting its body now");
    assert!(job.is_collecting());
}
