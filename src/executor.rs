//! The seam between the HTTP API and a mode: local (in-process builds) or Kubernetes
//! (BuildJob resources). The API only talks to this trait.

use crate::build::BuildSpec;
use crate::storage::Object;
use async_trait::async_trait;

/// A log as it grows, chunk by chunk, ending with the build.
pub type LogStream = futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The service cannot take builds now (shutting down, state not writable, API down).
    #[error("the build service cannot accept builds right now: {0}")]
    Unavailable(String),
    /// The queue holds its configured maximum; the client should try again later.
    #[error("{0} builds are already queued (MAX_QUEUED_BUILDS)")]
    QueueFull(usize),
    /// The service is not set up to take builds until an operator acts (e.g. the BuildJob
    /// CRD installed is older than this version); the message says what to do and is
    /// answered to the client as well.
    #[error("{0}")]
    NotReady(String),
}

/// Runs the rest of build `id`'s acceptance on a task of its own, to its end, even when
/// the request's client goes away meanwhile (hyper then drops the request's future): half
/// an acceptance (a record without its queue entry, a BuildJob without its Secret) would
/// leave a build that runs wrong or never.
pub async fn accept_to_the_end(
    id: uuid::Uuid,
    acceptance: impl std::future::Future<Output = Result<(), ExecutorError>> + Send + 'static,
) -> Result<(), ExecutorError> {
    tokio::spawn(acceptance).await.unwrap_or_else(|e| {
        tracing::error!(build = %id, error = %e, "accepting a build failed");
        Err(ExecutorError::Unavailable(
            "the build could not be accepted".into(),
        ))
    })
}

/// Which builds a stop applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSelector {
    pub app: String,
    pub app_uuid: String,
    /// `None`: every active build of the app.
    pub build_number: Option<u64>,
}

#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Accepts a build. Idempotent on `build_uuid`: a repeated submit starts nothing new.
    async fn submit(&self, spec: BuildSpec) -> Result<(), ExecutorError>;
    /// Stops matching builds (running or queued); returns how many were stopped.
    async fn stop(&self, which: BuildSelector) -> Result<usize, ExecutorError>;
    /// The build's log so far, from byte `offset` on; `None` when the build is unknown.
    async fn log(
        &self,
        app: &str,
        app_uuid: &str,
        build_number: u64,
        offset: u64,
    ) -> Result<Option<Object>, ExecutorError>;
    /// The build's log from the start, as it grows, ending when the build ends; `None`
    /// when the build is unknown. Only called when `follow_supported()`; the API polls
    /// `log` for the others.
    async fn follow(
        &self,
        _app: &str,
        _app_uuid: &str,
        _build_number: u64,
    ) -> Result<Option<LogStream>, ExecutorError> {
        Ok(None)
    }
    /// Whether `follow` streams (else the API polls `log`).
    fn follow_supported(&self) -> bool {
        false
    }
    /// Whether this replica can do its job (`/octhc`); the error says why not.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether the build is queued or running (the log may still grow).
    async fn is_active(&self, app: &str, app_uuid: &str, build_number: u64) -> bool;
}
