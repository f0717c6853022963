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
    #[error("callback to {url} was refused with HTTP {status}; not retried, as the receiver will not take it (check the callback URL and callback_auth)")]
    Refused { url: String, status: u16 },
}

/// A 4xx the same request cannot get past by trying again (a wrong URL or token, a build
/// the receiver no longer knows). A timeout, "too early" and throttling are worth a retry.
fn refused_for_good(status: reqwest::StatusCode) -> bool {
    status.is_client_error() && !matches!(status.as_u16(), 408 | 425 | 429)
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

    /// Delivers `status` for `build_number` to `url`. 2xx is delivered; a 4xx that says the
    /// receiver will not take it (`refused_for_good`) ends the delivery at once; anything
    /// else is retried (doubling delay, capped at 30 s) until `retry_for` has passed.
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
                Ok(resp) if refused_for_good(resp.status()) => {
                    return Err(CallbackError::Refused {
                        url: crate::secret::redact_url(url),
                        status: resp.status().as_u16(),
                    })
                }
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

    /// A receiver answering `status` to every call, and how many calls it got.
    async fn receiver(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, SeqCst);
                    axum::http::StatusCode::from_u16(status).unwrap_or_default()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/cb"), calls)
    }

    /// 404 (the receiver does not know the build) and 401 (a wrong callback_auth) end the
    /// delivery at the first answer; 429 and 500 are tried again until the time is up.
    #[tokio::test]
    async fn a_refusal_for_good_is_not_retried_and_the_rest_are() {
        use std::sync::atomic::Ordering::SeqCst;
        let callbacks = Callbacks {
            first_delay: Duration::from_millis(10),
            // Long enough for several tries even on a loaded machine.
            ..Callbacks::new(Duration::from_secs(2))
        };
        for status in [404, 401] {
            let (url, calls) = receiver(status).await;
            let err = callbacks
                .deliver(&url, None, 1, "succeeded")
                .await
                .expect_err("refused");
            assert_eq!(calls.load(SeqCst), 1, "{status}");
            assert!(
                err.to_string()
                    .contains(&format!("refused with HTTP {status}; not retried")),
                "{err}"
            );
        }
        for status in [429, 500] {
            let (url, calls) = receiver(status).await;
            let err = callbacks
                .deliver(&url, None, 1, "succeeded")
                .await
                .expect_err("never taken");
            assert!(calls.load(SeqCst) >= 3, "{status}: {}", calls.load(SeqCst));
            assert!(err.to_string().contains("gave up after"), "{err}");
        }
    }

    #[test]
    fn body_is_byte_compatible() {
        let s = serde_json::to_string(&CallbackBody::new(12, "pending")).unwrap();
        assert_eq!(
            s,
            r#"{"id":12,"status":"pending","building":false,"type":"buildshuttle"}"#
        );
    }
}
