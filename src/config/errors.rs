//! Configuration errors: what one says, how keys are kept out of it, and the sink that collects
//! every error of a configuration so that all are reported at once.

use std::fmt;

/// One configuration error: the JSON path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    /// Both parts are redacted: the path holds field names, and an unknown field's name is the
    /// user's text too.
    pub(super) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: redact_keys(&path.into()),
            message: redact_keys(&message.into()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Some messages quote what they were given (a bad status, event type, method, duration, …); a
/// key pasted into such a field must not be quoted back.
fn redact_keys(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(crate::signature::KEY_PREFIX) {
        let after = &rest[at + crate::signature::KEY_PREFIX.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
            .unwrap_or(after.len());
        out.push_str(&rest[..at]);
        out.push_str(if end == 0 {
            "whsec_"
        } else {
            "whsec_<redacted>"
        });
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Collects the errors of one configuration; readers and compilers push to it and carry on, so
/// that one pass reports every error.
#[derive(Debug, Default)]
pub(super) struct Errors {
    list: Vec<ConfigError>,
}

/// A point in an [`Errors`], to ask whether anything went wrong since.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark(usize);

impl Errors {
    /// Records that the field at `path` is wrong.
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError::new(path, message));
    }

    pub(super) fn mark(&self) -> Mark {
        Mark(self.list.len())
    }

    /// No error was recorded after `mark`.
    pub(super) fn clean_since(&self, mark: Mark) -> bool {
        self.list.len() == mark.0
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn into_vec(self) -> Vec<ConfigError> {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::redact_keys;

    #[test]
    fn every_key_in_a_message_is_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_keys("\"whsec_MfKQ9r8+/=\" and whsec_abc, whsec_"),
            "\"whsec_<redacted>\" and whsec_<redacted>, whsec_"
        );
        assert_eq!(redact_keys("no key here"), "no key here");
        assert_eq!(redact_keys("héllo whsec_é"), "héllo whsec_é");
    }
}
