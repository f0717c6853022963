//! `buildshuttle serve`: wires storage, dockerd, the executor and the HTTP API together,
//! then serves until SIGTERM/SIGINT, draining running builds within the grace period.

use crate::api::{self, AppState};
use crate::callback::Callbacks;
use crate::config::Config;
use crate::local::{LocalExecutor, LocalSettings};
use crate::logs::{KafkaProducers, LogFiles, LogSinks};
use crate::metrics::Metrics;
use crate::pipeline::{docker, Pipeline};
use crate::storage::{self, Storage, StorageError};
use std::sync::Arc;
use std::time::Duration;

/// A start-up failure; each names the setting to fix. `main` exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DOCKER_BUILD_SETTINGS: {0}")]
    Docker(#[from] docker::DockerError),
    #[error("DATA_DIR: cannot use {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("PORT: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("USE_KUBERNETES: {0}")]
    Kubernetes(#[from] crate::operator::StartError),
    /// Storage that cannot be used (S3 unreachable, bucket missing, credentials refused);
    /// the message starts with the variable to fix.
    #[error("{0}")]
    Storage(StorageError),
}

/// A failure while serving (after a good start). `main` exits with status 1.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("the BuildJob controller stopped; restarting the service restarts it")]
    ControllerStopped,
}

/// What runs the builds.
enum Mode {
    Local(LocalExecutor),
    Kubernetes(Box<crate::operator::KubernetesMode>),
}

pub struct Started {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mode: Mode,
    grace: Duration,
    delay: Duration,
    draining: Arc<std::sync::atomic::AtomicBool>,
    http: crate::http_server::Limits,
}

impl Started {
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Everything that can fail at start, done before the first request is accepted.
pub async fn start(cfg: Config) -> Result<Started, StartError> {
    crate::pipeline::sources::warn_if_proxied(&cfg.build.deny_networks);
    if cfg.use_kubernetes {
        return start_kubernetes(cfg).await;
    }
    let data_dir = cfg.build.data_dir.clone();
    let data_err = |source| StartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&data_dir).map_err(data_err)?;
    let storage: Arc<dyn Storage> = storage::open(&cfg.build).await.map_err(|e| match e {
        StorageError::Io { source, .. } => data_err(source),
        other => StartError::Storage(other),
    })?;
    let files = if cfg.build.s3.is_some() {
        // Logs of running builds are spooled locally, then uploaded and removed; one S3
        // refuses is served from the spool and stored later.
        LogFiles::spool(data_dir.join("logs"))
            .map_err(data_err)?
            .store_refused_later()
    } else {
        // With local storage the spool is the store: a finished log is already in place.
        LogFiles::new(data_dir.join("store")).map_err(data_err)?
    };

    let conn = docker::connect(&cfg.build.docker, &data_dir.join("tls"))?;
    let conn = docker::ready(conn, &cfg.build.docker, Duration::from_secs(10)).await?;
    tracing::info!(docker = %docker::describe(&cfg.build.docker), storage = %storage.describe(), "dockerd answers");

    let build = Arc::new(cfg.build.clone());
    let pipeline = Pipeline::new(conn, storage.clone(), build.clone());
    let sinks = LogSinks {
        files,
        storage: storage.clone(),
        stdout: if cfg.build.show_build_logs {
            crate::logs::Stdout::Lossy
        } else {
            crate::logs::Stdout::Off
        },
        max_log_bytes: cfg.build.max_log_bytes,
        kafka: Some(Arc::new(KafkaProducers::new(
            cfg.build.kafka_topic.clone(),
            cfg.build.kafka_delivery_timeout,
        ))),
    };
    let metrics = Arc::new(Metrics::new());
    let executor = LocalExecutor::start(
        LocalSettings {
            data_dir: data_dir.clone(),
            max_parallel: cfg.maximum_parallel_builds,
            max_queued: cfg.max_queued_builds,
            timeout: cfg.build.timeout,
        },
        pipeline,
        sinks,
        Callbacks::new(cfg.callback_retry_for),
        metrics.clone(),
    )
    .await
    .map_err(data_err)?;

    let executor_api: Arc<dyn crate::executor::Executor> = Arc::new(executor.clone());
    listen(&cfg, executor_api, storage, metrics, Mode::Local(executor)).await
}

/// The API over either mode, bound to its port.
async fn listen(
    cfg: &Config,
    executor: Arc<dyn crate::executor::Executor>,
    storage: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    mode: Mode,
) -> Result<Started, StartError> {
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = AppState {
        executor,
        storage,
        extra_build_args: Arc::new(cfg.build.extra_build_args.clone()),
        deny_networks: Arc::new(cfg.build.deny_networks.clone()),
        max_request_bytes: cfg.max_request_bytes,
        metrics,
        draining: draining.clone(),
        body_budget: Arc::new(api::BodyBudget::new(cfg.max_request_bytes)),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    Ok(Started {
        listener,
        router: api::app(state),
        mode,
        grace: cfg.shutdown_grace,
        delay: cfg.shutdown_delay,
        draining,
        http: cfg.http,
    })
}

/// Kubernetes mode: the API is a facade writing BuildJobs; the controller (unless
/// RUN_CONTROLLER=false) runs here too, behind a Lease.
async fn start_kubernetes(cfg: Config) -> Result<Started, StartError> {
    let metrics = Arc::new(Metrics::new());
    let mode = crate::operator::KubernetesMode::start(&cfg, metrics.clone()).await?;
    tracing::info!(storage = %mode.storage.describe(), controller = cfg.kubernetes.run_controller, "Kubernetes mode");
    let executor: Arc<dyn crate::executor::Executor> = Arc::new(mode.executor.clone());
    let storage = mode.storage.clone();
    listen(
        &cfg,
        executor,
        storage,
        metrics,
        Mode::Kubernetes(Box::new(mode)),
    )
    .await
}

/// Serves until a shutdown signal, then drains.
pub async fn serve(started: Started) -> Result<(), ServeError> {
    let Started {
        listener,
        router,
        mode,
        grace,
        delay,
        draining,
        http,
    } = started;
    let died = match &mode {
        Mode::Kubernetes(k) => k.died.clone(),
        Mode::Local(_) => tokio_util::sync::CancellationToken::new(),
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "buildshuttle listening");
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let server = crate::http_server::serve(listener, router, http, stop.clone());
    let http = tokio::spawn(server);
    let signalled = tokio::select! {
        _ = shutdown_signal() => true,
        _ = died.cancelled() => false,
    };
    if signalled && !delay.is_zero() {
        // A Service still routes here until the endpoints controller sees the pod go (and
        // every kube-proxy catches up): keep serving meanwhile, failing readiness. A second
        // signal skips the rest of the wait.
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            delay_seconds = delay.as_secs(),
            "SIGTERM: still serving while load balancers drop this replica (/octhc answers 503)"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown_signal() => {}
            _ = died.cancelled() => {}
        }
    }
    // The builds drain while the HTTP server does: a response that lasts as long as a build
    // (`?follow=true`) must not hold the drain, and no queued build may start meanwhile.
    stop.cancel();
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "shutting down: no new builds, draining running ones"
    );
    match mode {
        Mode::Local(executor) => executor.shutdown(grace).await,
        Mode::Kubernetes(k) => k.shutdown(grace).await,
    }
    // Followers of the drained builds got their last line; what is still open now would
    // outlive the process anyway.
    match tokio::time::timeout(HTTP_DRAIN_AFTER_BUILDS, http).await {
        Ok(Ok(served)) => served.map_err(ServeError::Http)?,
        Ok(Err(joined)) => tracing::warn!(error = %joined, "the HTTP server's task failed"),
        Err(_) => tracing::warn!("closing HTTP connections still open after the builds drained"),
    }
    if died.is_cancelled() {
        return Err(ServeError::ControllerStopped);
    }
    Ok(())
}

/// How long open HTTP responses may still run once the builds have drained.
const HTTP_DRAIN_AFTER_BUILDS: std::time::Duration = std::time::Duration::from_secs(5);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
