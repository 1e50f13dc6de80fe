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
    let table = sync.table();
    let mut ids: Vec<String> = (0..table.slots())
        .filter_map(|s| table.get(s))
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
    assert!(!first.complete && sync.more());
    assert!(
        !sync.loaded() && sync.table().is_empty(),
        "nothing applies before the listing ends"
    );
    assert_eq!(sync.request_path("/f"), "/f?since=4");
    assert_eq!(sync.lag(), 9);
    let last = sync
        .apply_page(&plan, &page(9, 9, false, vec![entry(3, 9)]), 200)
        .unwrap();
    assert!(last.complete && last.first);
    assert!(sync.loaded() && !sync.more());
    assert_eq!(
        (sync.lag(), sync.complete_ms(), sync.table().len()),
        (0, Some(200), 3)
    );
    assert_eq!(ids(&mut sync), [id(1), id(2), id(3)]);
    // Nothing changed: one empty page.
    let empty = sync
        .apply_page(&plan, &page(9, 9, false, vec![]), 300)
        .unwrap();
    assert!(empty.complete && !empty.first && empty.upserted == 0 && empty.removed.is_empty());
    assert_eq!(sync.complete_ms(), Some(300));
}

#[test]
fn changes_replace_delete_and_disable_by_id_each_keeping_its_slot() {
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
    let slot_of_1 = sync.table().slot_of(&id(1)).unwrap();
    let a = sync
        .apply_page(&plan, &page(7, 5, true, vec![moved, disabled]), 10)
        .unwrap();
    assert_eq!(
        ids(&mut sync),
        [id(1), id(3)],
        "a page applies as it arrives"
    );
    let removed: Vec<String> = a.removed.iter().map(|(_, w)| w.id.clone()).collect();
    assert_eq!(removed, [id(2)]);
    let freed = a.removed[0].0;
    let b = sync
        .apply_page(&plan, &page(7, 7, false, vec![deleted, entry(4, 7)]), 20)
        .unwrap();
    assert_eq!(
        (a.upserted + b.upserted, a.removed.len() + b.removed.len()),
        (2, 2)
    );
    assert_eq!(ids(&mut sync), [id(1), id(4)]);
    let table = sync.table();
    assert_eq!(
        table.slot_of(&id(1)),
        Some(slot_of_1),
        "a changed webhook keeps its slot"
    );
    assert_eq!(
        table.get(slot_of_1).unwrap().url.authority,
        "moved.example.com"
    );
    assert_eq!(
        table.slot_of(&id(4)),
        Some(freed),
        "a slot emptied by an earlier page is reused"
    );
    assert_eq!(table.subscribers("job.completed", ORG).count(), 2);
    assert_eq!(table.subscribers("job.other", ORG).count(), 0);
    assert_eq!(table.subscribers("job.completed", "another").count(), 0);
    // A disabled webhook enabled again comes back.
    sync.apply_page(&plan, &page(8, 8, false, vec![entry(2, 8)]), 30)
        .unwrap();
    assert_eq!(ids(&mut sync), [id(1), id(2), id(4)]);
}

#[test]
fn a_slot_emptied_by_a_page_is_not_reused_by_the_same_page() {
    let plan = base();
    let mut sync = RegistrySync::new();
    sync.apply_page(&plan, &page(1, 1, false, vec![entry(1, 1)]), 0)
        .unwrap();
    let deleted = json!({"revision": 2, "id": id(1), "organisationId": ORG, "deleted": true});
    let applied = sync
        .apply_page(&plan, &page(3, 3, false, vec![deleted, entry(2, 3)]), 0)
        .unwrap();
    assert_ne!(sync.table().slot_of(&id(2)), Some(applied.removed[0].0));
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
    assert!(
        sync.table().is_empty(),
        "the superseded version does not stay"
    );
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
    let kept = sync.table().slot_of(&id(2));
    let partial = sync
        .apply_page(&plan, &page(50, 40, true, vec![entry(2, 40)]), 10)
        .unwrap();
    assert!(partial.removed.is_empty());
    assert_eq!(
        ids(&mut sync),
        [id(1), id(2)],
        "the old copy stays in force meanwhile"
    );
    let end = sync
        .apply_page(&plan, &page(50, 50, false, vec![entry(5, 50)]), 20)
        .unwrap();
    assert!(end.complete && !end.first);
    assert_eq!(end.forgotten, 1);
    assert_eq!(end.removed[0].1.id, id(1));
    assert_eq!(
        sync.table().slot_of(&id(2)),
        kept,
        "a webhook in both copies keeps its slot"
    );
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
    assert_eq!((sync.table().len(), sync.complete_ms()), (1, Some(0)));
}

#[test]
fn a_page_costs_what_it_holds_not_the_total() {
    let plan = base();
    let mut sync = RegistrySync::new();
    let all: Vec<Value> = (1..=5_000).map(|n| entry(n, u64::from(n))).collect();
    sync.apply_page(&plan, &page(5_000, 5_000, false, all), 0)
        .unwrap();
    assert_eq!(sync.table().len(), 5_000);
    // A change replaces its webhook in place: the table is not copied (nothing else holds it).
    let before = Rc::as_ptr(sync.table());
    for n in 0..50u64 {
        let more = n < 49;
        sync.apply_page(
            &plan,
            &page(5_050, 5_001 + n, more, vec![entry(1, 5_001 + n)]),
            n,
        )
        .unwrap();
    }
    assert_eq!(Rc::as_ptr(sync.table()), before);
    assert_eq!(sync.table().len(), 5_000);
}
