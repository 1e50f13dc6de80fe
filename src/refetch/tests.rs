use super::*;
use crate::event::EventId;
use crate::headers::Pairs;
use crate::stream::Stream;
use serde_json::json;

fn plan(refetch: serde_json::Value, organisation: serde_json::Value) -> Rc<Plan> {
    let mut rule = json!({
        "type": "job.completed",
        "objectType": "job",
        "match": {"methods": ["POST"], "path": "/orgs/{org}/jobs/{jobId}/complete", "status": [200]},
        "when": [{"pointer": "/status", "equals": "completed"}],
        "organisationId": organisation,
    });
    if !refetch.is_null() {
        rule["refetch"] = refetch;
    }
    let config = json!({
        "events": [rule],
        "webhooks": [],
        "delivery": {"cluster": "webhooks", "retrySchedule": ["1s", "5s"]},
    });
    Rc::new(Plan::from_json(config.to_string().as_bytes(), &|_| None).unwrap())
}

fn cut_of(plan: &Plan, path: &str, org_header: Option<&[u8]>, status: Option<&[u8]>) -> Vec<Cut> {
    let mut stream = Stream::new();
    let mut request: Pairs = vec![
        (b":method", b"POST"),
        (b":path", path.as_bytes()),
        (b":authority", b"jobs.internal"),
    ];
    if let Some(org) = org_header {
        request.push((b"x-organisation-id", org));
    }
    stream.on_request_headers(plan, &request);
    if let Some(status) = status {
        assert!(stream.on_response_headers(plan, &[(b":status", status)]));
        assert!(stream
            .on_response_body(plan, b"{\"status\":\"comp")
            .is_none());
    }
    stream.ended_early()
}

fn job(plan: &Rc<Plan>, cut: &Cut, route: Option<&str>) -> Result<RefetchJob, NoRefetch> {
    RefetchJob::for_cut(
        plan,
        cut,
        route,
        "downstream_remote_disconnect",
        7_000,
        [9; 8],
    )
}

#[test]
fn a_cut_stream_is_read_again_from_the_path_its_captures_fill() {
    let plan = plan(
        json!({"path": "/orgs/{org}/jobs/{jobId}"}),
        json!({"header": "x-organisation-id"}),
    );
    let cuts = cut_of(
        &plan,
        "/orgs/o1/jobs/j 1\"/complete?x=1",
        Some(b"o1"),
        Some(b"200"),
    );
    assert_eq!(cuts.len(), 1);
    assert!(cuts[0].response_started);
    let j = job(&plan, &cuts[0], Some("job_service")).unwrap();
    assert_eq!(j.method, "GET");
    assert_eq!(j.path, "/orgs/o1/jobs/j%201%22");
    assert_eq!(j.authority, "jobs.internal");
    assert_eq!(j.cluster, "job_service");
    // The canonical path: the query is not part of it.
    assert_eq!(j.job_path, "/orgs/o1/jobs/j 1\"/complete");
    // The organisation header goes along, since the rule takes the organisation from it.
    assert_eq!(
        j.headers,
        vec![("x-organisation-id".to_string(), "o1".to_string())]
    );
}

#[test]
fn a_stream_that_finished_or_never_matched_is_not_cut() {
    let plan = plan(
        json!({"path": "/orgs/{org}/jobs/{jobId}"}),
        json!({"pointer": "/org"}),
    );
    assert!(cut_of(&plan, "/other", None, None).is_empty());
    let mut stream = Stream::new();
    stream.on_request_headers(
        &plan,
        &[
            (b":method", b"POST"),
            (b":path", b"/orgs/o/jobs/j/complete"),
        ],
    );
    stream.on_response_headers(&plan, &[(b":status", b"200")]);
    stream.on_response_body(&plan, br#"{"status":"completed","org":"o"}"#);
    assert_eq!(stream.finish(&plan, 1, || [0; 8]).len(), 1);
    assert!(stream.ended_early().is_empty());
    // A status the rule does not match is no candidate any more.
    let mut stream = Stream::new();
    stream.on_request_headers(
        &plan,
        &[
            (b":method", b"POST"),
            (b":path", b"/orgs/o/jobs/j/complete"),
        ],
    );
    assert!(!stream.on_response_headers(&plan, &[(b":status", b"500")]));
    assert!(stream.ended_early().is_empty());
    // No response headers at all: cut before the response started.
    let cuts = cut_of(&plan, "/orgs/o/jobs/j/complete", None, None);
    assert_eq!(cuts.len(), 1);
    assert!(!cuts[0].response_started);
}

#[test]
fn without_refetch_or_a_cluster_there_is_no_job() {
    let none = plan(serde_json::Value::Null, json!({"pointer": "/org"}));
    let cuts = cut_of(&none, "/orgs/o/jobs/j/complete", None, Some(b"200"));
    assert_eq!(
        job(&none, &cuts[0], Some("c")).unwrap_err(),
        NoRefetch::NotConfigured
    );
    let routed = plan(json!({"path": "/jobs/{jobId}"}), json!({"pointer": "/org"}));
    let cuts = cut_of(&routed, "/orgs/o/jobs/j/complete", None, Some(b"200"));
    assert_eq!(
        job(&routed, &cuts[0], None).unwrap_err(),
        NoRefetch::NoCluster
    );
    assert_eq!(
        job(&routed, &cuts[0], Some("")).unwrap_err(),
        NoRefetch::NoCluster
    );
    let named = plan(
        json!({"path": "/jobs/{jobId}", "cluster": "jobs_read", "method": "POST"}),
        json!({"pointer": "/org"}),
    );
    let j = job(
        &named,
        &cut_of(&named, "/orgs/o/jobs/j/complete", None, Some(b"200"))[0],
        Some("route"),
    )
    .unwrap();
    assert_eq!(
        (j.cluster.as_str(), j.method.as_str(), j.path.as_str()),
        ("jobs_read", "POST", "/jobs/j")
    );
}

fn answer(code: u16, body: &str) -> RefetchAnswer {
    RefetchAnswer::Status {
        code,
        content_encoding: None,
        body: body.as_bytes().to_vec(),
    }
}

#[test]
fn the_answer_makes_the_event_with_the_same_id_every_time() {
    let plan = plan(json!({"path": "/jobs/{jobId}"}), json!({"pointer": "/org"}));
    let cuts = cut_of(&plan, "/orgs/o/jobs/j/complete", None, Some(b"200"));
    let j = job(&plan, &cuts[0], Some("c")).unwrap();
    let body = r#"{"id":"j","status":"completed","org":"o1"}"#;
    let ids: Vec<String> = (0..2)
        .map(|_| match j.judge(answer(200, body)) {
            Verdict::Outcomes(outcomes) => match outcomes.as_slice() {
                [StreamOutcome::Event(e)] => {
                    assert_eq!(e.organisation_id, "o1");
                    e.id_hex.clone()
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], EventId::new(7, [9; 8]).to_hex());
    // The conditions hold on the refetched body too: a job not completed makes no event.
    match j.judge(answer(200, r#"{"status":"running","org":"o1"}"#)) {
        Verdict::Outcomes(outcomes) => assert!(matches!(
            outcomes.as_slice(),
            [StreamOutcome::NoEvent(crate::stream::NoEvent::ConditionsNotMet { event_type })] if event_type == "job.completed"
        )),
        other => panic!("{other:?}"),
    }
    match j.judge(answer(200, "{cut")) {
        Verdict::Outcomes(outcomes) => assert!(matches!(
            outcomes.as_slice(),
            [StreamOutcome::NoEvent(crate::stream::NoEvent::BodyNotJson(
                _
            ))]
        )),
        other => panic!("{other:?}"),
    }
    assert!(matches!(j.judge(answer(503, "")), Verdict::Retry(w) if w.contains("503")));
    assert!(matches!(j.judge(answer(429, "")), Verdict::Retry(_)));
    assert!(
        matches!(j.judge(RefetchAnswer::Failed("reset".into())), Verdict::Retry(w) if w == "reset")
    );
    assert!(matches!(j.judge(answer(404, "{}")), Verdict::GiveUp(w) if w.contains("404")));
    // Cut before any response: a job the upstream does not know is no completion, and no loss.
    let cuts = cut_of(&plan, "/orgs/o/jobs/j/complete", None, None);
    let early = job(&plan, &cuts[0], Some("c")).unwrap();
    match early.judge(answer(404, "{}")) {
        Verdict::Outcomes(outcomes) => assert!(matches!(
            outcomes.as_slice(),
            [StreamOutcome::NoEvent(
                crate::stream::NoEvent::StatusNotMatched {
                    status: Some(404),
                    ..
                }
            )]
        )),
        other => panic!("{other:?}"),
    }
    assert!(matches!(early.judge(answer(503, "")), Verdict::Retry(_)));
    assert!(
        matches!(early.judge(answer(200, body)), Verdict::Outcomes(o) if matches!(o.as_slice(), [StreamOutcome::Event(_)]))
    );
}

#[test]
fn the_queue_is_bounded_and_retries_along_the_schedule() {
    let plan = plan(json!({"path": "/jobs/{jobId}"}), json!({"pointer": "/org"}));
    let cut = cut_of(&plan, "/orgs/o/jobs/j/complete", None, Some(b"200")).remove(0);
    let mut q = RefetchQueue::new();
    for _ in 0..MAX_QUEUED {
        q.push(job(&plan, &cut, Some("c")).unwrap()).unwrap();
    }
    assert!(matches!(
        q.push(job(&plan, &cut, Some("c")).unwrap()),
        Err(Refused::QueueFull(_))
    ));
    // At most MAX_IN_FLIGHT out at once.
    let out: Vec<_> = std::iter::from_fn(|| q.next_due(7_000)).collect();
    assert_eq!(out.len(), MAX_IN_FLIGHT);
    assert_eq!(q.in_flight(), MAX_IN_FLIGHT);

    let mut q = RefetchQueue::new();
    q.push(job(&plan, &cut, Some("c")).unwrap()).unwrap();
    let schedule = [1_000, 5_000];
    let first = q.next_due(7_000).unwrap();
    assert_eq!(first.attempts, 1);
    q.answered();
    q.retry(first, &schedule, 7_000).unwrap();
    assert!(q.next_due(7_999).is_none());
    let second = q.next_due(8_000).unwrap();
    q.answered();
    q.retry(second, &schedule, 8_000).unwrap();
    assert!(q.next_due(12_999).is_none());
    let third = q.next_due(13_000).unwrap();
    assert_eq!(third.attempts, 3);
    q.answered();
    assert!(
        matches!(q.retry(third, &schedule, 13_000), Err(Refused::Exhausted(j)) if j.attempts == 3)
    );
    assert_eq!((q.waiting(), q.in_flight()), (0, 0));
}

#[test]
fn the_queue_is_bounded_in_bytes() {
    let plan = plan(json!({"path": "/jobs/{jobId}"}), json!({"pointer": "/org"}));
    let long = format!("/orgs/o/jobs/{}/complete", "j".repeat(60_000));
    let cut = cut_of(&plan, &long, None, Some(b"200")).remove(0);
    let mut q = RefetchQueue::new();
    let mut accepted = 0;
    while q.push(job(&plan, &cut, Some("c")).unwrap()).is_ok() {
        accepted += 1;
    }
    assert!(
        accepted < MAX_QUEUED && accepted * 120_000 <= MAX_QUEUED_BYTES,
        "{accepted}"
    );
}

#[test]
fn a_cut_keeps_the_authority_only_when_a_matched_rule_can_refetch() {
    let without = plan(json!(null), json!({"header": "x-organisation-id"}));
    let cuts = cut_of(&without, "/orgs/o1/jobs/j1/complete", Some(b"o1"), None);
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].path, "/orgs/o1/jobs/j1/complete");
    assert_eq!(cuts[0].authority, "");
    let with = plan(
        json!({"path": "/orgs/{org}/jobs/{jobId}"}),
        json!({"header": "x-organisation-id"}),
    );
    let cuts = cut_of(&with, "/orgs/o1/jobs/j1/complete", Some(b"o1"), None);
    assert_eq!(cuts[0].authority, "jobs.internal");
}
