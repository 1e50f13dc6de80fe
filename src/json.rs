//! A response body as JSON, looked into without building a tree where that is exact.
//!
//! Most bodies are read as their raw text: checked once for being JSON, then each pointer (a
//! condition, the organisation, the object) is followed by scanning, and the object is handed on
//! as its own bytes, so the envelope can splice it in instead of re-serialising it. A body with a
//! `\u` escape anywhere is parsed into a `serde_json::Value` instead: only that parse checks that
//! escapes form valid Unicode (a raw scan does not), so such a body is judged exactly as before.

use serde::de::IgnoredAny;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// The text of one JSON value of a body that serde_json accepted, without surrounding whitespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawJson<'a>(&'a str);

impl<'a> RawJson<'a> {
    pub fn get(&self) -> &'a str {
        self.0
    }
}

/// A parsed body.
#[derive(Debug, Clone, Copy)]
pub enum Document<'a> {
    Raw(RawJson<'a>),
    Tree(&'a Value),
}

impl<'a> From<&'a Value> for Document<'a> {
    fn from(value: &'a Value) -> Self {
        Document::Tree(value)
    }
}

/// A value a pointer found in a [`Document`].
#[derive(Debug, Clone, Copy)]
pub enum Found<'a> {
    Raw(RawJson<'a>),
    Tree(&'a Value),
}

/// An object found in a body: its raw text, or a map of the tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Object<'a> {
    Raw(RawJson<'a>),
    Tree(&'a Map<String, Value>),
}

/// Parses `bytes`. A plain body (see [`plain`]) that is JSON is read raw; any other goes through
/// serde_json's tree (into `tree`, which the document borrows), which also gives the error.
pub fn parse<'a>(bytes: &'a [u8], tree: &'a mut Option<Value>) -> Result<Document<'a>, String> {
    if plain(bytes) {
        if let Ok(text) = std::str::from_utf8(bytes) {
            if serde_json::from_slice::<IgnoredAny>(bytes).is_ok() {
                return Ok(Document::Raw(RawJson(trim_ws(text))));
            }
        }
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(Document::Tree(tree.insert(value)))
}

/// Whether a body holds nothing that serde_json's scan (which checks the grammar and nothing
/// more) would let pass where its tree would not, or would read differently: no `\u` escape (a
/// tree checks surrogate pairs), no number with an exponent and no digit run longer than 300 (a
/// tree refuses numbers beyond f64).
fn plain(bytes: &[u8]) -> bool {
    let (mut in_string, mut escaped, mut digits) = (false, false, 0usize);
    let mut previous = 0u8;
    for &b in bytes {
        if in_string {
            if escaped {
                if b == b'u' {
                    return false;
                }
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            digits = 0;
        } else if b.is_ascii_digit() {
            digits += 1;
            if digits > 300 {
                return false;
            }
        } else {
            if (b == b'e' || b == b'E') && previous.is_ascii_digit() {
                return false;
            }
            digits = 0;
        }
        previous = b;
    }
    true
}

/// The text without JSON whitespace around it.
fn trim_ws(text: &str) -> &str {
    let s = text.as_bytes();
    let start = skip_ws(s, 0);
    let mut end = s.len();
    while end > start
        && s.get(end - 1)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        end -= 1;
    }
    text.get(start..end).unwrap_or_default()
}

impl<'a> Document<'a> {
    /// Follows an RFC 6901 pointer, as `serde_json::Value::pointer` does (the last of repeated
    /// keys counts, array indexes without leading zeros).
    pub fn pointer(&self, pointer: &str) -> Option<Found<'a>> {
        match *self {
            Document::Tree(value) => value.pointer(pointer).map(Found::Tree),
            Document::Raw(raw) => {
                if pointer.is_empty() {
                    return Some(Found::Raw(raw));
                }
                let mut at = raw;
                for token in pointer.strip_prefix('/')?.split('/') {
                    let token = token.replace("~1", "/").replace("~0", "~");
                    at = match at.0.as_bytes().first()? {
                        b'{' => member(at, &token)?,
                        b'[' => element(at, array_index(&token)?)?,
                        _ => return None,
                    };
                }
                Some(Found::Raw(at))
            }
        }
    }
}

impl<'a> Found<'a> {
    /// The value as a tree (parsed for a raw one).
    pub fn to_value(&self) -> Option<Value> {
        match self {
            Found::Tree(v) => Some((*v).clone()),
            Found::Raw(raw) => serde_json::from_slice(raw.0.as_bytes()).ok(),
        }
    }

    /// The value when it is a string.
    pub fn as_string(&self) -> Option<String> {
        match self {
            Found::Tree(v) => v.as_str().map(str::to_string),
            Found::Raw(raw) => key_text(raw.0).map(Cow::into_owned),
        }
    }

    /// The value when it is an object.
    pub fn as_object(&self) -> Option<Object<'a>> {
        match *self {
            Found::Tree(v) => v.as_object().map(Object::Tree),
            Found::Raw(raw) if raw.0.starts_with('{') => Some(Object::Raw(raw)),
            Found::Raw(_) => None,
        }
    }
}

/// Whether splicing a raw object into the envelope is exact: none of its keys is `objectType`
/// (which the envelope sets) and none appears twice (a tree keeps only the last).
pub fn spliceable(object: RawJson<'_>) -> bool {
    let mut keys: Vec<Cow<'_, str>> = Vec::new();
    let complete = members(object, |key, _| {
        keys.push(key);
    });
    // Repeats are looked for pairwise: an object with more keys than that goes through the tree.
    if complete.is_none() || keys.len() > SPLICE_MAX_KEYS || keys.iter().any(|k| k == "objectType")
    {
        return false;
    }
    keys.iter()
        .enumerate()
        .all(|(i, k)| keys.get(i + 1..).is_some_and(|rest| !rest.contains(k)))
}

/// The most keys a spliced object may have (repeats are looked for pairwise).
const SPLICE_MAX_KEYS: usize = 64;

/// An array index as RFC 6901 (and serde_json) read it: digits, no leading zero, no sign.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

// The scanner below only walks text serde_json accepted (its grammar checked): it finds where
// values start and end. It still never indexes out of bounds: anything unexpected is None.

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while s
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The end (exclusive) of the value starting at `i`.
fn value_end(s: &[u8], i: usize) -> Option<usize> {
    match s.get(i)? {
        b'"' => string_end(s, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match s.get(j)? {
                    b'"' => {
                        j = string_end(s, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while s
                .get(j)
                .is_some_and(|b| !matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The end (exclusive, after the closing quote) of the string starting at `i`.
fn string_end(s: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match s.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// A JSON string's text: borrowed when it has no escapes.
fn key_text(quoted: &str) -> Option<Cow<'_, str>> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        // Through a Value: reading a String directly would bring serde's type error, whose
        // message can print a float, and with it core's float printing (about 20 KB of .wasm).
        match serde_json::from_slice(quoted.as_bytes()) {
            Ok(Value::String(text)) => Some(Cow::Owned(text)),
            _ => None,
        }
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// Calls `each` with every member of an object, in order; None if the text is not one.
fn members<'a>(object: RawJson<'a>, mut each: impl FnMut(Cow<'a, str>, RawJson<'a>)) -> Option<()> {
    let text = object.0;
    let s = text.as_bytes();
    let mut i = skip_ws(s, 1);
    if s.first()? != &b'{' {
        return None;
    }
    if s.get(i)? == &b'}' {
        return Some(());
    }
    loop {
        let key_end = string_end(s, i)?;
        let key = key_text(text.get(i..key_end)?)?;
        i = skip_ws(s, key_end);
        (s.get(i)? == &b':').then_some(())?;
        let start = skip_ws(s, i + 1);
        let end = value_end(s, start)?;
        each(key, RawJson(text.get(start..end)?));
        i = skip_ws(s, end);
        match s.get(i)? {
            b',' => i = skip_ws(s, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// The member `key` of an object (the last, if repeated).
fn member<'a>(object: RawJson<'a>, key: &str) -> Option<RawJson<'a>> {
    let mut found = None;
    members(object, |k, v| {
        if k == key {
            found = Some(v);
        }
    })?;
    found
}

/// Element `index` of an array.
fn element(array: RawJson<'_>, index: usize) -> Option<RawJson<'_>> {
    let text = array.0;
    let s = text.as_bytes();
    let mut i = skip_ws(s, 1);
    if s.get(i)? == &b']' {
        return None;
    }
    let mut n = 0;
    loop {
        let end = value_end(s, i)?;
        if n == index {
            return Some(RawJson(text.get(i..end)?));
        }
        i = skip_ws(s, end);
        match s.get(i)? {
            b',' => i = skip_ws(s, i + 1),
            _ => return None,
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Document<'_> {
        let mut slot = None;
        assert!(
            matches!(parse(text.as_bytes(), &mut slot), Ok(Document::Raw(_))),
            "{text} is not read raw"
        );
        Document::Raw(RawJson(trim_ws(text)))
    }

    fn both(text: &str, pointer: &str) -> (Option<Value>, Option<Value>) {
        let tree: Value = serde_json::from_str(text).unwrap();
        (
            raw(text).pointer(pointer).and_then(|f| f.to_value()),
            Document::Tree(&tree)
                .pointer(pointer)
                .and_then(|f| f.to_value()),
        )
    }

    #[test]
    fn pointers_agree_with_serde_json() {
        let text = r#"{"a":{"b":[10,{"c":"x"},[]],"a/b":1,"m~n":2,"":3},"d":1,"d":2,"e":null, "f" : { "g" : true } }"#;
        for pointer in [
            "",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c",
            "/a/b/2",
            "/a/b/3",
            "/a/b/01",
            "/a/b/+1",
            "/a/b/-",
            "/a/a~1b",
            "/a/m~0n",
            "/a/",
            "/d",
            "/e",
            "/f/g",
            "/x",
            "/a/b/1/c/d",
            "a",
            "/e/0",
        ] {
            let (raw, tree) = both(text, pointer);
            assert_eq!(raw, tree, "{pointer}");
        }
    }

    #[test]
    fn strings_and_objects() {
        let doc = raw(r#"{"s":"a\"b","n":1,"o":{"k":1},"l":[]}"#);
        assert_eq!(
            doc.pointer("/s").unwrap().as_string().as_deref(),
            Some("a\"b")
        );
        assert_eq!(doc.pointer("/n").unwrap().as_string(), None);
        assert!(doc.pointer("/o").unwrap().as_object().is_some());
        assert!(doc.pointer("/l").unwrap().as_object().is_none());
    }

    #[test]
    fn unicode_escapes_are_parsed_as_a_tree_and_bad_ones_refused() {
        let mut slot = None;
        assert!(matches!(
            parse(br#"{"a":"\u00e9"}"#, &mut slot),
            Ok(Document::Tree(_))
        ));
        let mut slot = None;
        assert!(parse(br#"{"a":"\ud800"}"#, &mut slot).is_err());
        let mut slot = None;
        assert!(matches!(
            parse(br#" {"a":"\n"} "#, &mut slot),
            Ok(Document::Raw(_))
        ));
        let mut slot = None;
        assert!(parse(b"{\"a\":1} x", &mut slot).is_err());
        let mut slot = None;
        assert!(parse(b"{\"a\":\"\xff\"}", &mut slot).is_err());
    }

    #[test]
    fn spliceable_objects_have_distinct_keys_and_no_object_type() {
        for (text, want) in [
            (r#"{}"#, true),
            (r#"{"a":1,"b":{"a":1}}"#, true),
            (r#"{"a":1,"a":2}"#, false),
            (r#"{"objectType":"x"}"#, false),
            (r#"{"a":{"objectType":"x"}}"#, true),
        ] {
            let Document::Raw(object) = raw(text) else {
                unreachable!()
            };
            assert_eq!(spliceable(object), want, "{text}");
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                (-1000.0f64..1000.0).prop_map(Value::from),
                "[a-c/~\\\\\"\\n é]{0,4}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec(("[a-c/~\\\\\"]{0,2}", inner), 0..4)
                        .prop_map(|kv| { Value::Object(kv.into_iter().collect()) }),
                ]
            })
        }

        fn pointer() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    "[a-c]{0,2}",
                    "[0-3]",
                    Just("a~1b".to_string()),
                    Just("~0".to_string())
                ],
                0..4,
            )
            .prop_map(|tokens| tokens.iter().map(|t| format!("/{t}")).collect())
        }

        proptest! {
            /// Raw pointers find what serde_json's tree finds, in compact and spaced text.
            #[test]
            fn raw_pointers_agree_with_the_tree(v in json_value(), p in pointer(), pretty in any::<bool>()) {
                let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
                let mut slot = None;
                let doc = parse(text.as_bytes(), &mut slot).unwrap();
                // The tree as serde_json reads the text back (its float parsing rounds).
                let v: Value = serde_json::from_str(&text).unwrap();
                let got = doc.pointer(&p).and_then(|f| f.to_value());
                prop_assert_eq!(got, v.pointer(&p).cloned(), "{} at {}", text, p);
                let s = doc.pointer(&p).and_then(|f| f.as_string());
                prop_assert_eq!(s, v.pointer(&p).and_then(Value::as_str).map(str::to_string));
            }
        }
    }
}
