//! Status callbacks to controller-api: `POST {callback}` with the legacy body, retried with
//! exponential backoff for a bounded time. Delivery never blocks or fails a build: callers
//! run it beside the build and record success in their own state.

use crate::secret::Secret;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("callback to {url} gave up after {attempts} attempts over {elapsed:?}: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
}

/// The legacy body. Field order matters to byte-for-byte clients.
#[derive(Debug, Serialize, PartialEq)]
pub struct CallbackBody {
    pub id: u64,
    pub status: &'static str,
    pub building: bool,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl CallbackBody {
    pub fn new(build_number: u64, status: &'static str) -> Self {
        Self {
            id: build_number,
            status,
            building: false,
            kind: "buildshuttle",
        }
    }
}

/// Sends callbacks. Cheap to clone (one shared connection pool).
#[derive(Clone, Debug)]
pub struct Callbacks {
    client: reqwest::Client,
    retry_for: Duration,
    first_delay: Duration,
}

impl Callbacks {
    pub fn new(retry_for: Duration) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self {
            client,
            retry_for,
            first_delay: Duration::from_millis(500),
        }
    }

    /// Delivers `status` for `build_number` to `url`. 2xx is delivered; anything else is
    /// retried (doubling delay, capped at 30 s) until `retry_for` has passed.
    pub async fn deliver(
        &self,
        url: &str,
        auth: Option<&Secret>,
        build_number: u64,
        status: &'static str,
    ) -> Result<(), CallbackError> {
        let body = CallbackBody::new(build_number, status);
        let started = tokio::time::Instant::now();
        let mut delay = self.first_delay;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut req = self.client.post(url).json(&body);
            if let Some(auth) = auth {
                req = req.header(reqwest::header::AUTHORIZATION, auth.expose());
            }
            let last = match req.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => format!("HTTP {}", resp.status()),
                // Without the URL: a URL may carry a token in its query.
                Err(e) => describe_reqwest_error(e),
            };
            let elapsed = started.elapsed();
            if elapsed + delay > self.retry_for {
                return Err(CallbackError::GaveUp {
                    url: crate::secret::redact_url(url),
                    attempts,
                    elapsed,
                    last,
                });
            }
            tracing::debug!(attempts, %last, "callback not delivered yet, retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

fn describe_reqwest_error(e: reqwest::Error) -> String {
    if e.is_connect() {
        "connection failed".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_byte_compatible() {
        let s = serde_json::to_string(&CallbackBody::new(12, "pending")).unwrap();
        assert_eq!(
            s,
            r#"{"id":12,"status":"pending","building":false,"type":"buildshuttle"}"#
        );
    }
}
