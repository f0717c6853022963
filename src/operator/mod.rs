//! Kubernetes mode: the `BuildJob` resource, the pure decision and pod builders, the
//! controller that applies them, and the facade the HTTP API uses.

pub mod client;
pub mod controller;
pub mod crd;
pub mod crd_check;
pub mod decide;
pub mod facade;
pub mod lease;
pub mod logend;
pub mod notify;
pub mod pod;

pub use crd::labels;
use std::time::Duration;

/// The seam for metrics (`src/metrics.rs` implements it): what the controller reports.
pub trait Observer: Send + Sync + 'static {
    /// A build ended with the `Succeeded` condition's `reason`; `duration` from the worker
    /// pod's creation to the end, when known.
    fn build_finished(&self, succeeded: bool, reason: &str, duration: Option<Duration>);
    /// A status callback could not be delivered.
    fn callback_failed(&self);
    /// BuildJobs waiting for a slot and holding one, as the controller's cache shows them.
    fn queue(&self, queued: usize, running: usize);
    /// The worker's stage timings of a finished build, in milliseconds by stage.
    fn stages(&self, _stages: &std::collections::BTreeMap<String, u64>) {}
    /// One reconcile took this long.
    fn reconciled(&self, _seconds: f64) {}
}

/// Reports nothing (metrics not wired).
pub struct NoObserver;

impl Observer for NoObserver {
    fn build_finished(&self, _succeeded: bool, _reason: &str, _duration: Option<Duration>) {}
    fn callback_failed(&self) {}
    fn queue(&self, _queued: usize, _running: usize) {}
}

#[cfg(test)]
pub(crate) mod mock;

/// The service's Prometheus metrics, fed by the controller. Reasons only the controller
/// knows (OOMKilled, PodEvicted, …) are counted as `Internal`.
impl Observer for crate::metrics::Metrics {
    fn build_finished(&self, succeeded: bool, reason: &str, duration: Option<Duration>) {
        use crate::build::{FailureReason, Outcome};
        let outcome = if succeeded {
            Outcome::Succeeded {
                image: String::new(),
                digest: None,
            }
        } else {
            let r =
                serde_json::from_value::<FailureReason>(serde_json::Value::String(reason.into()))
                    .unwrap_or(FailureReason::Internal);
            Outcome::failed(r, "")
        };
        self.build_finished(&outcome, duration.map(|d| d.as_secs_f64()));
    }
    fn callback_failed(&self) {
        self.callback_failures.inc();
    }
    fn queue(&self, queued: usize, running: usize) {
        self.queued.set(i64::try_from(queued).unwrap_or(i64::MAX));
        self.running.set(i64::try_from(running).unwrap_or(i64::MAX));
    }
    fn stages(&self, stages: &std::collections::BTreeMap<String, u64>) {
        for (stage, ms) in stages {
            self.observe_stage(stage, *ms);
        }
    }
    fn reconciled(&self, seconds: f64) {
        self.observe_reconcile(seconds);
    }
}

/// Kubernetes mode as `serve` runs it: the facade, and (unless RUN_CONTROLLER=false) the
/// controller behind the Lease, supervised: if it stops on its own, `died` fires.
pub struct KubernetesMode {
    pub executor: facade::KubeExecutor,
    pub storage: std::sync::Arc<dyn crate::storage::Storage>,
    controller: Option<tokio::task::JoinHandle<()>>,
    /// The controller's callback senders (`notify::spawn`).
    senders: tokio_util::task::TaskTracker,
    /// The check that the installed CRD is current (`crd_check`).
    crd_check: tokio::task::JoinHandle<()>,
    stop: tokio_util::sync::CancellationToken,
    pub died: tokio_util::sync::CancellationToken,
}

struct DiedGuard {
    stop: tokio_util::sync::CancellationToken,
    died: tokio_util::sync::CancellationToken,
    /// What stopped, for the log.
    what: &'static str,
}

impl Drop for DiedGuard {
    fn drop(&mut self) {
        if !self.stop.is_cancelled() {
            tracing::error!("{} stopped on its own", self.what);
            self.died.cancel();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up a Kubernetes client (in-cluster service account or KUBECONFIG): {0}")]
    Client(kube::Error),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("EXTRA_DOCKER_REGISTRY_CONFIG cannot be passed on to workers: {0}")]
    ExtraRegistries(serde_json::Error),
    #[error("cannot reach the Kubernetes API server (USE_KUBERNETES=true): {0}")]
    Version(kube::Error),
    #[error("cannot create the folder for log ends under DATA_DIR: {0}")]
    LogEnds(std::io::Error),
    #[error("WORKER_DOCKER_MODE=dind needs Kubernetes 1.29 or newer (native sidecar containers); this cluster is {0}: use WORKER_DOCKER_MODE=host or external, or upgrade")]
    TooOldForDind(String),
}

/// Whether a cluster of this version runs native sidecars (init containers with
/// `restartPolicy: Always`, on by default since 1.29).
pub fn has_native_sidecars(major: &str, minor: &str) -> bool {
    let num = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    };
    (num(major), num(minor)) >= (1, 29)
}

impl KubernetesMode {
    /// `observer` receives what the controller reports (the metrics seam).
    pub async fn start(
        cfg: &crate::config::Config,
        observer: std::sync::Arc<dyn Observer>,
    ) -> Result<Self, StartError> {
        let clients = client::Clients::connect()
            .await
            .map_err(StartError::Client)?;
        let client = clients.calls.clone();
        let k = &cfg.kubernetes;
        if k.docker_mode == pod::DockerMode::Dind && k.run_controller {
            let v = client
                .apiserver_version()
                .await
                .map_err(StartError::Version)?;
            if !has_native_sidecars(&v.major, &v.minor) {
                return Err(StartError::TooOldForDind(v.git_version));
            }
        }
        let namespace = k
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let storage = crate::storage::open(&cfg.build).await?;
        let extra = if cfg.build.extra_registries.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&cfg.build.extra_registries)
                    .map_err(StartError::ExtraRegistries)?,
            )
        };
        let own = std::sync::Arc::new(controller::OwnWrites::default());
        // Temporary files a killed process left (SIGKILL, OOM: no destructor ran); DATA_DIR
        // (the chart's emptyDir) outlives a container's restarts. Nothing of this process is
        // there yet, and nothing there is needed again: a log end not recorded as written is
        // written again, a POST that was cut was never acknowledged.
        let log_ends_dir = cfg.build.data_dir.join("log-ends");
        let scratch = cfg.build.data_dir.join("scratch");
        for dir in [&log_ends_dir, &scratch] {
            clear_leftovers(dir).await;
        }
        // The end of a log no worker wrote goes where workers write theirs.
        let log_ends = logend::LogEnds::new(
            storage.clone(),
            Some(std::sync::Arc::new(crate::logs::KafkaProducers::new(
                cfg.build.kafka_topic.clone(),
                cfg.build.kafka_delivery_timeout,
            ))),
            log_ends_dir,
        )
        .map_err(StartError::LogEnds)?;
        let mut executor = facade::KubeExecutor::new(
            client.clone(),
            &namespace,
            storage.clone(),
            extra,
            cfg.build.limits,
            scratch,
        )
        .with_instance(k.instance_name.clone())
        .with_streams(clients.streams.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let died = tokio_util::sync::CancellationToken::new();
        // Whether the installed CRD declares what this version writes: until it does, the
        // facade refuses builds, `/octhc` fails and the controller waits.
        let (crd, check) = crd_check::CrdCheck::start(client.clone());
        let crd_check = {
            let guard = DiedGuard {
                stop: stop.clone(),
                died: died.clone(),
                what: "the check of the BuildJob CRD",
            };
            tokio::spawn(async move {
                let _guard = guard;
                check.await;
            })
        };
        executor = executor.with_crd_check(crd.clone());
        // Only with a controller in this process: a facade alone would fill it for nobody.
        if k.run_controller {
            executor = executor.with_own_writes(own.clone());
        }
        let watch_failing = executor.watch_failing.clone();
        let instance = k.instance_name.clone();
        let senders = tokio_util::task::TaskTracker::new();
        let senders_out = senders.clone();
        let controller = k.run_controller.then(|| {
            let settings = decide::Settings {
                max_parallel: cfg.maximum_parallel_builds,
                max_pod_retries: k.max_pod_retries,
                finished_ttl: k.finished_ttl,
                timeout: cfg.build.timeout,
                stuck_grace: Duration::from_secs(120),
                pending_limit: k.pod_pending_limit,
                max_admission_retries: k.max_admission_retries,
                lost_pod_grace: k.pod_lost_grace,
                queued_recheck: k.queued_recheck,
            };
            let pods = pod::PodSettings {
                image: k.worker_image.clone(),
                docker_mode: k.docker_mode,
                dind_image: k.dind_image.clone(),
                docker: cfg.build.docker.clone(),
                docker_settings_json: k.docker_settings_json.clone(),
                timeout: cfg.build.timeout,
                no_cache: cfg.build.no_cache,
                cache_from_latest: cfg.build.cache_from_latest,
                builder: cfg.build.builder,
                cache_repository: cfg.build.cache_repository.clone(),
                kafka_topic: cfg.build.kafka_topic.clone(),
                sources_deny_networks: k.sources_deny_networks.clone(),
                env_secret: k.worker_env_secret.clone(),
                docker_socket_gid: k.worker_docker_socket_gid,
                service_account: k.worker_service_account.clone(),
                dind_mtu: k.dind_mtu,
                image_pull_secrets: k.worker_image_pull_secrets.clone(),
                image_pull_policy: k.worker_image_pull_policy.clone(),
                forwarded: pod::forwarded(&cfg.build),
                automount_token: k.worker_automount_token,
                overrides: k.worker_pod.clone(),
            };
            let callback_budget = cfg.callback_retry_for;
            let callbacks = crate::callback::Callbacks::new(callback_budget);
            let lock = lease::LeaseLock::new(
                kube::Api::namespaced(client.clone(), &namespace),
                k.lease_name.clone(),
                k.identity.clone(),
                k.lease_duration,
            );
            let identity = k.identity.clone();
            let (stop2, died2) = (stop.clone(), died.clone());
            tokio::spawn(async move {
                // Fires `died` however the task ends (a panic too) unless asked to stop.
                let _guard = DiedGuard {
                    stop: stop2.clone(),
                    died: died2,
                    what: "the BuildJob controller",
                };
                let work = || {
                    let (client, streams, settings, pods, callbacks) = (
                        client.clone(),
                        clients.streams.clone(),
                        settings.clone(),
                        pods.clone(),
                        callbacks.clone(),
                    );
                    let reporter = kube::runtime::events::Reporter {
                        controller: "buildshuttle".into(),
                        instance: Some(identity.clone()),
                    };
                    let ns = namespace.clone();
                    let stop = stop2.clone();
                    let observer = observer.clone();
                    let watch_failing = watch_failing.clone();
                    let instance = instance.clone();
                    let own = own.clone();
                    let senders = senders.clone();
                    let log_ends = log_ends.clone();
                    let crd = crd.clone();
                    async move {
                        let make = |store| {
                            controller::Context::new(
                                client.clone(),
                                reporter,
                                settings,
                                pods,
                                callbacks,
                                callback_budget,
                                store,
                                observer,
                                own,
                            )
                            .with_senders(senders)
                            .with_log_ends(log_ends)
                            .with_crd_check(crd)
                        };
                        controller::run(
                            streams,
                            &ns,
                            instance.as_deref(),
                            make,
                            stop.cancelled_owned(),
                            watch_failing,
                        )
                        .await
                    }
                };
                // On a CRD older than this version, neither lead nor reconcile: a replica of
                // the earlier version (a rolling upgrade) keeps leading meanwhile.
                tokio::select! {
                    _ = crd.usable() => {}
                    _ = stop2.cancelled() => return,
                }
                lock.run_while_leader(work, stop2.cancelled()).await;
            })
        });
        Ok(Self {
            executor,
            storage,
            controller,
            senders: senders_out,
            crd_check,
            stop,
            died,
        })
    }

    /// Stops the controller (the BuildJobs and pods carry on; the next leader picks them up),
    /// and lets the callbacks being delivered finish, all within `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.crd_check.abort();
        drain(self.controller, &self.senders, grace).await;
    }
}

/// Removes everything in `dir`, a folder of this process's temporary files, at its start.
/// Best effort: what cannot be removed is logged and left.
async fn clear_leftovers(dir: &std::path::Path) {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot look for temporary files an earlier run left");
            return;
        }
    };
    let mut removed = 0u64;
    loop {
        let entry = match entries.next_entry().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list the temporary files an earlier run left");
                break;
            }
        };
        let path = entry.path();
        let gone = match entry.file_type().await {
            Ok(t) if t.is_dir() => tokio::fs::remove_dir_all(&path).await,
            _ => tokio::fs::remove_file(&path).await,
        };
        match gone {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a temporary file an earlier run left")
            }
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed temporary files an earlier run left");
    }
}

/// Waits up to `grace` for the controller task to stop, then (within the same bound) for
/// the callback senders: one cut mid-delivery is sent again by the next leader only after
/// its takeover wait (minutes), and twice if the receiver had it already.
async fn drain(
    controller: Option<tokio::task::JoinHandle<()>>,
    senders: &tokio_util::task::TaskTracker,
    grace: Duration,
) {
    let deadline = tokio::time::Instant::now() + grace;
    if let Some(handle) = controller {
        if tokio::time::timeout_at(deadline, handle).await.is_err() {
            tracing::warn!("the controller did not stop within the grace period");
        }
    }
    senders.close();
    if !senders.is_empty() {
        tracing::info!(
            senders = senders.len(),
            "waiting for the callbacks being delivered"
        );
    }
    if tokio::time::timeout_at(deadline, senders.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            senders = senders.len(),
            "callbacks still being delivered at the end of the grace period are cut; the next leader sends them after its takeover wait"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{drain, has_native_sidecars, DiedGuard};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_shutdown_lets_callbacks_being_delivered_finish_within_its_grace() {
        let senders = tokio_util::task::TaskTracker::new();
        let delivered = Arc::new(AtomicBool::new(false));
        let d = delivered.clone();
        senders.spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            d.store(true, Ordering::SeqCst);
        });
        let controller = tokio::spawn(async {});
        drain(Some(controller), &senders, Duration::from_secs(10)).await;
        assert!(delivered.load(Ordering::SeqCst), "waited for the sender");

        // One that outlives the grace period does not hold the shutdown.
        let senders = tokio_util::task::TaskTracker::new();
        senders.spawn(tokio::time::sleep(Duration::from_secs(60)));
        let started = std::time::Instant::now();
        drain(None, &senders, Duration::from_millis(200)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn dind_needs_native_sidecars() {
        assert!(has_native_sidecars("1", "29"));
        assert!(has_native_sidecars("1", "33+"));
        assert!(has_native_sidecars("2", "0"));
        assert!(!has_native_sidecars("1", "28"));
        assert!(!has_native_sidecars("1", "28+"));
    }
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_controller_task_that_ends_unasked_or_panics_is_noticed() {
        let (stop, died) = (CancellationToken::new(), CancellationToken::new());
        let guard = DiedGuard {
            stop: stop.clone(),
            died: died.clone(),
            what: "the BuildJob controller",
        };
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("controller bug");
        });
        assert!(task.await.is_err());
        assert!(died.is_cancelled(), "a panic is noticed");

        let (stop, died) = (CancellationToken::new(), CancellationToken::new());
        stop.cancel();
        drop(DiedGuard {
            stop: stop.clone(),
            died: died.clone(),
            what: "the BuildJob controller",
        });
        assert!(!died.is_cancelled(), "a requested stop is not a death");
    }
}
