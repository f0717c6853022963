//! Kubernetes mode: the `BuildJob` resource, the pure decision and pod builders, the
//! controller that applies them, and the facade the HTTP API uses.

pub mod crd;
pub mod decide;
pub mod pod;
