//! `buildshuttle worker`: the entrypoint of a Kubernetes worker pod. Reads the build from the
//! BuildJob spec and the credentials Secret (env), waits for dockerd, runs the same pipeline
//! as local mode with the same log sinks (its stdout is the pod log), and writes the outcome
//! as JSON to the termination log for the controller. Exit code 0 only on success.

use crate::build::{BuildSpec, FailureReason, Outcome, RegistryAuth, StageTimings, Termination};
use crate::config::{BuildConfig, WorkerArgs};
use crate::logs::{LogFiles, LogSinks};
use crate::operator::crd::{BuildJobSpec, SourceKind, SOURCES_TOO_LARGE};
use crate::pipeline::{docker, Pipeline};
use crate::secret::Secret;
use std::path::Path;
use std::time::Duration;

/// The kubelet keeps at most 4096 bytes of a termination message.
const TERMINATION_MESSAGE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("BUILD_JOB_SPEC is not a BuildJob spec: {0}")]
    Spec(serde_json::Error),
    #[error("BUILD_JOB_SPEC: buildUuid {0:?} is not a UUID")]
    BuildUuid(String),
    #[error(
        "WORKER_SOURCES is required for {0:?} sources (the credentials Secret has no \"sources\")"
    )]
    NoSources(SourceKind),
    #[error("BUILD_JOB_SPEC: stored sources must be under the build's source key ({0})")]
    StorageKey(String),
    #[error("WORKER_BUILD_ARGS is not a JSON object of strings")]
    BuildArgs,
}

/// The BuildSpec the pipeline runs.
pub fn build_spec(args: &WorkerArgs) -> Result<BuildSpec, WorkerError> {
    let job: BuildJobSpec = serde_json::from_str(&args.spec).map_err(WorkerError::Spec)?;
    let build_uuid = uuid::Uuid::parse_str(&job.build_uuid)
        .map_err(|_| WorkerError::BuildUuid(job.build_uuid.clone()))?;
    let (sources, stored) = match job.source.kind {
        SourceKind::Stored => {
            let key = crate::build::source_key(&build_uuid);
            if job.source.storage_key.as_deref() != Some(key.as_str()) {
                return Err(WorkerError::StorageKey(key));
            }
            // As a staged local-mode build: the pipeline reads the archive from storage.
            (Secret::new("data:base64,"), true)
        }
        kind => {
            let s = args
                .sources
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or(WorkerError::NoSources(kind))?;
            (Secret::new(s), false)
        }
    };
    let gm_registry_auth = match (&args.gm_registry_username, &args.gm_registry_password) {
        (Some(u), Some(p)) if !u.is_empty() || !p.is_empty() => Some(RegistryAuth {
            username: u.clone(),
            password: Secret::new(p.clone()),
        }),
        _ => None,
    };
    let spec = BuildSpec {
        sources,
        sources_stored: stored,
        gm_registry_auth,
        // From the Secret; a BuildJob made before they moved there has them in its spec.
        build_args: match args.build_args.as_deref().filter(|a| !a.is_empty()) {
            Some(json) => serde_json::from_str(json).map_err(|_| WorkerError::BuildArgs)?,
            None => job.build_args.clone(),
        },
        docker_password: args
            .docker_password
            .clone()
            .filter(|p| !p.is_empty())
            .map(Secret::new),
        ..job.build_spec(build_uuid)
    };
    Ok(spec)
}

/// Runs the build and writes the outcome. Returns the outcome (exit 0 iff a success).
pub async fn run(args: WorkerArgs) -> Outcome {
    // Listen for SIGTERM before anything else: from here on it cannot kill the process
    // before the outcome is written (the kubelet sends it on delete, eviction, deadline).
    let mut sigterm = Terminated::listen();
    let mut timings = StageTimings::default();
    let mut log_stored = None;
    let outcome = match args.build.validate() {
        Ok(cfg) => match build_spec(&args) {
            Ok(spec) => {
                crate::pipeline::sources::warn_if_proxied(&cfg.deny_networks);
                let ran = build(&args, &cfg, &spec, &mut sigterm, &mut timings);
                let (outcome, stored) = ran.await;
                log_stored = stored;
                outcome
            }
            Err(e) => Outcome::failed(FailureReason::InvalidSources, e.to_string()),
        },
        Err(e) => Outcome::failed(
            FailureReason::Internal,
            format!("bad worker configuration: {e}"),
        ),
    };
    let end = Termination {
        timings: (timings != StageTimings::default()).then_some(timings),
        outcome,
        log_stored,
    };
    if let Err(e) = write_termination(&args.termination_log_path, &end) {
        tracing::error!(path = %args.termination_log_path.display(), error = %e, "cannot write the termination log; the controller will report the build failed");
    }
    end.outcome
}

/// How long after its build's timeout the worker may still start a pause before trying again
/// to store its log: half the pod's 120 s margin, the rest for the pod's own start.
const STORE_MARGIN: Duration = Duration::from_secs(60);

fn interrupted() -> Outcome {
    Outcome::failed(FailureReason::Interrupted, "the worker pod was stopped")
}

/// Runs the build; returns its outcome and, once its log was opened, whether the log is
/// in storage.
async fn build(
    args: &WorkerArgs,
    cfg: &BuildConfig,
    spec: &BuildSpec,
    sigterm: &mut Terminated,
    timings: &mut StageTimings,
) -> (Outcome, Option<bool>) {
    let (outcome, log) = run_build(args, cfg, spec, sigterm, timings).await;
    // The spool keeps a log file until storage has it (`LogFiles::spool`).
    let stored = log.map(|spooled| !spooled.exists());
    if stored == Some(false) {
        tracing::error!(key = %spec.log_key(), "the build log is not in storage; the controller copies it from this pod's log");
    }
    (outcome, stored)
}

/// `build`'s work: the outcome and the spool file of the log, if one was opened.
async fn run_build(
    args: &WorkerArgs,
    cfg: &BuildConfig,
    spec: &BuildSpec,
    sigterm: &mut Terminated,
    timings: &mut StageTimings,
) -> (Outcome, Option<std::path::PathBuf>) {
    // The worker knows nothing of the queue: its total runs from its own start.
    let started = std::time::Instant::now();
    let storage = match crate::storage::open(cfg).await {
        Ok(s) => s,
        Err(e) => {
            let o = Outcome::failed(FailureReason::Internal, format!("cannot open storage: {e}"));
            return (o, None);
        }
    };
    // TIMEOUT_IN_MS counts from the worker's start, waiting for dockerd included: the pod's
    // deadline (TIMEOUT_IN_MS + a margin for the pod's own start) must not come first.
    let deadline = tokio::time::Instant::from_std(started) + cfg.timeout;
    let spool = cfg.data_dir.join("spool");
    // This spool goes with the pod: a log S3 refuses for a while is tried again, as long as
    // that ends well before the pod's deadline (TIMEOUT_IN_MS + 120 s from the pod's start,
    // which came before this process's).
    let retry_until = deadline + STORE_MARGIN;
    // A spool in front of storage: a log leaves it once stored, so one still there at the
    // end was not (the termination message says so).
    let files = match LogFiles::spool(&spool) {
        Ok(f) => f.with_store_retries(retry_until),
        Err(e) => {
            let o = Outcome::failed(
                FailureReason::Internal,
                format!("cannot create the log spool: {e}"),
            );
            return (o, None);
        }
    };
    let spooled = files.path(&spec.log_key());
    let sinks = LogSinks {
        files,
        storage: storage.clone(),
        // The pod log: the build waits for it rather than leave lines out.
        stdout: crate::logs::Stdout::Whole,
        max_log_bytes: cfg.max_log_bytes,
        kafka: Some(std::sync::Arc::new(crate::logs::KafkaProducers::new(
            cfg.kafka_topic.clone(),
            cfg.kafka_delivery_timeout,
        ))),
    };
    let mut log = match sinks.open(spec) {
        Ok(l) => l,
        Err(e) => {
            let o = Outcome::failed(
                FailureReason::Internal,
                format!("cannot open the build log: {e}"),
            );
            return (o, None);
        }
    };
    log.line(&format!(
        "Build {} of {} started ({})",
        spec.build_number,
        spec.app_key(),
        spec.build_uuid
    ));

    // The local tags matter where the daemon outlives this pod (`host`, `external`).
    let mut tidy = None;
    let outcome = if spec.sources.expose() == SOURCES_TOO_LARGE {
        // A data: URI too large for MAX_SOURCE_BYTES (the facade passed a stand-in, see
        // `SOURCES_TOO_LARGE`): failed as the pipeline fails the URI itself, by its length,
        // with the lines local mode's build of it writes, and without waiting for dockerd.
        let outcome = crate::pipeline::too_large(&mut log, &cfg.limits);
        if let Outcome::Failed { reason, message } = &outcome {
            log.line(&format!("Build failed ({}): {message}", reason.as_str()));
        }
        outcome
    } else {
        let wait = Duration::from_secs(args.docker_wait_seconds).min(cfg.timeout);
        // Waiting for dockerd can take minutes (a dind sidecar that cannot start): a stop
        // must end it at once, not after DOCKER_WAIT_SECONDS.
        let connected = tokio::select! {
            c = connect(cfg, wait) => Some(c),
            _ = sigterm.recv() => None,
        };
        match connected {
            None => interrupted(),
            Some(Err(e)) => Outcome::failed(FailureReason::DockerUnavailable, e.to_string()),
            Some(Ok(conn)) => {
                let pipeline = Pipeline::new(conn, storage, std::sync::Arc::new(cfg.clone()));
                let workdir = cfg.data_dir.join("build");
                let o = tokio::select! {
                    o = pipeline.run(spec, &mut log, &workdir, timings) => o,
                    _ = tokio::time::sleep_until(deadline) => Outcome::failed(
                        FailureReason::Timeout,
                        format!("the build ran longer than TIMEOUT_IN_MS ({} ms)", cfg.timeout.as_millis()),
                    ),
                    _ = sigterm.recv() => interrupted(),
                };
                let _ = tokio::fs::remove_dir_all(&workdir).await;
                tidy = Some(pipeline.tidy(spec, &o));
                o
            }
        }
    };
    // Stopped (SIGTERM: a drain, an eviction, a deletion): whether the build ends here is
    // the controller's call. It re-creates the pod (whose worker writes its own end) or
    // ends the build and writes `Build failed (…)` and `Build finished` itself, so this log
    // says only that it was cut, and a consumer reading to `Build finished` misses no retry.
    let interrupted = matches!(
        &outcome,
        Outcome::Failed {
            reason: FailureReason::Interrupted,
            ..
        }
    );
    if let Outcome::Failed { reason, message } = &outcome {
        if interrupted {
            log.line(&format!("Build interrupted: {message}"));
        } else if matches!(
            reason,
            FailureReason::Timeout | FailureReason::DockerUnavailable
        ) {
            log.line(&format!("Build failed ({}): {message}", reason.as_str()));
        }
    }
    timings.total = Some(crate::build::elapsed_ms(started));
    log.line(&timings.summary());
    // The outcome is known: for the kubelet now (written again with the final timings at
    // the end), before the log's upload and Kafka delivery and the tidy-up, which a deadline
    // or a drain may cut short with a SIGKILL. Until then the log counts as not stored.
    let early = Termination {
        outcome: outcome.clone(),
        timings: Some(timings.clone()),
        log_stored: Some(false),
    };
    if let Err(e) = write_termination(&args.termination_log_path, &early) {
        tracing::error!(error = %e, "cannot write the termination log yet; tried again at the end");
    }
    let flushing: futures::future::BoxFuture<'static, ()> = if interrupted {
        Box::pin(log.close())
    } else {
        Box::pin(log.finish())
    };
    let finishing = async {
        tokio::join!(flushing, async {
            if let Some(tidy) = tidy {
                tidy.await;
            }
        })
    };
    // Once the log is stored, the message says so at once, not only at the end: Kafka's
    // delivery and the tidy-up may go on until a SIGKILL, and a message still saying "not
    // stored" would have the controller copy the pod's log over the stored one.
    let stored_said = async {
        if let Some(path) = &spooled {
            while path.exists() {
                tokio::time::sleep(STORED_POLL).await;
            }
            let stored = Termination {
                log_stored: Some(true),
                ..early
            };
            if let Err(e) = write_termination(&args.termination_log_path, &stored) {
                tracing::warn!(error = %e, "cannot write the termination log yet; tried again at the end");
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = finishing => {}
        _ = stored_said => {}
        _ = sigterm.recv() => tracing::warn!("stopped while storing the log; the outcome is written"),
    }
    (outcome, spooled)
}

/// How often the worker looks whether its log has left the spool (been stored).
const STORED_POLL: Duration = Duration::from_millis(50);

/// Waits for dockerd (a dind sidecar starts beside the worker), retrying until `wait`.
async fn connect(
    cfg: &BuildConfig,
    wait: Duration,
) -> Result<bollard::Docker, docker::DockerError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // The dind sidecar's socket exists only once its dockerd is up (a native sidecar is
        // started, not ready, when the worker starts): a missing socket is waited for too.
        let attempt = match docker::connect(&cfg.docker, &cfg.data_dir.join("tls")) {
            Ok(conn) => docker::ready(conn, &cfg.docker, left.min(Duration::from_secs(5))).await,
            Err(e @ docker::DockerError::Unavailable { .. }) => Err(e),
            Err(e) => return Err(e),
        };
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "waiting for dockerd");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// SIGTERM, listened for from the worker's start.
struct Terminated(Option<tokio::signal::unix::Signal>);

impl Terminated {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let s = signal(SignalKind::terminate());
        if let Err(e) = &s {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
        }
        Terminated(s.ok())
    }

    async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// The termination message: the outcome JSON with the build's timings as an extra
/// top-level field (`{"result":"succeeded","image":…,"timings":{…}}`; parsers that know only
/// `Outcome` ignore it), cut to fit the kubelet's 4 KiB limit: the timings go first, then the
/// failure message is shortened; the JSON stays whole. Read it back with
/// `Termination::parse` (in `build`).
pub fn termination_message(end: &Termination) -> String {
    let json = serde_json::to_string(end).unwrap_or_default();
    if json.len() <= TERMINATION_MESSAGE_MAX {
        return json;
    }
    let mut end = Termination {
        timings: None,
        ..end.clone()
    };
    let json = serde_json::to_string(&end).unwrap_or_default();
    if json.len() <= TERMINATION_MESSAGE_MAX {
        return json;
    }
    if let Outcome::Failed { reason, message } = &end.outcome {
        let reason = *reason;
        let mut cut: String = message.chars().take(TERMINATION_MESSAGE_MAX / 2).collect();
        loop {
            end.outcome = Outcome::failed(reason, format!("{cut}…"));
            let json = serde_json::to_string(&end).unwrap_or_default();
            if json.len() <= TERMINATION_MESSAGE_MAX {
                return json;
            }
            // Half the characters (a byte index could fall inside one and panic).
            let half = cut.chars().count() / 2;
            cut = cut.chars().take(half).collect();
        }
    }
    json
}

/// Reads a worker's termination message: its outcome and, when present, its timings.
/// `None` when the message is not one (e.g. cut by the kubelet).
pub fn parse_termination_message(message: &str) -> Option<Termination> {
    Termination::parse(message)
}

fn write_termination(path: &Path, end: &Termination) -> std::io::Result<()> {
    std::fs::write(path, termination_message(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn long_failures_still_fit_the_termination_message() {
        // Characters of 3 bytes that JSON escapes to 6: the first cut is still too long, and
        // the next one halves a string whose byte middle is inside a character.
        let end = |outcome, timings, log_stored| Termination {
            outcome,
            timings,
            log_stored,
        };
        for message in ["x".to_string() + &"中".repeat(2000), "\u{1}".repeat(3000)] {
            let o = Outcome::failed(FailureReason::BuildFailed, message);
            let m = termination_message(&end(o, None, Some(false)));
            assert!(m.len() <= TERMINATION_MESSAGE_MAX, "{}", m.len());
            assert!(serde_json::from_str::<Outcome>(&m).is_ok(), "{m}");
            // A cut message still says the log is not stored.
            let t = parse_termination_message(&m).unwrap_or_else(|| panic!("{m}"));
            assert_eq!(t.log_stored, Some(false), "{m}");
        }
        let o = Outcome::failed(FailureReason::BuildFailed, "é".repeat(10_000));
        let timings = StageTimings {
            fetch: Some(1),
            build: Some(2),
            ..Default::default()
        };
        let m = termination_message(&end(o, Some(timings.clone()), None));
        assert!(m.len() <= TERMINATION_MESSAGE_MAX, "{}", m.len());
        let back: Outcome = serde_json::from_str(&m).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            back,
            Outcome::Failed {
                reason: FailureReason::BuildFailed,
                ..
            }
        ));
        // A short outcome keeps its timings beside the outcome's own fields.
        let ok = Outcome::Succeeded {
            image: "r/a:1.1".into(),
            digest: None,
        };
        let m = termination_message(&end(ok.clone(), Some(timings.clone()), Some(true)));
        let t = parse_termination_message(&m).unwrap_or_else(|| panic!("{m}"));
        assert_eq!(
            (t.outcome, t.timings, t.log_stored),
            (ok, Some(timings), Some(true))
        );
    }

    #[test]
    fn the_spec_and_secrets_make_a_build() {
        let b = crate::build::tests::spec();
        let job = BuildJobSpec::from_build(
            &b,
            crate::operator::crd::SourceRef {
                kind: SourceKind::Http,
                display: "https://h/a.tgz".into(),
                storage_key: None,
            },
        );
        let json = serde_json::to_string(&job).unwrap_or_default();
        let cli = crate::config::Cli::try_parse_from([
            "buildshuttle",
            "worker",
            "--spec",
            &json,
            "--sources",
            "https://tok@h/a.tgz",
            "--gm-registry-username",
            "u",
            "--gm-registry-password",
            "regpass",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let crate::config::Command::Worker(args) = cli.command else {
            panic!("worker")
        };
        let spec = build_spec(&args).unwrap_or_else(|e| panic!("{e}"));
        assert!(!spec.sources_stored);
        assert_eq!(spec.sources.expose(), "https://tok@h/a.tgz");
        assert_eq!(spec.image(), b.image());
        assert_eq!(
            spec.gm_registry_auth
                .map(|a| a.password.expose().to_string()),
            Some("regpass".into())
        );
        let mut no_src = (*args).clone();
        no_src.sources = None;
        assert!(matches!(
            build_spec(&no_src),
            Err(WorkerError::NoSources(SourceKind::Http))
        ));
    }
}
