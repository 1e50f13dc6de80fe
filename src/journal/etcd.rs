//! The etcd v3 JSON gateway, as far as the journal uses it: request bodies and the parsing of
//! answers. Keys and values travel as base64; 64-bit numbers come back as JSON strings. Every
//! answer is treated as hostile: anything unexpected is an [`EtcdError`], never a panic.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

pub const PUT: &str = "/v3/kv/put";
pub const RANGE: &str = "/v3/kv/range";
pub const DELETE_RANGE: &str = "/v3/kv/deleterange";
pub const TXN: &str = "/v3/kv/txn";
pub const LEASE_GRANT: &str = "/v3/lease/grant";
pub const LEASE_KEEPALIVE: &str = "/v3/lease/keepalive";

/// etcd's default `--max-request-bytes` (1.5 MiB). A record whose key and value come near it is
/// not journaled: etcd would refuse the put.
pub const MAX_REQUEST_BYTES: usize = 1_572_864;
/// What a request carries besides the key and value (protobuf framing, the lease, a compare).
pub const REQUEST_OVERHEAD_BYTES: usize = 4096;
/// etcd's default `--max-txn-ops`: the most operations one `txn` may hold.
pub const MAX_TXN_OPS: usize = 128;
/// What one operation of a `txn` carries besides its key and value (its protobuf framing).
pub const TXN_OP_OVERHEAD_BYTES: usize = 32;

/// Why an answer is not what the journal asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdError(pub String);

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(why: impl Into<String>) -> Result<T, EtcdError> {
    Err(EtcdError(why.into()))
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

fn body(value: Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// `put` of `key`, tied to `lease` when given.
pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Vec<u8> {
    let mut req = Map::new();
    req.insert("key".into(), b64(key).into());
    req.insert("value".into(), b64(value).into());
    if let Some(lease) = lease {
        req.insert("lease".into(), lease.to_string().into());
    }
    body(Value::Object(req))
}

/// `range` over the keys from `from` up to (not including) `end`, at most `limit` of them.
pub fn range(from: &[u8], end: &[u8], limit: u64, keys_only: bool) -> Vec<u8> {
    let mut req = Map::new();
    req.insert("key".into(), b64(from).into());
    req.insert("range_end".into(), b64(end).into());
    req.insert("limit".into(), limit.to_string().into());
    if keys_only {
        req.insert("keys_only".into(), true.into());
    }
    body(Value::Object(req))
}

/// `range` over every key that starts with `prefix`.
pub fn range_prefix(prefix: &[u8], limit: u64, keys_only: bool) -> Vec<u8> {
    range(prefix, &prefix_end(prefix), limit, keys_only)
}

/// `deleterange` of one key.
pub fn delete(key: &[u8]) -> Vec<u8> {
    body(json!({ "key": b64(key) }))
}

/// The `txn` that claims an orphaned record: if the old owner's lease key is absent and the
/// record was not changed since it was read, the record moves to `new_key`.
pub fn claim(
    owner_lease_key: &[u8],
    record_key: &[u8],
    mod_revision: i64,
    new_key: &[u8],
    value: &[u8],
) -> Vec<u8> {
    body(json!({
        "compare": [
            { "key": b64(owner_lease_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" },
            { "key": b64(record_key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision.to_string() },
        ],
        "success": [
            { "request_put": { "key": b64(new_key), "value": b64(value) } },
            { "request_delete_range": { "key": b64(record_key) } },
        ],
        "failure": [],
    }))
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

impl TxnOp {
    /// What the operation weighs against etcd's request limit.
    pub fn weight(&self) -> usize {
        match self {
            TxnOp::Put { key, value } => key.len() + value.len() + TXN_OP_OVERHEAD_BYTES,
            TxnOp::Delete { key } => key.len() + TXN_OP_OVERHEAD_BYTES,
        }
    }
}

/// A `txn` without compares that applies every write at once (etcd refuses one that names a
/// key twice: the batcher never does). Written straight out: a batch carries many records, each
/// base64 once, with no JSON tree in between.
pub fn txn(ops: &[TxnOp]) -> Vec<u8> {
    let size: usize = ops.iter().map(|op| op.weight() * 4 / 3 + 48).sum();
    let mut out = String::with_capacity(64 + size);
    out.push_str(r#"{"compare":[],"success":["#);
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match op {
            TxnOp::Put { key, value } => {
                out.push_str(r#"{"request_put":{"key":""#);
                B64.encode_string(key, &mut out);
                out.push_str(r#"","value":""#);
                B64.encode_string(value, &mut out);
                out.push_str(r#""}}"#);
            }
            TxnOp::Delete { key } => {
                out.push_str(r#"{"request_delete_range":{"key":""#);
                B64.encode_string(key, &mut out);
                out.push_str(r#""}}"#);
            }
        }
    }
    out.push_str(r#"],"failure":[]}"#);
    out.into_bytes()
}

/// A `txn` without compares that reads each of `keys` (a `request_range` of one key each): the
/// records paged back in, in one request.
pub fn txn_reads(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out =
        String::with_capacity(64 + keys.iter().map(|k| k.len() * 4 / 3 + 40).sum::<usize>());
    out.push_str(r#"{"compare":[],"success":["#);
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"request_range":{"key":""#);
        B64.encode_string(key, &mut out);
        out.push_str(r#""}}"#);
    }
    out.push_str(r#"],"failure":[]}"#);
    out.into_bytes()
}

/// The answer to [`txn_reads`]: per key asked, in order, its value and whether it exists.
/// An answer with fewer responses than keys asked is an error.
pub fn parse_txn_reads(answer: &[u8], asked: usize) -> Result<Vec<Option<Kv>>, EtcdError> {
    let map = object(answer)?;
    let items = match map.get("responses") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return err("responses is not an array"),
    };
    if items.len() != asked {
        return err(format!("{} responses to {asked} reads", items.len()));
    }
    let mut out = Vec::with_capacity(asked);
    for item in items {
        let Some(range) = item.get("response_range") else {
            return err("a response is not a range");
        };
        let answer = serde_json::to_vec(range).or_else(|_| err("a range answer"))?;
        out.push(parse_range(&answer)?.kvs.into_iter().next());
    }
    Ok(out)
}

/// `lease/grant`: etcd picks the id.
pub fn lease_grant(ttl_seconds: u64) -> Vec<u8> {
    body(json!({ "TTL": ttl_seconds.to_string(), "ID": "0" }))
}

/// `lease/keepalive` of one lease.
pub fn lease_keepalive(id: i64) -> Vec<u8> {
    body(json!({ "ID": id.to_string() }))
}

/// One key of a `range` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeAnswer {
    pub kvs: Vec<Kv>,
    /// More keys match than `limit` let through.
    pub more: bool,
}

/// A 64-bit number as the gateway writes it: a JSON string (or, to be lenient, a number).
fn int(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn bytes_field(kv: &Map<String, Value>, name: &str) -> Result<Vec<u8>, EtcdError> {
    match kv.get(name) {
        // The gateway leaves empty fields out.
        None => Ok(Vec::new()),
        Some(Value::String(s)) => B64
            .decode(s)
            .or_else(|_| err(format!("{name} is not base64"))),
        Some(_) => err(format!("{name} is not a string")),
    }
}

/// The answer's JSON object, or why not. An `error` (or gRPC `code`) field is a failure.
fn object(answer: &[u8]) -> Result<Map<String, Value>, EtcdError> {
    let value: Value = match serde_json::from_slice(answer) {
        Ok(v) => v,
        Err(_) => return err("answer is not JSON"),
    };
    let Value::Object(map) = value else {
        return err("answer is not a JSON object");
    };
    if let Some(e) = map.get("error").or_else(|| map.get("message")) {
        let text = e.as_str().unwrap_or("(not a string)");
        return err(format!("etcd error: {}", preview(text)));
    }
    Ok(map)
}

/// At most 200 characters of a text from a peer, for a log line.
pub fn preview(text: &str) -> String {
    let mut out: String = text.chars().take(200).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Whether a `put`, `deleterange` or `lease/grant`-less request went through.
pub fn parse_ok(answer: &[u8]) -> Result<(), EtcdError> {
    object(answer).map(|_| ())
}

pub fn parse_range(answer: &[u8]) -> Result<RangeAnswer, EtcdError> {
    let map = object(answer)?;
    let kvs = match map.get("kvs") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            let mut kvs = Vec::with_capacity(items.len());
            for item in items {
                let Value::Object(kv) = item else {
                    return err("kvs holds something that is not an object");
                };
                let key = bytes_field(kv, "key")?;
                if key.is_empty() {
                    return err("a key is missing");
                }
                kvs.push(Kv {
                    key,
                    value: bytes_field(kv, "value")?,
                    mod_revision: int(kv.get("mod_revision")).unwrap_or(0),
                });
            }
            kvs
        }
        Some(_) => return err("kvs is not an array"),
    };
    let more = matches!(map.get("more"), Some(Value::Bool(true)));
    Ok(RangeAnswer { kvs, more })
}

/// Whether a `txn`'s compares held.
pub fn parse_txn(answer: &[u8]) -> Result<bool, EtcdError> {
    let map = object(answer)?;
    match map.get("succeeded") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => err("succeeded is not a boolean"),
    }
}

/// A granted lease: its id and TTL in seconds.
pub fn parse_lease_grant(answer: &[u8]) -> Result<(i64, i64), EtcdError> {
    let map = object(answer)?;
    let id = int(map.get("ID")).filter(|&id| id != 0);
    let ttl = int(map.get("TTL")).unwrap_or(0);
    match id {
        Some(id) if ttl > 0 => Ok((id, ttl)),
        _ => err("lease grant answer without an ID and a TTL"),
    }
}

/// The TTL left after a keepalive; 0 when etcd no longer knows the lease. The gateway streams
/// the answer, each message wrapped in `result`.
pub fn parse_keepalive(answer: &[u8]) -> Result<i64, EtcdError> {
    // A stream may hold several messages, one per line: the first is the answer.
    let first = answer
        .split(|&b| b == b'\n')
        .find(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
        .unwrap_or(answer);
    let map = object(first)?;
    let inner = match map.get("result") {
        Some(Value::Object(result)) => result,
        Some(_) => return err("result is not an object"),
        None => &map,
    };
    Ok(int(inner.get("TTL")).unwrap_or(0).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("request is JSON")
    }

    fn unb64(v: &Value) -> Vec<u8> {
        B64.decode(v.as_str().expect("string")).expect("base64")
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn requests_carry_base64_keys_and_string_numbers() {
        let p = decoded(&put(b"k/1", b"\x00\xff", Some(7)));
        assert_eq!(unb64(&p["key"]), b"k/1");
        assert_eq!(unb64(&p["value"]), b"\x00\xff");
        assert_eq!(p["lease"], "7");
        assert!(decoded(&put(b"k", b"v", None)).get("lease").is_none());

        let r = decoded(&range_prefix(b"p/records/", 16, true));
        assert_eq!(unb64(&r["key"]), b"p/records/");
        assert_eq!(unb64(&r["range_end"]), b"p/records0");
        assert_eq!(r["limit"], "16");
        assert_eq!(r["keys_only"], true);

        assert_eq!(unb64(&decoded(&delete(b"x"))["key"]), b"x");
        assert_eq!(decoded(&lease_grant(15))["TTL"], "15");
        assert_eq!(decoded(&lease_keepalive(-3))["ID"], "-3");
    }

    #[test]
    fn the_claim_compares_the_lease_key_and_the_revision() {
        let t = decoded(&claim(
            b"p/alive/a",
            b"p/records/a/e",
            42,
            b"p/records/b/e",
            b"v",
        ));
        let compare = t["compare"].as_array().expect("compare");
        assert_eq!(unb64(&compare[0]["key"]), b"p/alive/a");
        assert_eq!(compare[0]["target"], "CREATE");
        assert_eq!(compare[0]["create_revision"], "0");
        assert_eq!(compare[1]["target"], "MOD");
        assert_eq!(compare[1]["mod_revision"], "42");
        let success = t["success"].as_array().expect("success");
        assert_eq!(unb64(&success[0]["request_put"]["key"]), b"p/records/b/e");
        assert_eq!(unb64(&success[0]["request_put"]["value"]), b"v");
        assert_eq!(
            unb64(&success[1]["request_delete_range"]["key"]),
            b"p/records/a/e"
        );
    }

    #[test]
    fn a_batch_is_one_txn_of_puts_and_deletes() {
        let ops = [
            TxnOp::Put {
                key: b"p/records/a/1".to_vec(),
                value: b"\x00v".to_vec(),
            },
            TxnOp::Delete {
                key: b"p/records/a/2".to_vec(),
            },
        ];
        let t = decoded(&txn(&ops));
        assert_eq!(t["compare"], json!([]));
        let success = t["success"].as_array().expect("success");
        assert_eq!(success.len(), 2);
        assert_eq!(unb64(&success[0]["request_put"]["key"]), b"p/records/a/1");
        assert_eq!(unb64(&success[0]["request_put"]["value"]), b"\x00v");
        assert_eq!(
            unb64(&success[1]["request_delete_range"]["key"]),
            b"p/records/a/2"
        );
        assert_eq!(ops[0].weight(), 13 + 2 + TXN_OP_OVERHEAD_BYTES);
        assert_eq!(ops[1].weight(), 13 + TXN_OP_OVERHEAD_BYTES);
    }

    #[test]
    fn range_answers_are_read_with_care() {
        let ok = br#"{"header":{"revision":"9"},"kvs":[{"key":"YS9i","create_revision":"3","mod_revision":"5","version":"1","value":"dg=="},{"key":"YS9j","mod_revision":6}],"more":true,"count":"5"}"#;
        let r = parse_range(ok).expect("valid");
        assert_eq!(r.kvs.len(), 2);
        assert_eq!(r.kvs[0].key, b"a/b");
        assert_eq!(r.kvs[0].value, b"v");
        assert_eq!(r.kvs[0].mod_revision, 5);
        assert_eq!(r.kvs[1].value, b"");
        assert_eq!(r.kvs[1].mod_revision, 6);
        assert!(r.more);
        assert_eq!(
            parse_range(br#"{"header":{}}"#).expect("empty"),
            RangeAnswer::default()
        );
        for hostile in [
            &b""[..],
            b"\xff\xfe",
            b"[1,2]",
            br#"{"kvs":"x"}"#,
            br#"{"kvs":[1]}"#,
            br#"{"kvs":[{"key":"!!"}]}"#,
            br#"{"kvs":[{"value":"dg=="}]}"#,
            br#"{"kvs":[{"key":5}]}"#,
            br#"{"error":"etcdserver: request timed out","code":14}"#,
            br#"{"kvs":[{"key":"YQ==""#,
        ] {
            assert!(parse_range(hostile).is_err(), "{:?}", hostile);
        }
    }

    #[test]
    fn txn_lease_and_keepalive_answers() {
        assert_eq!(parse_txn(br#"{"header":{},"succeeded":true}"#), Ok(true));
        // The gateway leaves out a false boolean.
        assert_eq!(parse_txn(br#"{"header":{}}"#), Ok(false));
        assert!(parse_txn(br#"{"succeeded":"yes"}"#).is_err());
        assert_eq!(
            parse_lease_grant(br#"{"header":{},"ID":"7587883","TTL":"15"}"#),
            Ok((7_587_883, 15))
        );
        assert!(parse_lease_grant(br#"{"ID":"0","TTL":"15"}"#).is_err());
        assert!(parse_lease_grant(br#"{"ID":"1"}"#).is_err());
        assert_eq!(
            parse_keepalive(br#"{"result":{"header":{},"ID":"1","TTL":"15"}}"#),
            Ok(15)
        );
        // An expired lease: etcd answers with no TTL.
        assert_eq!(
            parse_keepalive(br#"{"result":{"header":{},"ID":"1"}}"#),
            Ok(0)
        );
        assert_eq!(
            parse_keepalive(b"{\"result\":{\"TTL\":\"4\"}}\n{\"result\":{\"TTL\":\"3\"}}\n"),
            Ok(4)
        );
        assert!(parse_keepalive(br#"{"error":"x"}"#).is_err());
        assert!(parse_ok(b"not json").is_err());
        assert!(parse_ok(br#"{"header":{"revision":"3"}}"#).is_ok());
    }

    #[test]
    fn previews_are_short_and_printable() {
        assert_eq!(preview("a\nb"), "a?b");
        assert_eq!(preview(&"x".repeat(300)).chars().count(), 201);
    }
}
