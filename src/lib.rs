//! buildshuttle: turns application sources into pushed Docker images.
//!
//! Module map (imports run downwards only):
//! `api` (HTTP), `local` (embedded executor) → `pipeline` (fetch, context, docker) →
//! `logs`, `callback`, `executor` → `storage`, `config`, `build`, `secret`.

pub mod api;
pub mod build;
pub mod callback;
pub mod config;
pub mod executor;
pub mod http_server;
pub mod local;
pub mod logs;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod secret;
pub mod serve;
pub mod storage;
pub mod worker;
