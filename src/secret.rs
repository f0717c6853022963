//! A string that must never reach a log, an error message or a response.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Holds a credential. `Debug` and `Display` print `***`, so a secret that slips into a
/// `tracing` field or a formatted error stays hidden; only `expose()` yields the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces every occurrence of each non-empty secret in `text` by `***`. Used on text that
/// comes from outside (daemon messages, URLs) before it is logged or returned.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(*s, "***");
    }
    out
}

/// A URL fit for a log line or a record kept for good: no credentials, no query or fragment
/// (which may carry tokens).
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("…"));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "<invalid url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2\"");
    }

    #[test]
    fn redact_replaces_every_occurrence() {
        assert_eq!(
            redact("a hunter2 b hunter2", &["hunter2", ""]),
            "a *** b ***"
        );
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        assert_eq!(
            redact_url("https://u:p@h/x.tgz?token=abc"),
            "https://h/x.tgz?%E2%80%A6"
        );
        assert_eq!(redact_url("https://h/x.tgz#token=abc"), "https://h/x.tgz");
    }
}
