//! The seam between the HTTP API and a mode: local (in-process builds) or Kubernetes
//! (BuildJob resources). The API only talks to this trait.

use crate::build::BuildSpec;
use crate::storage::Object;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The service cannot take builds now (shutting down, state not writable, API down).
    #[error("the build service cannot accept builds right now: {0}")]
    Unavailable(String),
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
    /// Whether the build is queued or running (the log may still grow).
    async fn is_active(&self, app: &str, app_uuid: &str, build_number: u64) -> bool;
}
