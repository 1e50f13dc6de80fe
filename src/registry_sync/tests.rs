//! The registry's copy kept in step page by page: listings, changes, deletions, disables, the
//! 410 relisting that keeps the old copy until it ends, and pages refused whole.

use super::*;
use serde_json::{json, Value};

const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ORG: &str = "657bf08c202997ba9d127922";

fn base() -> Plan {
    let config = json!({
        "events": [{"type": "job.completed", "objectType": "job",
            "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
            "object": "", "organisationId": {"header": "X-Organisation-Id"}}],
        "registry": {"cluster": "registry", "authority": "registry", "tokenEnv": "T"},
        "delivery": {"cluster": "egress"}
    });
    Plan::from_json(config.to_string().as_bytes(), &|_| Some("token".into())).unwrap()
}

fn id(n: u32) -> String {
    format!("{n:024x}")
}

fn entry(n: u32, revision: u64) -> Value {
    json!({"revision": revision, "id": id(n), "organisationId": ORG, "name": "Hook",
           "url": format!("https://hooks.example.com/{n}"), "description": "", "status": "enabled",
           "events": ["job.completed"], "apiKeys": [KEY]})
}

fn page(revision: u64, next: u64, more: bool, changes: Vec<Value>) -> Vec<u8> {
    json!({"revision": revision, "next": next, "more": more, "changes": changes})
        .to_string()
        .into_bytes()
}

fn ids(sync: &mut RegistrySync) -> Vec<String> {
    let mut ids: Vec<String> = sync
        .plan(&base())
        .webhooks
        .iter()
        .map(|w| w.id.clone())
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_listing_in_pages_applies_when_it_ends_and_the_cursor_follows_next() {
    let plan = base();
    let mut sync = RegistrySync::new();
    assert_eq!(
        sync.request_path("/v2/registry/changes"),
        "/v2/registry/changes?since=0"
    );
    assert_eq!(sync.request_path("/feed?x=1"), "/feed?x=1&since=0");
    let first = sync
        .apply_page(
            &plan,
            &page(9, 4, true, vec![entry(1, 2), entry(2, 4)]),
            100,
        )
        .unwrap();
    assert!(!first.complete && !first.rebuild && sync.more());
    assert!(!sync.loaded(), "nothing applies before the listing ends");
    assert_eq!(sync.request_path("/f"), "/f?since=4");
    assert_eq!(sync.lag(), 9);
    let last = sync
        .apply_page(&plan, &page(9, 9, false, vec![entry(3, 9)]), 200)
        .unwrap();
    assert!(last.complete && last.rebuild && last.first);
    assert!(sync.loaded() && !sync.more());
    assert_eq!(
        (sync.lag(), sync.complete_ms(), sync.len()),
        (0, Some(200), 3)
    );
    assert_eq!(ids(&mut sync), [id(1), id(2), id(3)]);
    // Nothing changed: one empty page, nothing to rebuild.
    let empty = sync
        .apply_page(&plan, &page(9, 9, false, vec![]), 300)
        .unwrap();
    assert!(empty.complete && !empty.rebuild && !empty.first);
    assert_eq!(sync.complete_ms(), Some(300));
}

#[test]
fn changes_replace_delete_and_disable_by_id_and_rebuild_once_per_catch_up() {
    let plan = base();
    let mut sync = RegistrySync::new();
    sync.apply_page(
        &plan,
        &page(3, 3, false, vec![entry(1, 1), entry(2, 2), entry(3, 3)]),
        0,
    )
    .unwrap();
    let mut moved = entry(1, 4);
    moved["url"] = json!("https://moved.example.com/in");
    let mut disabled = entry(2, 5);
    disabled["status"] = json!("disabled");
    let deleted = json!({"revision": 6, "id": id(3), "organisationId": ORG, "deleted": true});
    let a = sync
        .apply_page(&plan, &page(7, 5, true, vec![moved, disabled]), 10)
        .unwrap();
    assert!(!a.rebuild, "not before the catch-up ends");
    let b = sync
        .apply_page(&plan, &page(7, 7, false, vec![deleted, entry(4, 7)]), 20)
        .unwrap();
    assert!(b.rebuild);
    assert_eq!((a.upserted + b.upserted, a.removed + b.removed), (2, 2));
    assert_eq!(ids(&mut sync), [id(1), id(4)]);
    let rebuilt = sync.plan(&plan);
    let i = rebuilt.webhook_index(&id(1)).unwrap();
    assert_eq!(rebuilt.webhooks[i].url.authority, "moved.example.com");
    // A disabled webhook enabled again comes back.
    sync.apply_page(&plan, &page(8, 8, false, vec![entry(2, 8)]), 30)
        .unwrap();
    assert_eq!(ids(&mut sync), [id(1), id(2), id(4)]);
}

#[test]
fn an_entry_invalid_here_is_skipped_by_path_and_its_older_version_goes() {
    let plan = base();
    let mut sync = RegistrySync::new();
    sync.apply_page(&plan, &page(1, 1, false, vec![entry(1, 1)]), 0)
        .unwrap();
    let mut bad = entry(1, 2);
    bad["events"] = json!(["job.unknown"]);
    let applied = sync
        .apply_page(
            &plan,
            &page(3, 3, false, vec![bad, json!({"revision": 3, "id": "nope"})]),
            0,
        )
        .unwrap();
    let skipped: Vec<String> = applied.skipped.iter().map(ToString::to_string).collect();
    assert!(
        skipped[0].starts_with("changes[0].events[0]:"),
        "{skipped:?}"
    );
    assert!(skipped[1].starts_with("changes[1].id:"), "{skipped:?}");
    assert!(sync.is_empty(), "the superseded version does not stay");
}

#[test]
fn a_410_lists_again_keeping_the_old_copy_until_the_listing_ends_then_forgets_the_rest() {
    let plan = base();
    let mut sync = RegistrySync::new();
    sync.apply_page(&plan, &page(2, 2, false, vec![entry(1, 1), entry(2, 2)]), 0)
        .unwrap();
    sync.relist();
    assert!(sync.more());
    assert_eq!(sync.request_path("/f"), "/f?since=0");
    let partial = sync
        .apply_page(&plan, &page(50, 40, true, vec![entry(2, 40)]), 10)
        .unwrap();
    assert!(!partial.rebuild);
    assert_eq!(
        ids(&mut sync),
        [id(1), id(2)],
        "the old copy stays in force meanwhile"
    );
    let end = sync
        .apply_page(&plan, &page(50, 50, false, vec![entry(5, 50)]), 20)
        .unwrap();
    assert!(end.rebuild && !end.first);
    assert_eq!(end.forgotten, 1);
    assert_eq!(ids(&mut sync), [id(2), id(5)]);
    assert_eq!(sync.lag(), 0);
}

#[test]
fn pages_that_are_not_pages_or_break_the_cursor_change_nothing() {
    let plan = base();
    let mut sync = RegistrySync::new();
    sync.apply_page(&plan, &page(5, 5, false, vec![entry(1, 5)]), 0)
        .unwrap();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff{".to_vec(), "the page is not JSON"),
        (
            br#"{"webhooks": []}"#.to_vec(),
            "the answer is not a feed page (no \"more\")",
        ),
        (
            page(6, 4, false, vec![]),
            "broken cursor: asked for changes since 5, the page's next is 4",
        ),
        (
            page(6, 7, false, vec![]),
            "broken cursor: the page's next 7 is past its head",
        ),
        (
            page(9, 5, true, vec![]),
            "broken cursor: the page says more",
        ),
        (
            page(9, 9, false, vec![entry(2, 5)]),
            "broken cursor: changes[0] has revision 5",
        ),
        (
            page(9, 9, false, vec![entry(2, 8), entry(3, 7)]),
            "broken cursor: changes[1] has revision 7",
        ),
        (
            page(9, 9, false, vec![json!({"id": id(2)})]),
            "the answer is not a feed page (changes[0] has no revision)",
        ),
    ];
    for (body, expected) in bad {
        let err = sync.apply_page(&plan, &body, 10).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{expected}: {err}");
    }
    assert_eq!(sync.request_path("/f"), "/f?since=5");
    assert_eq!((sync.len(), sync.complete_ms()), (1, Some(0)));
}

#[test]
fn a_page_costs_what_it_holds_not_the_total() {
    let plan = base();
    let mut sync = RegistrySync::new();
    let all: Vec<Value> = (1..=5_000).map(|n| entry(n, u64::from(n))).collect();
    sync.apply_page(&plan, &page(5_000, 5_000, false, all), 0)
        .unwrap();
    assert_eq!(sync.len(), 5_000);
    // A catch-up of 50 one-entry pages changes the map 50 times and rebuilds once, at its end.
    for n in 0..50u64 {
        let more = n < 49;
        let applied = sync
            .apply_page(
                &plan,
                &page(5_050, 5_001 + n, more, vec![entry(1, 5_001 + n)]),
                n,
            )
            .unwrap();
        assert_eq!(applied.rebuild, !more);
    }
    assert_eq!(sync.len(), 5_000);
}
