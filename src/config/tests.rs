//! The configuration as a whole: valid input compiles into the expected plan, and every kind of
//! bad input is refused with the JSON path of its field.

use super::*;
use crate::rules::OrganisationSource;
use serde_json::json;

const KEY_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn valid() -> Value {
    json!({
        "events": [{
            "type": "job.completed",
            "objectType": "job",
            "match": {"methods": ["POST", "PUT", "PATCH"], "path": "/jobs/{jobId}/complete", "status": [200]},
            "when": [{"pointer": "/status", "equals": "completed"}],
            "object": "",
            "organisationId": {"header": "X-Organisation-Id"}
        }],
        "webhooks": [{
            "id": "66b2e3ddb97f60b5270d5ce9",
            "organisationId": "657bf08c202997ba9d127922",
            "name": "Billing",
            "url": "https://billing.example.com/hooks/rapidlogix",
            "description": "Invoices the customer when a job completes",
            "status": "enabled",
            "events": ["job.completed"],
            "apiKey": KEY_A,
            "cluster": "billing_webhook"
        }],
        "delivery": {
            "cluster": "webhooks_egress",
            "timeoutMs": 10000,
            "retrySchedule": ["5s", "30s", "2m", "10m", "30m", "1h"],
            "maxQueued": 10000,
            "maxBodyBytes": 1048576
        }
    })
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn errors_of(config: &Value) -> Vec<String> {
    match Plan::from_json(config.to_string().as_bytes(), &no_env) {
        Ok(_) => vec![],
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Applies `edit` to the valid config and expects one error starting with `expected`.
fn rejects(edit: impl FnOnce(&mut Value), expected: &str) {
    let mut config = valid();
    edit(&mut config);
    let errors = errors_of(&config);
    assert!(
        errors.iter().any(|e| e.starts_with(expected)),
        "expected {expected:?}, got {errors:?}"
    );
}

#[test]
fn the_design_example_is_valid() {
    let plan = Plan::from_json(valid().to_string().as_bytes(), &no_env).unwrap();
    assert_eq!(plan.rules.len(), 1);
    assert_eq!(plan.webhooks[0].cluster, "billing_webhook");
    assert_eq!(plan.webhooks[0].url.authority, "billing.example.com");
    assert_eq!(
        plan.delivery.outbox.retry.schedule_ms,
        [5_000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000]
    );
    assert_eq!(
        plan.subscribers("job.completed", "657bf08c202997ba9d127922"),
        [0]
    );
    assert!(plan.subscribers("job.completed", "other").is_empty());
    assert_eq!(
        plan.rules[0].organisation,
        OrganisationSource::Header("x-organisation-id".into())
    );
}

#[test]
fn defaults_fill_the_delivery_section() {
    let mut config = valid();
    config["delivery"] = json!({"cluster": "egress"});
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    assert_eq!(plan.delivery.timeout_ms, 10_000);
    assert_eq!(plan.delivery.outbox.max_queued, 10_000);
    assert_eq!(plan.delivery.outbox.max_in_flight_per_webhook, 16);
    assert_eq!(plan.delivery.outbox.retry.max_attempts(), 7);
    assert_eq!(plan.delivery.outbox.circuit_failures, Some(10));
    assert!(plan.delivery.dead_letter.is_none());
}

#[test]
fn a_missing_delivery_section_takes_every_default() {
    let config = valid_with(|c| drop(c.as_object_mut().unwrap().remove("delivery")));
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let outbox = &plan.delivery.outbox;
    assert_eq!(
        (plan.delivery.timeout_ms, plan.delivery.max_body_bytes),
        (10_000, 1 << 20)
    );
    assert_eq!(
        (outbox.max_queued, outbox.max_in_flight_per_webhook),
        (10_000, 16)
    );
    assert_eq!(outbox.max_queued_bytes, 64 << 20);
    assert_eq!(outbox.retry.max_attempts(), 7);
    assert_eq!(outbox.circuit_failures, Some(10));
    rejects(
        |c| {
            c.as_object_mut().unwrap().remove("delivery");
            c["webhooks"][0]["url"] = json!("http://billing.example.com/");
        },
        "webhooks[0].url: must be an https URL",
    );
}

#[test]
fn max_queued_bytes_is_a_whole_number_of_at_least_one() {
    let plan_with = |bytes: Value| {
        let config = valid_with(|c| c["delivery"]["maxQueuedBytes"] = bytes);
        Plan::from_json(config.to_string().as_bytes(), &no_env).map(|p| p.delivery.outbox)
    };
    assert_eq!(plan_with(json!(1)).unwrap().max_queued_bytes, 1);
    assert_eq!(
        plan_with(json!(123_456_789)).unwrap().max_queued_bytes,
        123_456_789
    );
    let huge = plan_with(json!(1u64 << 40)).unwrap().max_queued_bytes;
    assert_eq!(
        huge as u64,
        (1u64 << 40).min(usize::MAX as u64),
        "no upper bound"
    );
    assert_eq!(
        plan_with(Value::Null).unwrap().max_queued_bytes,
        67_108_864,
        "null is absent: the default, 64 MiB"
    );
    rejects(
        |c| c["delivery"]["maxQueuedBytes"] = json!(0),
        "delivery.maxQueuedBytes: must be at least 1",
    );
    for not_a_count in [
        json!(-1),
        json!(1.5),
        json!("64MiB"),
        json!([1]),
        json!(true),
    ] {
        rejects(
            |c| c["delivery"]["maxQueuedBytes"] = not_a_count,
            "delivery.maxQueuedBytes: must be a whole number, not ",
        );
    }
}

#[test]
fn numbers_beyond_a_bound_are_refused_not_wrapped() {
    // 2^32 + 1: a plain cast to a 32-bit usize (the wasm build) would make it 1 and accept it.
    for field in ["maxQueued", "maxBodyBytes", "maxInFlightPerWebhook"] {
        rejects(
            |c| c["delivery"][field] = json!(4_294_967_297u64),
            &format!("delivery.{field}: must be between 1 and "),
        );
    }
    rejects(
        |c| c["delivery"]["timeoutMs"] = json!(4_294_967_297u64),
        "delivery.timeoutMs: must be between 1 and 3600000",
    );
}

#[test]
fn structural_errors_name_the_field() {
    rejects(
        |c| drop(c["webhooks"][0].as_object_mut().unwrap().remove("url")),
        "webhooks[0].url: missing required field",
    );
    rejects(
        |c| c["webhooks"][0]["colour"] = json!("red"),
        "webhooks[0].colour: unknown field",
    );
    rejects(
        |c| c["delivery"]["timeout"] = json!(1),
        "delivery.timeout: unknown field",
    );
    rejects(
        |c| c["events"][0]["match"]["status"] = json!(["200"]),
        "events[0].match.status[0]: must be an HTTP status from 100 to 599",
    );
    rejects(
        |c| c["events"][0]["organisationId"] = json!({"cookie": "x"}),
        "events[0].organisationId.cookie: unknown field",
    );
    rejects(|c| c["extra"] = json!(true), "extra: unknown field");
    rejects(
        |c| c["webhooks"][0]["name"] = json!(7),
        "webhooks[0].name: must be a string, not 7",
    );
    rejects(
        |c| c["webhooks"][0]["events"] = json!(["job.completed", 3]),
        "webhooks[0].events[1]: must be a string, not 3",
    );
    rejects(
        |c| c["events"][0]["when"] = json!({}),
        "events[0].when: must be an array, not an object",
    );
    rejects(
        |c| c["events"][0]["match"] = json!([]),
        "events[0].match: must be a JSON object",
    );
    rejects(
        |c| c["delivery"]["allowInsecureHttp"] = json!("yes"),
        "delivery.allowInsecureHttp: must be true or false, not a string",
    );
    rejects(
        |c| c["events"][0]["organisationId"] = json!({"header": "a", "pointer": "/b"}),
        "events[0].organisationId: must have exactly one of header, pointer or pathParam",
    );
    rejects(
        |c| {
            drop(
                c["events"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("organisationId"),
            )
        },
        "events[0].organisationId: missing required field",
    );
    assert_eq!(
        errors_of(&json!([])),
        ["configuration: must be a JSON object"]
    );
    let errors = match Plan::from_json(b"{\"events\": [", &no_env) {
        Err(e) => e,
        Ok(_) => panic!("accepted broken JSON"),
    };
    assert!(
        errors[0]
            .to_string()
            .starts_with("configuration: invalid JSON"),
        "{errors:?}"
    );
    let trailing = format!("{} {{}}", valid());
    let errors = Plan::from_json(trailing.as_bytes(), &no_env).unwrap_err();
    assert!(
        errors[0].to_string().starts_with("configuration:"),
        "{errors:?}"
    );
}

#[test]
fn semantic_errors_name_the_field() {
    rejects(
        |c| c["webhooks"][0]["url"] = json!("http://billing.example.com/"),
        "webhooks[0].url: must be an https URL",
    );
    rejects(
        |c| c["webhooks"][0]["url"] = json!("https://127.0.0.1/"),
        "webhooks[0].url: private or loopback address",
    );
    rejects(
        |c| c["webhooks"][0]["url"] = json!("billing"),
        "webhooks[0].url: must be an absolute URL",
    );
    rejects(
        |c| c["webhooks"][0]["apiKey"] = json!("whsec_short"),
        "webhooks[0].apiKey: must be whsec_",
    );
    rejects(
        |c| c["webhooks"][0]["apiKey"] = json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "webhooks[0].apiKey: must be whsec_",
    );
    rejects(
        |c| c["webhooks"][0]["apiKey"] = json!({"env": "WH_MISSING"}),
        "webhooks[0].apiKey: environment variable WH_MISSING is not set",
    );
    rejects(
        |c| c["webhooks"][0]["apiKey"] = json!({"file": "/x"}),
        "webhooks[0].apiKey: must be a whsec_ key or",
    );
    rejects(
        |c| c["events"][0]["when"][0]["pointer"] = json!("status"),
        "events[0].when[0].pointer: must be empty or start with '/'",
    );
    rejects(
        |c| c["events"][0]["when"][0]["exists"] = json!(true),
        "events[0].when[0]: must have exactly one of equals or exists",
    );
    rejects(
        |c| c["events"][0]["object"] = json!("job"),
        "events[0].object: must be empty or start with '/'",
    );
    rejects(
        |c| c["webhooks"][0]["events"] = json!(["job.failed"]),
        "webhooks[0].events[0]: no rule in events[] emits \"job.failed\"",
    );
    rejects(
        |c| c["webhooks"][0]["events"] = json!([]),
        "webhooks[0].events: must not be empty",
    );
    rejects(
        |c| c["webhooks"][0]["status"] = json!("paused"),
        "webhooks[0].status: must be \"enabled\" or \"disabled\"",
    );
    rejects(
        |c| c["webhooks"][0]["id"] = json!("66B2E3DDB97F60B5270D5CE9"),
        "webhooks[0].id: must be 24 lowercase hex digits",
    );
    rejects(
        |c| c["webhooks"][0]["name"] = json!(" "),
        "webhooks[0].name: must not be empty",
    );
    rejects(
        |c| c["events"][0]["type"] = json!("JobCompleted"),
        "events[0].type: \"JobCompleted\" must follow",
    );
    rejects(
        |c| c["events"][0]["match"]["methods"] = json!(["post"]),
        "events[0].match.methods[0]: \"post\" is not an uppercase HTTP method",
    );
    rejects(
        |c| c["events"][0]["match"]["path"] = json!("/jobs/{id"),
        "events[0].match.path:",
    );
    rejects(
        |c| c["events"][0]["organisationId"] = json!({"pathParam": "org"}),
        "events[0].organisationId.pathParam: match.path has no {org} capture",
    );
    rejects(
        |c| c["delivery"]["retrySchedule"] = json!(["5s", "soon"]),
        "delivery.retrySchedule[1]:",
    );
    rejects(
        |c| c["delivery"]["maxQueued"] = json!(0),
        "delivery.maxQueued: must be between",
    );
    rejects(
        |c| {
            c["delivery"].as_object_mut().unwrap().remove("cluster");
            c["webhooks"][0].as_object_mut().unwrap().remove("cluster");
        },
        "webhooks[0].cluster: required when delivery.cluster is not set",
    );
    rejects(
        |c| {
            let copy = c["webhooks"][0].clone();
            c["webhooks"].as_array_mut().unwrap().push(copy);
        },
        "webhooks[1].id: duplicate webhook id 66b2e3ddb97f60b5270d5ce9",
    );
}

#[test]
fn dead_letter_and_circuit_breaker() {
    let config = valid_with(|c| {
        c["delivery"]["deadLetter"] =
            json!({"url": "https://store.example.com/dead?x=1", "apiKey": KEY_A});
        c["delivery"]["circuitBreaker"] = json!({"failures": 0});
    });
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let dl = plan.delivery.dead_letter.as_ref().unwrap();
    assert_eq!(
        (dl.cluster.as_str(), dl.url.path_and_query.as_str()),
        ("webhooks_egress", "/dead?x=1")
    );
    assert!(dl.key.is_some());
    assert_eq!(plan.delivery.outbox.circuit_failures, None);
    rejects(
        |c| c["delivery"]["deadLetter"] = json!({"url": "http://store.example.com/"}),
        "delivery.deadLetter.url: must be an https URL",
    );
    rejects(
        |c| c["delivery"]["deadLetter"] = json!({"url": "https://s.example/", "apiKey": "x"}),
        "delivery.deadLetter.apiKey: must be whsec_",
    );
    rejects(
        |c| c["delivery"]["deadLetter"] = json!({"uri": "https://s.example/"}),
        "delivery.deadLetter.uri: unknown field",
    );
    rejects(
        |c| c["delivery"]["circuitBreaker"] = json!({"failures": -1}),
        "delivery.circuitBreaker.failures: must be a whole number (0 turns the breaker off), not -1",
    );
}

#[test]
fn the_dead_letter_cluster_is_checked_like_a_webhook_cluster() {
    rejects(
        |c| c["delivery"]["deadLetter"] = json!({"url": "https://s.example/", "cluster": ""}),
        "delivery.deadLetter.cluster: must not be empty",
    );
    rejects(
        |c| {
            c["delivery"].as_object_mut().unwrap().remove("cluster");
            c["delivery"]["deadLetter"] = json!({"url": "https://s.example/"});
        },
        "delivery.deadLetter.cluster: required when delivery.cluster is not set",
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let mut config = valid();
    config["webhooks"][0]["status"] = json!("paused");
    config["webhooks"][0]["url"] = json!("http://x.example/");
    config["events"][0]["object"] = json!("bad");
    assert_eq!(errors_of(&config).len(), 3, "{:?}", errors_of(&config));
}

/// A change to the valid configuration.
type Edit = fn(&mut Value);

#[test]
fn keys_never_appear_in_errors() {
    // Each edit puts the key where its error message (or path) would quote it back: the error
    // must be there, and must show the key redacted.
    let echoing: [(&str, Edit); 8] = [
        ("webhooks[0].whsec_", |c| c["webhooks"][0][KEY_A] = json!(1)),
        ("webhooks[0].status", |c| {
            c["webhooks"][0]["status"] = json!(KEY_A)
        }),
        ("webhooks[0].events[0]", |c| {
            c["webhooks"][0]["events"] = json!([KEY_A])
        }),
        ("webhooks[0].apiKey", |c| {
            c["webhooks"][0]["apiKey"] = json!({ "env": KEY_A })
        }),
        ("events[0].type", |c| c["events"][0]["type"] = json!(KEY_A)),
        ("events[0].match.methods[0]", |c| {
            c["events"][0]["match"]["methods"] = json!([KEY_A])
        }),
        ("events[0].match.path", |c| {
            c["events"][0]["match"]["path"] = json!(format!("/{KEY_A}{{x"))
        }),
        ("delivery.retrySchedule[0]", |c| {
            c["delivery"]["retrySchedule"] = json!([KEY_A])
        }),
    ];
    let secret = &KEY_A["whsec_".len()..];
    for (path, edit) in echoing {
        let errors = errors_of(&valid_with(edit));
        let error = errors
            .iter()
            .find(|e| e.starts_with(path))
            .unwrap_or_else(|| panic!("no error at {path}: {errors:?}"));
        assert!(error.contains("whsec_<redacted>"), "{error}");
        for e in &errors {
            assert!(!e.contains(secret), "{e}");
        }
    }
    // Fields that never quote a string, and malformed keys: the error is there, the key is not.
    let quiet: [(&str, Edit); 3] = [
        ("webhooks[0].events", |c| {
            c["webhooks"][0]["events"] = json!(KEY_A)
        }),
        ("webhooks[0].apiKey", |c| {
            c["webhooks"][0]["apiKey"] = json!("whsec_MfKQ9r8GKYqrTwjUPD8IL!")
        }),
        ("webhooks[0].apiKey", |c| {
            c["webhooks"][0]["apiKey"] = json!(&KEY_A[..KEY_A.len() - 4])
        }),
    ];
    for (path, edit) in quiet {
        let errors = errors_of(&valid_with(edit));
        assert!(errors.iter().any(|e| e.starts_with(path)), "{errors:?}");
        for e in &errors {
            assert!(!e.contains("MfKQ9r8GKYqr"), "{e}");
        }
    }
}

fn valid_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut c = valid();
    edit(&mut c);
    c
}

#[test]
fn keys_come_from_the_environment() {
    let config = valid_with(|c| c["webhooks"][0]["apiKey"] = json!({"env": "BILLING_KEY"}));
    let env = |name: &str| (name == "BILLING_KEY").then(|| KEY_A.to_string());
    let plan = Plan::from_json(config.to_string().as_bytes(), &env).unwrap();
    let expected = SigningKey::parse(KEY_A).unwrap().sign("m", 1, b"x");
    assert_eq!(plan.webhooks[0].key.sign("m", 1, b"x"), expected);
    let bad_env = |_: &str| Some("nope".to_string());
    let errors = Plan::from_json(config.to_string().as_bytes(), &bad_env).unwrap_err();
    assert!(errors[0]
        .to_string()
        .starts_with("webhooks[0].apiKey: environment variable BILLING_KEY: must be whsec_"));
}

#[test]
fn tenancy_index_only_holds_enabled_subscribed_webhooks() {
    let mut config = valid();
    config["events"].as_array_mut().unwrap().push(json!({
        "type": "job.started", "objectType": "job",
        "match": {"path": "/jobs/{jobId}/start"}, "organisationId": {"pathParam": "jobId"}
    }));
    let hook = |id: &str, org: &str, status: &str, events: Value| json!({"id": id, "organisationId": org, "name": "n", "url": "https://h.example/", "status": status, "events": events, "apiKey": KEY_A});
    config["webhooks"] = json!([
        hook(
            "000000000000000000000001",
            "o1",
            "enabled",
            json!(["job.completed"])
        ),
        hook(
            "000000000000000000000002",
            "o1",
            "disabled",
            json!(["job.completed"])
        ),
        hook(
            "000000000000000000000003",
            "o1",
            "enabled",
            json!(["job.started"])
        ),
        hook(
            "000000000000000000000004",
            "o2",
            "enabled",
            json!(["job.completed", "job.started"])
        ),
    ]);
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    assert_eq!(plan.subscribers("job.completed", "o1"), [0]);
    assert_eq!(plan.subscribers("job.started", "o1"), [2]);
    assert_eq!(plan.subscribers("job.completed", "o2"), [3]);
    assert_eq!(plan.subscribers("job.started", "o2"), [3]);
    assert!(plan.subscribers("job.completed", "o3").is_empty());
    assert_eq!(
        plan.rules[1].statuses.len(),
        100,
        "status defaults to every 2xx"
    );
}

#[test]
fn the_journal() {
    let plan = Plan::from_json(valid().to_string().as_bytes(), &no_env).unwrap();
    assert!(plan.delivery.journal.is_none());
    let config = valid_with(|c| c["delivery"]["journal"] = json!({"cluster": "etcd"}));
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let j = plan.delivery.journal.as_ref().unwrap();
    assert_eq!(
        (
            j.cluster.as_str(),
            j.authority.as_str(),
            j.prefix.as_str(),
            j.lease_seconds
        ),
        ("etcd", "etcd", "webhook-emitter/", 15)
    );
    let config = valid_with(
        |c| c["delivery"]["journal"] = json!({"cluster": "etcd", "authority": "etcd.db.svc", "prefix": "a/b/", "leaseSeconds": 5}),
    );
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let j = plan.delivery.journal.as_ref().unwrap();
    assert_eq!(
        (j.authority.as_str(), j.prefix.as_str(), j.lease_seconds),
        ("etcd.db.svc", "a/b/", 5)
    );
    assert_eq!(j.max_spilled_bytes, 64 << 20, "maxSpilledBytes by default");
    let config =
        valid_with(|c| c["delivery"]["journal"] = json!({"cluster": "etcd", "maxSpilledBytes": 0}));
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    assert_eq!(plan.delivery.journal.as_ref().unwrap().max_spilled_bytes, 0);
    rejects(
        |c| c["delivery"]["journal"] = json!({"cluster": "etcd", "maxSpilledBytes": -1}),
        "delivery.journal.maxSpilledBytes",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!({"prefix": "x/"}),
        "delivery.journal.cluster: missing required field",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!({"cluster": ""}),
        "delivery.journal.cluster: must not be empty",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!({"cluster": "etcd", "prefix": "a b"}),
        "delivery.journal.prefix: must be printable ASCII",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!({"cluster": "etcd", "leaseSeconds": 1}),
        "delivery.journal.leaseSeconds: must be between 2 and 3600",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!({"cluster": "etcd", "leaseSecond": 5}),
        "delivery.journal.leaseSecond: unknown field",
    );
    rejects(
        |c| c["delivery"]["journal"] = json!("etcd"),
        "delivery.journal: must be",
    );
}

fn with_registry_block() -> Value {
    let mut c = valid();
    c["registry"] =
        json!({"cluster": "registry", "authority": "registry", "tokenEnv": "REGISTRY_TOKEN"});
    c["webhooks"] = json!([]);
    c
}

fn registry_env(name: &str) -> Option<String> {
    (name == "REGISTRY_TOKEN").then(|| "proxy-token".to_string())
}

#[test]
fn a_registry_block_is_checked_and_its_token_read_from_the_environment() {
    let plan =
        Plan::from_json(with_registry_block().to_string().as_bytes(), &registry_env).unwrap();
    let registry = plan.registry.as_ref().unwrap();
    assert_eq!(
        (
            registry.path.as_str(),
            registry.poll_ms,
            registry.token.as_str()
        ),
        ("/v2/registry/changes", 2_000, "proxy-token")
    );
    assert_eq!(registry.max_webhooks, 200_000);
    assert!(
        !format!("{registry:?}").contains("proxy-token"),
        "the token stays out of Debug"
    );
    // With a registry, `webhooks` may be absent.
    let mut no_hooks = with_registry_block();
    no_hooks.as_object_mut().unwrap().remove("webhooks");
    assert!(Plan::from_json(no_hooks.to_string().as_bytes(), &registry_env).is_ok());
    // Without one it may not.
    let mut none = valid();
    none.as_object_mut().unwrap().remove("webhooks");
    assert!(errors_of(&none).iter().any(|e| e.starts_with("webhooks:")));
    for (edit, expected) in [
        (json!({"pollMs": 5}), "registry.pollMs: must be from 100"),
        (
            json!({"maxWebhooks": 0}),
            "registry.maxWebhooks: must be from 1 to 10000000, not 0",
        ),
        (json!({"path": "v1"}), "registry.path: must start with '/'"),
        (
            json!({"cluster": ""}),
            "registry.cluster: must not be empty",
        ),
        (
            json!({"tokenEnv": "UNSET"}),
            "registry.tokenEnv: environment variable UNSET is not set",
        ),
        (json!({"extra": 1}), "registry.extra: unknown field"),
    ] {
        let mut c = with_registry_block();
        for (k, v) in edit.as_object().unwrap() {
            c["registry"][k] = v.clone();
        }
        let errors = match Plan::from_json(c.to_string().as_bytes(), &registry_env) {
            Ok(_) => vec![],
            Err(e) => e.iter().map(ToString::to_string).collect(),
        };
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{expected}: {errors:?}"
        );
    }
}

const KEY_B: &str = "whsec_Q2hhbmdlZCBrZXkgZm9yIHRoZSByb3RhdGlvbiB0ZXN0cw==";

fn registry_hook(id: &str, url: &str) -> Value {
    json!({
        "id": id, "organisationId": "org-r", "name": "From the registry", "url": url,
        "description": "", "status": "enabled", "events": ["job.completed"],
        "apiKeys": [KEY_B], "createdAt": "2026-11-29T00:00:00Z"
    })
}

/// Compiles registry entries one by one, as the feed's pages hand them in.
fn with_entries(base: &Plan, entries: &[Value]) -> (Vec<Webhook>, Vec<String>) {
    let mut skipped = Vec::new();
    let webhooks: Vec<Webhook> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| base.registry_webhook(e, &format!("changes[{i}]"), &mut skipped))
        .collect();
    (webhooks, skipped.iter().map(ToString::to_string).collect())
}

#[test]
fn registry_webhooks_join_the_configured_ones_and_the_invalid_are_left_out_by_path() {
    let mut c = with_registry_block();
    c["webhooks"] = valid()["webhooks"].clone();
    let base = Plan::from_json(c.to_string().as_bytes(), &registry_env).unwrap();
    let entries = [
        registry_hook("aaaaaaaaaaaaaaaaaaaaaaaa", "https://ok.example.com/in"),
        registry_hook("bbbbbbbbbbbbbbbbbbbbbbbb", "https://10.0.0.1/in"),
        registry_hook("66b2e3ddb97f60b5270d5ce9", "https://dup.example.com/in"),
        json!({"id": "cccccccccccccccccccccccc", "apiKeys": ["not-a-key"], "name": "x", "url": "https://x.example.com/",
         "organisationId": "o", "status": "enabled", "events": ["job.completed"]}),
        json!("not an object"),
    ];
    let (webhooks, skipped) = with_entries(&base, &entries);
    let ids: Vec<&str> = webhooks.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["aaaaaaaaaaaaaaaaaaaaaaaa"]);
    assert_eq!(base.webhook_index("66b2e3ddb97f60b5270d5ce9"), Some(0));
    assert_eq!(base.webhook_index("AAAAAAAAAAAAAAAAAAAAAAAA"), None);
    for expected in [
        "changes[1].url:",
        "changes[2].id:",
        "changes[3].apiKey:",
        "changes[4]: must be a JSON object",
    ] {
        assert!(
            skipped.iter().any(|e| e.starts_with(expected)),
            "{expected}: {skipped:?}"
        );
    }
    assert!(
        skipped.iter().all(|e| !e.contains(KEY_B)),
        "a key reached an error: {skipped:?}"
    );
}

#[test]
fn a_rotated_key_signs_beside_the_new_one_until_it_expires() {
    let base =
        Plan::from_json(with_registry_block().to_string().as_bytes(), &registry_env).unwrap();
    let mut hook = registry_hook("aaaaaaaaaaaaaaaaaaaaaaaa", "https://ok.example.com/in");
    hook["apiKeys"] = json!([KEY_B, KEY_A]);
    hook["previousKeyExpiresAt"] = json!(1_000);
    let (webhooks, _) = with_entries(&base, &[hook]);
    let w = &webhooks[0];
    assert_eq!(w.signing_keys(999_999).count(), 2);
    assert_eq!(w.signing_keys(1_000_000).count(), 1);
    let mut no_expiry = registry_hook("aaaaaaaaaaaaaaaaaaaaaaaa", "https://ok.example.com/in");
    no_expiry["apiKeys"] = json!([KEY_B, KEY_A]);
    let (webhooks, skipped) = with_entries(&base, &[no_expiry]);
    assert!(webhooks.is_empty());
    assert!(skipped[0].starts_with("changes[0].previousKeyExpiresAt"));
}

#[test]
fn refetch_is_read_with_its_defaults_and_checked_against_match_path() {
    let config = valid_with(|c| {
        c["events"][0]["refetch"] = json!({"path": "/jobs/{jobId}"});
    });
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let spec = plan.rules[0].refetch.as_ref().unwrap();
    assert_eq!(spec.method, "GET");
    assert_eq!(spec.cluster, None);
    let matching = &plan.rules[0].path;
    // The filter hands it the canonical path (no query); a capture keeps its escapes.
    assert_eq!(
        spec.fill(matching, "/jobs/j%3B1/complete").as_deref(),
        Some("/jobs/j%3B1")
    );
    let config = valid_with(|c| {
        c["events"][0]["refetch"] = json!({"path": "//v%31/jobs/{jobId}/"});
    });
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    let spec = plan.rules[0].refetch.as_ref().unwrap();
    assert_eq!(
        spec.fill(&plan.rules[0].path, "/jobs/42/complete")
            .as_deref(),
        Some("/v1/jobs/42")
    );
    let without = Plan::from_json(valid().to_string().as_bytes(), &no_env).unwrap();
    assert!(without.rules[0].refetch.is_none());

    rejects(
        |c| c["events"][0]["refetch"] = json!({"path": "/jobs/{id}"}),
        "events[0].refetch.path: {id} is not a capture of match.path",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!({"path": "jobs/{jobId}"}),
        "events[0].refetch.path: must start with '/'",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!({"path": "/jobs/{jobId}", "method": "get"}),
        "events[0].refetch.method: \"get\" is not an uppercase HTTP method",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!({"path": "/jobs/{jobId}", "cluster": ""}),
        "events[0].refetch.cluster: must not be empty",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!({"path": "/jobs/{jobId}", "timeout": 1}),
        "events[0].refetch.timeout: unknown field",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!({"method": "GET"}),
        "events[0].refetch.path:",
    );
    rejects(
        |c| c["events"][0]["refetch"] = json!("/jobs/{jobId}"),
        "events[0].refetch: must be a JSON object",
    );
}

#[test]
fn case_insensitive_paths_and_canonical_templates() {
    let plan = Plan::from_json(valid().to_string().as_bytes(), &no_env).unwrap();
    assert!(!plan.rules[0].path.is_case_insensitive());
    let mut config = valid();
    config["events"][0]["match"]["caseInsensitive"] = json!(true);
    config["events"][0]["match"]["path"] = json!("//J%6Fbs/{jobId}/complete/");
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    assert!(plan.rules[0].matches_request("POST", "/JOBS/42/Complete"));
    assert!(!plan.rules[0].matches_request("POST", "/jobs/42/completed"));
    config["events"][0]["match"]["caseInsensitive"] = json!(null);
    let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
    assert!(!plan.rules[0].matches_request("POST", "/jobs/42/complete"));
    assert!(plan.rules[0].matches_request("POST", "/Jobs/42/complete"));
    rejects(
        |c| c["events"][0]["match"]["caseInsensitive"] = json!("yes"),
        "events[0].match.caseInsensitive",
    );
    rejects(
        |c| c["events"][0]["match"]["path"] = json!("/jobs/{jobId}/complete;v=1"),
        "events[0].match.path: segment \"complete;v=1\" must not contain ';'",
    );
    rejects(
        |c| c["events"][0]["match"]["path"] = json!("/jobs/../{jobId}"),
        "events[0].match.path: segment \"..\" is a dot segment",
    );
}
