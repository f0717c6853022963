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
//!   (a watch with no change; a build step that prints nothing). An open watch has the
//!   watcher's own idle timeout (295 s), but its LIST and the request that opens it have
//!   none; a followed log's reader reads the pod when the log goes quiet.

use kube::Client;
use std::time::Duration;

/// How long an API call may get no answer (and one read of a non-followed pod log may get no
/// bytes): then it fails as the API failing does, and is retried.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
            calls: Client::try_from(for_calls(config.clone(), API_CALL_TIMEOUT))?,
            streams: Client::try_from(config)?,
        })
    }
}

/// The configuration of the `calls` client: the read timeout restarts with each request
/// written, so the time a pooled connection sat idle does not count against the answer.
fn for_calls(mut config: kube::Config, timeout: Duration) -> kube::Config {
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
        let calls = for_calls(base, API_CALL_TIMEOUT);
        assert_eq!(calls.read_timeout, Some(API_CALL_TIMEOUT));
        assert!(calls.reset_reader_on_write);
    }
}
