//! Reading a request body as JSON, refusing duplicate keys. serde_json keeps the last of two equal keys, so
//! `{"url": "https://a", "url": "https://b"}` would mean one thing to a proxy or WAF in front that keeps the first,
//! and another to the registry.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::fmt;

/// Why a body is not a JSON document the registry reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON (the parser's message, with its line and column).
    Syntax(String),
    /// A key given twice in one object: its path, like `name` or `x.k`.
    DuplicateKey(String),
}

/// Parses `body` like `serde_json::from_slice`, but refuses an object holding the same key twice (keys compared
/// after unescaping, so `"n\u0061me"` is `"name"`).
pub fn parse_without_duplicate_keys(body: &[u8]) -> Result<Value, JsonError> {
    let walk = Walk::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = Strict { walk: &walk }
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    match (parsed, walk.duplicate.into_inner()) {
        (_, Some(path)) => Err(JsonError::DuplicateKey(path)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// One step from the document's root: an object's key or an array's index.
#[derive(Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// Where the reader is (a stack of steps, formatted as a path only when a duplicate is found: a hostile body
/// of deeply nested arrays would otherwise copy its path for every element), and the first duplicate key.
#[derive(Debug, Default)]
struct Walk {
    steps: RefCell<Vec<Step>>,
    duplicate: RefCell<Option<String>>,
}

impl Walk {
    /// The path of the steps taken and `last`, like `webhooks[2].url`.
    fn path_to(&self, last: &str) -> String {
        let mut path = String::new();
        for step in self.steps.borrow().iter() {
            match step {
                Step::Key(key) if path.is_empty() => path.push_str(key),
                Step::Key(key) => {
                    path.push('.');
                    path.push_str(key);
                }
                Step::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(last);
        path
    }
}

/// One value where `walk` says; records the first duplicate key it meets and stops there.
struct Strict<'a> {
    walk: &'a Walk,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            self.walk.steps.borrow_mut().push(Step::Index(items.len()));
            let item = seq.next_element_seed(Strict { walk: self.walk });
            self.walk.steps.borrow_mut().pop();
            match item? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                *self.walk.duplicate.borrow_mut() = Some(self.walk.path_to(&key));
                return Err(A::Error::custom("duplicate key"));
            }
            self.walk.steps.borrow_mut().push(Step::Key(key));
            let value = map.next_value_seed(Strict { walk: self.walk });
            let step = self.walk.steps.borrow_mut().pop();
            if let Some(Step::Key(key)) = step {
                object.insert(key, value?);
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests;
