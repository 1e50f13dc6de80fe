//! The JSON reader: walks a `serde_json::Value` by hand so that every error carries the exact
//! path of its field, unknown fields are errors, and all errors are reported at once.

use super::errors::Errors;
use serde_json::{Map, Value};

/// One JSON object being read: its fields by name, its path, and where errors go.
pub(super) struct Fields<'v, 'e> {
    pub(super) map: &'v Map<String, Value>,
    at: String,
    pub(super) errors: &'e mut Errors,
}

pub(super) fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// Starts reading `value` as an object with exactly the `known` fields; unknown fields are errors.
pub(super) fn fields<'v, 'e>(
    value: &'v Value,
    at: &str,
    known: &[&str],
    errors: &'e mut Errors,
) -> Option<Fields<'v, 'e>> {
    let Value::Object(map) = value else {
        errors.push(at_or_root(at), "must be a JSON object");
        return None;
    };
    for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
        let expected = known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(
            join(at, key),
            format!("unknown field (expected one of {expected})"),
        );
    }
    Some(Fields {
        map,
        at: at.to_string(),
        errors,
    })
}

fn at_or_root(at: &str) -> &str {
    if at.is_empty() {
        "configuration"
    } else {
        at
    }
}

/// What a value is, for error messages: numbers and booleans as themselves, the rest by kind (a
/// string may hold a key, so it is never echoed).
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl<'v> Fields<'v, '_> {
    fn path(&self, key: &str) -> String {
        join(&self.at, key)
    }

    pub(super) fn fail(&mut self, key: &str, message: impl Into<String>) {
        let path = self.path(key);
        self.errors.push(path, message);
    }

    /// A field's value; `null` counts as absent.
    pub(super) fn get(&self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn required(&mut self, key: &str) -> Option<&'v Value> {
        let value = self.get(key);
        if value.is_none() {
            self.fail(key, "missing required field");
        }
        value
    }

    pub(super) fn typed<T>(
        &mut self,
        key: &str,
        value: Option<&'v Value>,
        want: &str,
        read: impl Fn(&'v Value) -> Option<T>,
    ) -> Option<T> {
        let value = value?;
        let got = read(value);
        if got.is_none() {
            self.fail(key, format!("must be {want}, not {}", kind(value)));
        }
        got
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        let value = self.required(key);
        self.typed(key, value, "a string", |v| v.as_str().map(str::to_string))
    }

    pub(super) fn opt_string(&mut self, key: &str) -> Option<String> {
        let value = self.get(key);
        self.typed(key, value, "a string", |v| v.as_str().map(str::to_string))
    }

    /// None when absent or of the wrong type (then with an error); the caller picks the default.
    pub(super) fn opt_bool(&mut self, key: &str) -> Option<bool> {
        let value = self.get(key);
        self.typed(key, value, "true or false", Value::as_bool)
    }

    pub(super) fn opt_u64(&mut self, key: &str) -> Option<u64> {
        let value = self.get(key);
        self.typed(key, value, "a whole number", Value::as_u64)
    }

    pub(super) fn required_array(&mut self, key: &str) -> Option<&'v Vec<Value>> {
        let value = self.required(key);
        self.typed(key, value, "an array", Value::as_array)
    }

    pub(super) fn opt_array(&mut self, key: &str) -> Option<&'v Vec<Value>> {
        let value = self.get(key);
        self.typed(key, value, "an array", Value::as_array)
    }

    /// An array of strings; each bad element is named by its index.
    pub(super) fn strings(&mut self, key: &str, value: Option<&'v Value>) -> Option<Vec<String>> {
        let items = self.typed(key, value, "an array", Value::as_array)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) => out.push(s.to_string()),
                None => self.fail(
                    &format!("{key}[{i}]"),
                    format!("must be a string, not {}", kind(item)),
                ),
            }
        }
        (out.len() == items.len()).then_some(out)
    }
}
