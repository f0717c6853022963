//! The two Kubernetes API clients this process uses, over the same configuration (in-cluster
//! or KUBECONFIG):
//!
//! - `calls`, for every request that expects an answer (reads, writes, the Lease, the CRD
//!   check): a read timeout of API_CALL_TIMEOUT counted from when the request was written.
//!   kube's client has none by default, and speaks HTTP/1 without TCP keepalive, so a
//!   request whose connection died silently (an API server replaced behind a load balancer
//!   that drops the flow) waits for ever. In the controller that stalled the BuildJob's
//!   reconcile for good: a build never started or never reported its end.
//! - `streams`, for watches and followed pod logs, which stay quiet for minutes by design
//!   (a watch with no change; a build step that prints nothing): a read timeout of
//!   STREAM_READ_TIMEOUT, past the watcher's own idle timeout for an open watch (295 s), so
//!   it bounds only what that does not: the watcher's LIST and the request that opens a
//!   watch. A followed log quiet for that long is opened again (its reader skips the lines
//!   it sent), and its reader also reads the pod when the log goes quiet.

use kube::Client;
use std::time::Duration;

/// How long an API call may get no answer (and one read of a non-followed pod log may get no
/// bytes): then it fails as the API failing does, and is retried.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a watch or a followed pod log may get no byte: longer than kube-runtime's idle
/// timeout of an open watch (its server-side 290 s, plus 5 s).
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct Clients {
    pub calls: Client,
    pub streams: Client,
}

impl Clients {
    /// Both clients from the inferred configuration (in-cluster, else KUBECONFIG).
    pub async fn connect() -> Result<Self, kube::Error> {
        let config = kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?;
        Ok(Self {
            calls: Client::try_from(with_read_timeout(config.clone(), API_CALL_TIMEOUT))?,
            streams: Client::try_from(with_read_timeout(config, STREAM_READ_TIMEOUT))?,
        })
    }
}

/// `config` with a read timeout that restarts with each request written, so the time a
/// pooled connection sat idle does not count against the answer.
fn with_read_timeout(mut config: kube::Config, timeout: Duration) -> kube::Config {
    config.read_timeout = Some(timeout);
    config.reset_reader_on_write = true;
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_time_out_from_their_request_where_kube_sets_no_timeout() {
        let base = kube::Config::new("https://127.0.0.1:6443".parse().expect("url"));
        assert_eq!(
            base.read_timeout, None,
            "kube's default changed: recheck streams"
        );
        let calls = with_read_timeout(base.clone(), API_CALL_TIMEOUT);
        assert_eq!(calls.read_timeout, Some(API_CALL_TIMEOUT));
        assert!(calls.reset_reader_on_write);
    }

    /// An open watch with no event is ended by kube-runtime's watcher after 290 + 5 s (its
    /// WATCH_IDLE_TIMEOUT_MARGIN): the stream client's timeout must not come first.
    #[test]
    fn streams_time_out_only_past_the_watchers_own_idle_timeout() {
        assert!(STREAM_READ_TIMEOUT > Duration::from_secs(290 + 5));
    }
}
