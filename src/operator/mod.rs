//! Kubernetes mode: the `BuildJob` resource, the pure decision and pod builders, the
//! controller that applies them, and the facade the HTTP API uses.

pub mod controller;
pub mod crd;
pub mod decide;
pub mod facade;
pub mod lease;
pub mod pod;

pub use crd::labels;
use std::time::Duration;

/// The seam for metrics (`src/metrics.rs` implements it): what the controller reports.
pub trait Observer: Send + Sync + 'static {
    /// A build ended; `seconds` from pod creation to the end when known.
    fn build_finished(&self, succeeded: bool, duration: Option<Duration>);
    /// A status callback could not be delivered.
    fn callback_failed(&self);
}

/// Reports nothing (metrics not wired).
pub struct NoObserver;

impl Observer for NoObserver {
    fn build_finished(&self, _succeeded: bool, _duration: Option<Duration>) {}
    fn callback_failed(&self) {}
}

#[cfg(test)]
pub(crate) mod mock;
