//! Configuration: clap flags, each also read from the env var of CONTRACT.md, turned into
//! one validated `Config`. A bad value is a `ConfigError` naming the variable.

use crate::build::RegistryAuth;
use crate::secret::Secret;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {problem}")]
    Invalid { var: &'static str, problem: String },
}

fn invalid(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        problem: problem.into(),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "buildshuttle",
    version,
    about = "Turns application sources into pushed Docker images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (local mode unless USE_KUBERNETES=true).
    Serve(Box<ServeArgs>),
    /// Print the BuildJob CustomResourceDefinition as YAML (crds/buildjob.yaml).
    Crd,
    /// Run one build as a Kubernetes worker pod's entrypoint (set up by the controller).
    Worker(Box<WorkerArgs>),
}

/// Flags of `worker`: the build comes from the BuildJob spec (JSON) and the credentials
/// Secret (env vars the pod maps from it).
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub build: BuildArgs,
    /// The BuildJob spec as JSON (no credentials).
    #[arg(
        long,
        env = "BUILD_JOB_SPEC",
        value_name = "BUILD_JOB_SPEC",
        hide_env_values = true
    )]
    pub spec: String,
    /// The full source URI (http(s) and docker:// sources), from the credentials Secret.
    #[arg(
        long,
        env = "WORKER_SOURCES",
        value_name = "WORKER_SOURCES",
        hide_env_values = true
    )]
    pub sources: Option<String>,
    #[arg(
        long,
        env = "WORKER_GM_REGISTRY_USERNAME",
        value_name = "WORKER_GM_REGISTRY_USERNAME",
        hide_env_values = true
    )]
    pub gm_registry_username: Option<String>,
    #[arg(
        long,
        env = "WORKER_GM_REGISTRY_PASSWORD",
        value_name = "WORKER_GM_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    pub gm_registry_password: Option<String>,
    #[arg(
        long,
        env = "WORKER_DOCKER_PASSWORD",
        value_name = "WORKER_DOCKER_PASSWORD",
        hide_env_values = true
    )]
    pub docker_password: Option<String>,
    /// The build args as a JSON object, from the credentials Secret (they are often secrets).
    #[arg(
        long,
        env = "WORKER_BUILD_ARGS",
        value_name = "WORKER_BUILD_ARGS",
        hide_env_values = true
    )]
    pub build_args: Option<String>,
    /// Where the outcome JSON is written for the controller (the pod's termination message).
    #[arg(
        long,
        env = "TERMINATION_LOG_PATH",
        value_name = "TERMINATION_LOG_PATH",
        default_value = "/dev/termination-log"
    )]
    pub termination_log_path: PathBuf,
    /// How long to wait for dockerd (a dind sidecar) to answer, in seconds.
    #[arg(
        long,
        env = "DOCKER_WAIT_SECONDS",
        value_name = "DOCKER_WAIT_SECONDS",
        default_value_t = 120
    )]
    pub docker_wait_seconds: u64,
}

/// An imagePullPolicy, as Kubernetes spells it (empty: unset).
fn parse_pull_policy(value: &str) -> Result<String, String> {
    match value.trim() {
        p @ ("" | "Always" | "IfNotPresent" | "Never") => Ok(p.to_string()),
        other => Err(format!("{other:?} is not Always, IfNotPresent or Never")),
    }
}

/// A boolean setting: `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, in any case
/// (clap's own parser takes only `true` and `false`, so `NO_CACHE=1` stopped the service).
fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        // Empty (`NO_CACHE=`, a template's blank) is off, as the old shuttle read it.
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{value:?} is not a boolean: use true or false")),
    }
}

/// `parse_bool` for a setting that is on by default: empty leaves it on.
fn parse_bool_default_true(value: &str) -> Result<bool, String> {
    match value.trim() {
        "" => Ok(true),
        v => parse_bool(v),
    }
}

/// Flags of `serve`. Booleans accept true/false (and 1/0, yes/no, on/off) from the environment;
/// empty means the default.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP listen port.
    #[arg(long, env = "PORT", value_name = "PORT", default_value_t = 9000)]
    pub port: u16,
    /// Listen address.
    #[arg(
        long,
        env = "LISTEN_ADDRESS",
        value_name = "LISTEN_ADDRESS",
        default_value = "0.0.0.0"
    )]
    pub listen_address: String,
    #[command(flatten)]
    pub build: BuildArgs,
    /// Run builds as Kubernetes worker pods via BuildJob resources.
    #[arg(long, env = "USE_KUBERNETES", value_name = "USE_KUBERNETES", default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub use_kubernetes: bool,
    /// Builds running at once; more wait in a queue, first come first served.
    #[arg(long, env = "MAXIMUM_PARALLEL_BUILDS", value_name = "MAXIMUM_PARALLEL_BUILDS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub maximum_parallel_builds: u32,
    /// Local mode: at most this many builds wait in the queue; a `POST /` beyond it gets
    /// 503 and starts nothing. 0: no limit.
    #[arg(
        long,
        env = "MAX_QUEUED_BUILDS",
        value_name = "MAX_QUEUED_BUILDS",
        default_value_t = 0
    )]
    pub max_queued_builds: u64,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "MAX_REQUEST_BYTES", value_name = "MAX_REQUEST_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// How long an HTTP connection may wait for a request's headers (also between keep-alive
    /// requests) and between two pieces of a request body, in seconds; then it is closed.
    #[arg(
        long,
        env = "HTTP_IDLE_TIMEOUT_SECONDS",
        value_name = "HTTP_IDLE_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub http_idle_timeout_seconds: u64,
    /// HTTP connections served at once (at most three quarters of the open-file limit);
    /// more wait in the listen backlog.
    #[arg(
        long,
        env = "HTTP_MAX_CONNECTIONS",
        value_name = "HTTP_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub http_max_connections: usize,
    /// How long a status callback is retried before giving up, in seconds.
    #[arg(
        long,
        env = "CALLBACK_RETRY_SECONDS",
        value_name = "CALLBACK_RETRY_SECONDS",
        default_value_t = 300
    )]
    pub callback_retry_seconds: u64,
    /// Grace period for running builds on SIGTERM, in seconds.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECONDS",
        value_name = "SHUTDOWN_GRACE_SECONDS",
        default_value_t = 60
    )]
    pub shutdown_grace_seconds: u64,
    /// On SIGTERM, how long to go on serving (with `/octhc` answering 503) before closing the
    /// listener, so a Service's endpoints drop this pod before its port closes. Default: 5 with
    /// USE_KUBERNETES=true, else 0.
    #[arg(
        long,
        env = "SHUTDOWN_DELAY_SECONDS",
        value_name = "SHUTDOWN_DELAY_SECONDS"
    )]
    pub shutdown_delay_seconds: Option<u64>,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Kubernetes mode (USE_KUBERNETES=true): where BuildJobs live and how worker pods look.
#[derive(Debug, Clone, Args)]
pub struct KubernetesArgs {
    /// Namespace of BuildJobs, their Secrets and worker pods (default: the client's, e.g. the
    /// service account's namespace).
    #[arg(
        long,
        env = "KUBERNETES_NAMESPACE",
        value_name = "KUBERNETES_NAMESPACE"
    )]
    pub kubernetes_namespace: Option<String>,
    /// Run the BuildJob controller in this process (one replica leads, via a Lease); false
    /// runs only the API facade.
    #[arg(long, env = "RUN_CONTROLLER", value_name = "RUN_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set, value_parser = parse_bool_default_true)]
    pub run_controller: bool,
    /// Image a Kubernetes worker pod runs (this project's own image).
    #[arg(
        long,
        env = "DOCKER_BUILD_IMAGE",
        value_name = "DOCKER_BUILD_IMAGE",
        default_value = "akkeris/buildshuttle:latest"
    )]
    pub docker_build_image: String,
    /// Where worker pods get dockerd: a dind sidecar, the node's socket, or DOCKER_BUILD_SETTINGS.
    #[arg(
        long,
        env = "WORKER_DOCKER_MODE",
        value_name = "WORKER_DOCKER_MODE",
        value_enum,
        default_value = "dind"
    )]
    pub worker_docker_mode: crate::operator::pod::DockerMode,
    /// Image of the dind sidecar: a docker-library `docker:*-dind` image (its
    /// dockerd-entrypoint.sh is run with an explicit `dockerd` command line).
    #[arg(
        long,
        env = "DIND_IMAGE",
        value_name = "DIND_IMAGE",
        default_value = DEFAULT_DIND_IMAGE
    )]
    pub dind_image: String,
    /// MTU of the dind daemon's bridge (`dockerd --mtu`): set it below the pod network's MTU
    /// on overlay networks (e.g. 1450 for VXLAN), or builds' downloads hang. Unset: 1500.
    #[arg(long, env = "DIND_MTU", value_name = "DIND_MTU",
          value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub dind_mtu: Option<u32>,
    /// Image pull secrets of worker pods: names, comma-separated, or the Kubernetes list
    /// `[{"name": "regcred"}]` (what the chart's `imagePullSecrets` holds).
    #[arg(
        long,
        env = "WORKER_IMAGE_PULL_SECRETS",
        value_name = "WORKER_IMAGE_PULL_SECRETS"
    )]
    pub worker_image_pull_secrets: Option<String>,
    /// imagePullPolicy of the worker container (`Always`, `IfNotPresent`, `Never`); unset:
    /// Kubernetes' default. With a mutable tag, `Always` keeps workers on the API's image.
    #[arg(long, env = "WORKER_IMAGE_PULL_POLICY", value_name = "WORKER_IMAGE_PULL_POLICY", value_parser = parse_pull_policy)]
    pub worker_image_pull_policy: Option<String>,
    /// Mount the worker service account's API token into worker pods. Workers never call
    /// the API; IRSA and EKS Pod Identity inject their own token, so this stays false.
    #[arg(long, env = "WORKER_AUTOMOUNT_SERVICE_ACCOUNT_TOKEN", value_name = "WORKER_AUTOMOUNT_SERVICE_ACCOUNT_TOKEN",
          default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub worker_automount_service_account_token: bool,
    /// JSON: resources, emptyDir size limits and placement of worker pods (keys
    /// workerResources, dindResources, workSizeLimit, dindStorageSizeLimit, nodeSelector,
    /// tolerations, affinity); a key left out keeps its default.
    #[arg(
        long,
        env = "WORKER_POD_OVERRIDES",
        value_name = "WORKER_POD_OVERRIDES"
    )]
    pub worker_pod_overrides: Option<String>,
    /// This installation's name (the chart sets the release name): BuildJobs are labelled
    /// with it and the controller acts only on its own, so two installations can share a
    /// namespace. Empty: unlabelled BuildJobs.
    #[arg(
        long,
        env = "INSTANCE_NAME",
        value_name = "INSTANCE_NAME",
        default_value = ""
    )]
    pub instance_name: String,
    /// A Secret imported whole into worker pods' environment (S3 credentials, TLS dockerd settings).
    #[arg(long, env = "WORKER_ENV_SECRET", value_name = "WORKER_ENV_SECRET")]
    pub worker_env_secret: Option<String>,
    /// WORKER_DOCKER_MODE=host: the group id owning the node's docker socket, given to the
    /// (non-root) worker as a supplemental group.
    #[arg(
        long,
        env = "WORKER_DOCKER_SOCKET_GID",
        value_name = "WORKER_DOCKER_SOCKET_GID"
    )]
    pub worker_docker_socket_gid: Option<i64>,
    /// Service account of worker pods (its token is never mounted).
    #[arg(
        long,
        env = "WORKER_SERVICE_ACCOUNT",
        value_name = "WORKER_SERVICE_ACCOUNT"
    )]
    pub worker_service_account: Option<String>,
    /// How many times an evicted or vanished worker pod is re-created.
    #[arg(
        long,
        env = "MAX_POD_RETRIES",
        value_name = "MAX_POD_RETRIES",
        default_value_t = 2
    )]
    pub max_pod_retries: u32,
    /// Seconds a finished BuildJob is kept (its sources and logs stay in storage).
    #[arg(
        long,
        env = "BUILDJOB_TTL_SECONDS",
        value_name = "BUILDJOB_TTL_SECONDS",
        default_value_t = 86_400
    )]
    pub buildjob_ttl_seconds: u64,
    /// Name of the coordination.k8s.io Lease electing the active controller.
    #[arg(
        long,
        env = "LEASE_NAME",
        value_name = "LEASE_NAME",
        default_value = "buildshuttle-controller"
    )]
    pub lease_name: String,
    /// Seconds a Lease holder stays leader without renewing.
    #[arg(long, env = "LEASE_SECONDS", value_name = "LEASE_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(3..))]
    pub lease_seconds: u64,
    /// This replica's identity in the Lease and in events (the pod name).
    #[arg(long, env = "POD_NAME", value_name = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Seconds an unschedulable worker pod may wait for a node before the build fails.
    #[arg(
        long,
        env = "POD_PENDING_LIMIT_SECONDS",
        value_name = "POD_PENDING_LIMIT_SECONDS",
        default_value_t = 600
    )]
    pub pod_pending_limit_seconds: u64,
    /// How many times a worker pod refused by a ResourceQuota is tried again before the
    /// build fails (other admission refusals fail it at once).
    #[arg(
        long,
        env = "MAX_ADMISSION_RETRIES",
        value_name = "MAX_ADMISSION_RETRIES",
        default_value_t = 3
    )]
    pub max_admission_retries: u32,
    /// Seconds past its deletion deadline after which a still-terminating worker pod is
    /// taken for lost (its node is gone): force-deleted and replaced.
    #[arg(
        long,
        env = "POD_LOST_GRACE_SECONDS",
        value_name = "POD_LOST_GRACE_SECONDS",
        default_value_t = 60
    )]
    pub pod_lost_grace_seconds: u64,
    /// Seconds between two looks of a queued BuildJob at the queue. A BuildJob that
    /// finishes wakes the oldest queued ones at once; this look is the fallback (a slot
    /// freed by a deletion, an event this replica missed).
    #[arg(
        long,
        env = "QUEUED_RECHECK_SECONDS",
        value_name = "QUEUED_RECHECK_SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub queued_recheck_seconds: u64,
}

/// Validated Kubernetes-mode settings.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    pub namespace: Option<String>,
    pub run_controller: bool,
    pub worker_image: String,
    pub docker_mode: crate::operator::pod::DockerMode,
    pub dind_image: String,
    pub dind_mtu: Option<u32>,
    pub worker_env_secret: Option<String>,
    pub worker_docker_socket_gid: Option<i64>,
    pub worker_service_account: Option<String>,
    pub worker_image_pull_secrets: Vec<String>,
    pub worker_image_pull_policy: Option<String>,
    pub worker_automount_token: bool,
    pub worker_pod: WorkerPodOverrides,
    /// INSTANCE_NAME: set (non-empty) when this installation labels and selects its own
    /// BuildJobs (a valid label value).
    pub instance_name: Option<String>,
    pub max_pod_retries: u32,
    pub finished_ttl: Duration,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub identity: String,
    pub pod_pending_limit: Duration,
    pub max_admission_retries: u32,
    pub pod_lost_grace: Duration,
    pub queued_recheck: Duration,
    /// DOCKER_BUILD_SETTINGS as given (passed to external-mode workers).
    pub docker_settings_json: String,
    /// SOURCES_DENY_NETWORKS as given (passed to workers).
    pub sources_deny_networks: String,
}

/// What every process that runs the pipeline needs (serve in local mode, and the worker).
#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// Build with no layer cache.
    #[arg(long, env = "NO_CACHE", value_name = "NO_CACHE", default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub no_cache: bool,
    /// Before building, pull the app's previous image (`…:latest`) and reuse its layers, so
    /// an empty daemon (a dind worker pod) rebuilds warm. Off when NO_CACHE is true.
    #[arg(long, env = "CACHE_FROM_LATEST", value_name = "CACHE_FROM_LATEST", default_value_t = true, action = clap::ArgAction::Set, value_parser = parse_bool_default_true)]
    pub cache_from_latest: bool,
    /// Which of dockerd's builders builds: `true`/`1` BuildKit, `false`/`0` the classic
    /// builder, `auto` BuildKit where the daemon is the build's own (dind worker pods) and the
    /// classic builder on a daemon that concurrent builds share (local mode, host and external
    /// workers), where dockerd 20.10's BuildKit has been seen to wedge every later build.
    #[arg(long = "docker-buildkit", env = "DOCKER_BUILDKIT", value_name = "DOCKER_BUILDKIT", default_value = "auto", value_parser = Builder::parse)]
    pub builder: Builder,
    /// A repository (`host[:port]/path`) that keeps every app's layer cache as
    /// `{CACHE_REPOSITORY}/{app}-{app_uuid}:latest` instead of the app's own `…:latest`:
    /// pulled before a build, pushed after a successful one. Credentials: the build's
    /// `gm_registry_auth` on the same host, else EXTRA_DOCKER_REGISTRY_CONFIG's for the host.
    #[arg(long, env = "CACHE_REPOSITORY", value_name = "CACHE_REPOSITORY")]
    pub cache_repository: Option<String>,
    /// Where dockerd is, as dockerode-style JSON.
    #[arg(
        long,
        env = "DOCKER_BUILD_SETTINGS",
        value_name = "DOCKER_BUILD_SETTINGS",
        default_value = r#"{"socketPath":"/var/run/docker.sock"}"#,
        hide_default_value = true
    )]
    pub docker_build_settings: String,
    /// Local storage root (state, sources, logs) when S3 is not configured.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "./buildshuttle-data"
    )]
    pub data_dir: PathBuf,
    /// JSON object merged into every build's build_args (the request wins on a clash).
    #[arg(long, env = "EXTRA_BUILD_ARGS", value_name = "EXTRA_BUILD_ARGS")]
    pub extra_build_args: Option<String>,
    /// JSON {"host": {"username":…, "password":…}}: extra registries a build may pull from.
    #[arg(
        long,
        env = "EXTRA_DOCKER_REGISTRY_CONFIG",
        value_name = "EXTRA_DOCKER_REGISTRY_CONFIG",
        hide_env_values = true
    )]
    pub extra_docker_registry_config: Option<String>,
    /// A build running longer than this fails, in milliseconds.
    #[arg(long, env = "TIMEOUT_IN_MS", value_name = "TIMEOUT_IN_MS", default_value_t = 1_200_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_in_ms: u64,
    /// Topic for build log lines.
    #[arg(
        long,
        env = "KAFKA_TOPIC",
        value_name = "KAFKA_TOPIC",
        default_value = "alamobuildlogs"
    )]
    pub kafka_topic: String,
    /// Also print build output on the service's stdout.
    #[arg(long, env = "SHOW_BUILD_LOGS", value_name = "SHOW_BUILD_LOGS", default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub show_build_logs: bool,
    /// What the stored build log keeps whole, in bytes: later lines are held back, and only
    /// their last 64 KiB are written when the build ends, after a note saying what was left
    /// out (Kafka and stdout still get every line), so a runaway step cannot fill DATA_DIR.
    #[arg(long, env = "MAX_LOG_BYTES", value_name = "MAX_LOG_BYTES", default_value_t = 100 << 20)]
    pub max_log_bytes: u64,
    /// Largest source archive (download size), in bytes.
    #[arg(long, env = "MAX_SOURCE_BYTES", value_name = "MAX_SOURCE_BYTES", default_value_t = 1 << 30)]
    pub max_source_bytes: u64,
    /// Largest expanded build context, in bytes.
    #[arg(long, env = "MAX_CONTEXT_BYTES", value_name = "MAX_CONTEXT_BYTES", default_value_t = 4 << 30)]
    pub max_context_bytes: u64,
    /// Most entries a source archive may hold.
    #[arg(
        long,
        env = "MAX_ARCHIVE_ENTRIES",
        value_name = "MAX_ARCHIVE_ENTRIES",
        default_value_t = 200_000
    )]
    pub max_archive_entries: u64,
    /// Seconds to wait for a source server to accept a connection.
    #[arg(
        long,
        env = "SOURCES_CONNECT_TIMEOUT_SECONDS",
        value_name = "SOURCES_CONNECT_TIMEOUT_SECONDS",
        default_value_t = 15
    )]
    pub sources_connect_timeout_seconds: u64,
    /// Seconds a source download may take in all.
    #[arg(
        long,
        env = "SOURCES_TOTAL_TIMEOUT_SECONDS",
        value_name = "SOURCES_TOTAL_TIMEOUT_SECONDS",
        default_value_t = 600
    )]
    pub sources_total_timeout_seconds: u64,
    /// Networks (comma-separated CIDRs) sources are never fetched from, on any redirect hop.
    #[arg(
        long,
        env = "SOURCES_DENY_NETWORKS",
        value_name = "SOURCES_DENY_NETWORKS",
        default_value = "169.254.0.0/16,fe80::/10,fd00:ec2::254/128"
    )]
    pub sources_deny_networks: String,
    /// Legacy: the seed used node's debug module; any value turns on debug logging.
    #[arg(long, env = "DEBUG", value_name = "DEBUG")]
    pub debug: Option<String>,
    #[command(flatten)]
    pub s3: S3Args,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Where dockerd is (DOCKER_BUILD_SETTINGS), parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerSettings {
    Socket(String),
    Http {
        address: String,
    },
    Https {
        address: String,
        ca: String,
        cert: Secret,
        key: Secret,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDockerSettings {
    socket_path: Option<String>,
    protocol: Option<String>,
    host: Option<String>,
    port: Option<serde_json::Value>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl DockerSettings {
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        const VAR: &str = "DOCKER_BUILD_SETTINGS";
        let raw: RawDockerSettings = serde_json::from_str(json)
            .map_err(|e| invalid(VAR, format!("not valid JSON ({e})")))?;
        if let Some(path) = raw.socket_path {
            return Ok(Self::Socket(path));
        }
        let host = raw
            .host
            .ok_or_else(|| invalid(VAR, "needs either \"socketPath\" or \"host\""))?;
        let (scheme_in_host, bare) = match host.split_once("://") {
            Some((s, rest)) => (
                Some(s.to_ascii_lowercase()),
                rest.trim_end_matches('/').to_string(),
            ),
            None => (None, host.trim_end_matches('/').to_string()),
        };
        let tls = raw.ca.is_some() || raw.cert.is_some() || raw.key.is_some();
        let protocol = raw
            .protocol
            .map(|p| p.to_ascii_lowercase())
            .or(scheme_in_host)
            .unwrap_or_else(|| if tls { "https".into() } else { "http".into() });
        let port = match raw.port {
            None => None,
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(serde_json::Value::String(s)) if s.parse::<u16>().is_ok() => Some(s),
            Some(other) => {
                return Err(invalid(
                    VAR,
                    format!("\"port\" is not a port number: {other}"),
                ))
            }
        };
        let port = port.unwrap_or_else(|| {
            if protocol == "https" {
                "2376".into()
            } else {
                "2375".into()
            }
        });
        let address = format!("{bare}:{port}");
        match protocol.as_str() {
            "http" | "tcp" => Ok(Self::Http { address }),
            "https" => {
                let (Some(ca), Some(cert), Some(key)) = (raw.ca, raw.cert, raw.key) else {
                    return Err(invalid(VAR, "https needs \"ca\", \"cert\" and \"key\""));
                };
                Ok(Self::Https {
                    address,
                    ca,
                    cert: Secret::new(cert),
                    key: Secret::new(key),
                })
            }
            other => Err(invalid(
                VAR,
                format!("unknown protocol {other:?} (use http or https)"),
            )),
        }
    }
}

/// DOCKER_BUILDKIT: which of dockerd's builders builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builder {
    /// BuildKit on a daemon that is the build's own, else the classic builder.
    Auto,
    BuildKit,
    Classic,
}

impl Builder {
    pub fn parse(value: &str) -> Result<Builder, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Builder::Auto),
            "1" | "true" | "yes" | "on" => Ok(Builder::BuildKit),
            "0" | "false" | "no" | "off" => Ok(Builder::Classic),
            other => Err(format!(
                "{other:?} is not one of auto, true (1) or false (0)"
            )),
        }
    }

    /// Whether to build with BuildKit, given whether the daemon serves this build alone.
    pub fn buildkit(self, own_daemon: bool) -> bool {
        match self {
            Builder::Auto => own_daemon,
            Builder::BuildKit => true,
            Builder::Classic => false,
        }
    }
}

/// Everything the pipeline needs, validated.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    pub no_cache: bool,
    pub cache_from_latest: bool,
    /// DOCKER_BUILDKIT.
    pub builder: Builder,
    /// CACHE_REPOSITORY, validated (no trailing `/`).
    pub cache_repository: Option<String>,
    pub docker: DockerSettings,
    pub data_dir: PathBuf,
    pub extra_build_args: BTreeMap<String, String>,
    pub extra_registries: BTreeMap<String, RegistryAuth>,
    pub timeout: Duration,
    pub kafka_topic: String,
    pub show_build_logs: bool,
    /// MAX_LOG_BYTES.
    pub max_log_bytes: u64,
    pub limits: Limits,
    pub sources_connect_timeout: Duration,
    pub sources_total_timeout: Duration,
    /// S3 storage, when `S3_BUCKET` is set; else local files under `DATA_DIR`.
    pub s3: Option<S3Config>,
    pub kafka_delivery_timeout: Duration,
    pub deny_networks: crate::pipeline::sources::DenyList,
}

/// Size limits on sources and contexts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_source_bytes: u64,
    pub max_context_bytes: u64,
    pub max_archive_entries: u64,
}

impl BuildArgs {
    pub fn validate(&self) -> Result<BuildConfig, ConfigError> {
        Ok(BuildConfig {
            no_cache: self.no_cache,
            cache_from_latest: self.cache_from_latest,
            builder: self.builder,
            cache_repository: parse_cache_repository(self.cache_repository.as_deref())?,
            docker: DockerSettings::parse(&self.docker_build_settings)?,
            data_dir: self.data_dir.clone(),
            extra_build_args: parse_extra_build_args(self.extra_build_args.as_deref())?,
            extra_registries: parse_extra_registries(self.extra_docker_registry_config.as_deref())?,
            timeout: Duration::from_millis(self.timeout_in_ms),
            kafka_topic: self.kafka_topic.clone(),
            show_build_logs: self.show_build_logs,
            max_log_bytes: self.max_log_bytes,
            limits: Limits {
                max_source_bytes: self.max_source_bytes,
                max_context_bytes: self.max_context_bytes,
                max_archive_entries: self.max_archive_entries,
            },
            sources_connect_timeout: Duration::from_secs(self.sources_connect_timeout_seconds),
            sources_total_timeout: Duration::from_secs(self.sources_total_timeout_seconds),
            s3: self.s3.validate()?,
            kafka_delivery_timeout: Duration::from_millis(self.kafka.kafka_delivery_timeout_ms),
            deny_networks: parse_deny_networks(&self.sources_deny_networks)?,
        })
    }

    /// The tracing filter: RUST_LOG wins; DEBUG (legacy) means debug for buildshuttle's
    /// own lines only (a library's debug lines may hold what it sends: bollard logs every
    /// request URL, a build's args in it); else info.
    pub fn log_filter(&self) -> String {
        std::env::var("RUST_LOG").unwrap_or_else(|_| {
            if self.debug.as_deref().is_some_and(|d| !d.is_empty()) {
                "info,buildshuttle=debug".into()
            } else {
                "info".into()
            }
        })
    }
}

fn parse_deny_networks(list: &str) -> Result<crate::pipeline::sources::DenyList, ConfigError> {
    let nets = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        "SOURCES_DENY_NETWORKS",
                        format!("{s:?} is not a CIDR (e.g. 169.254.0.0/16)"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::pipeline::sources::DenyList(nets))
}

fn parse_extra_build_args(json: Option<&str>) -> Result<BTreeMap<String, String>, ConfigError> {
    const VAR: &str = "EXTRA_BUILD_ARGS";
    let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
        .map_err(|e| invalid(VAR, format!("must be a JSON object ({e})")))?;
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(invalid(VAR, format!("value of {k:?} must be a string"))),
        })
        .collect()
}

/// `host[:port]/path`: a registry host and a repository path, no scheme, tag or digest.
fn parse_cache_repository(raw: Option<&str>) -> Result<Option<String>, ConfigError> {
    const VAR: &str = "CACHE_REPOSITORY";
    let Some(repo) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let repo = repo.trim_end_matches('/');
    let bad = |why: &str| {
        invalid(
            VAR,
            format!(
                "{repo:?} {why} (expected host[:port]/path, e.g. registry.example.com/build-cache)"
            ),
        )
    };
    if repo.contains("://") {
        return Err(bad("has a scheme"));
    }
    let Some((host, path)) = repo.split_once('/') else {
        return Err(bad("has no repository path after the host"));
    };
    if host.is_empty() || path.is_empty() || path.split('/').any(str::is_empty) {
        return Err(bad("has an empty host or path segment"));
    }
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
    if !path_ok {
        return Err(bad(
            "has a path with characters a repository name cannot have (lowercase letters, digits, . _ - / only; no tag)",
        ));
    }
    if host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(bad("has an invalid host"));
    }
    Ok(Some(repo.to_string()))
}

fn parse_extra_registries(
    json: Option<&str>,
) -> Result<BTreeMap<String, RegistryAuth>, ConfigError> {
    const VAR: &str = "EXTRA_DOCKER_REGISTRY_CONFIG";
    let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
        return Ok(BTreeMap::new());
    };
    // The error must not echo the JSON: it holds passwords.
    serde_json::from_str(json).map_err(|e| {
        invalid(
            VAR,
            format!(
                "must be a JSON object {{\"host\": {{\"username\": …, \"password\": …}}}} (error at line {} column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub build: BuildConfig,
    pub use_kubernetes: bool,
    pub maximum_parallel_builds: usize,
    /// `None`: no limit.
    pub max_queued_builds: Option<usize>,
    pub max_request_bytes: usize,
    pub http: crate::http_server::Limits,
    pub callback_retry_for: Duration,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub kubernetes: KubernetesConfig,
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let build = self.build.validate()?;
        if self.use_kubernetes && build.s3.is_none() {
            // Worker pods run on other nodes: they read staged `data:` archives from, and
            // leave build logs in, storage the API can read too.
            return Err(invalid(
                "S3_BUCKET",
                "must be set with USE_KUBERNETES=true: worker pods read staged sources from \
                 and store build logs in S3 (a local DATA_DIR is not shared with them)",
            ));
        }
        if self.use_kubernetes && self.max_queued_builds > 0 {
            // Queued builds are BuildJobs there, in the cluster's store, not in this process.
            return Err(invalid(
                "MAX_QUEUED_BUILDS",
                "applies to local mode only; with USE_KUBERNETES=true leave it unset (queued \
                 builds are BuildJobs, kept by the cluster, not in this process's memory)",
            ));
        }
        let k = &self.kubernetes;
        Ok(Config {
            listen: format!("{}:{}", self.listen_address, self.port),
            build,
            use_kubernetes: self.use_kubernetes,
            maximum_parallel_builds: self.maximum_parallel_builds as usize,
            max_queued_builds: (self.max_queued_builds > 0)
                .then(|| usize::try_from(self.max_queued_builds).unwrap_or(usize::MAX)),
            max_request_bytes: self.max_request_bytes,
            http: crate::http_server::Limits::new(
                Duration::from_secs(self.http_idle_timeout_seconds.max(1)),
                self.http_max_connections,
            ),
            callback_retry_for: Duration::from_secs(self.callback_retry_seconds),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            // Only behind a Service does traffic keep coming for a moment after SIGTERM.
            shutdown_delay: Duration::from_secs(
                self.shutdown_delay_seconds
                    .unwrap_or(if self.use_kubernetes { 5 } else { 0 }),
            ),
            kubernetes: {
                KubernetesConfig {
                    namespace: k.kubernetes_namespace.clone().filter(|n| !n.is_empty()),
                    run_controller: k.run_controller,
                    worker_image: k.docker_build_image.clone(),
                    docker_mode: k.worker_docker_mode,
                    dind_image: k.dind_image.clone(),
                    dind_mtu: k.dind_mtu,
                    worker_env_secret: k.worker_env_secret.clone().filter(|n| !n.is_empty()),
                    worker_docker_socket_gid: k.worker_docker_socket_gid,
                    worker_service_account: k
                        .worker_service_account
                        .clone()
                        .filter(|n| !n.is_empty()),
                    worker_image_pull_secrets: parse_pull_secrets(
                        k.worker_image_pull_secrets.as_deref(),
                    )?,
                    worker_image_pull_policy: k
                        .worker_image_pull_policy
                        .clone()
                        .filter(|p| !p.is_empty()),
                    worker_automount_token: k.worker_automount_service_account_token,
                    worker_pod: WorkerPodOverrides::parse(k.worker_pod_overrides.as_deref())?,
                    instance_name: parse_instance_name(&k.instance_name)?,
                    max_pod_retries: k.max_pod_retries,
                    finished_ttl: Duration::from_secs(k.buildjob_ttl_seconds),
                    lease_name: k.lease_name.clone(),
                    lease_duration: Duration::from_secs(k.lease_seconds),
                    // As client-go does: unique per process even when two share a host name.
                    identity: k
                        .pod_name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| {
                            let host = std::env::var("HOSTNAME").unwrap_or_default();
                            let host = if host.is_empty() {
                                "buildshuttle".into()
                            } else {
                                host
                            };
                            format!("{host}_{}", uuid::Uuid::new_v4())
                        }),
                    pod_pending_limit: Duration::from_secs(k.pod_pending_limit_seconds),
                    max_admission_retries: k.max_admission_retries,
                    pod_lost_grace: Duration::from_secs(k.pod_lost_grace_seconds),
                    queued_recheck: Duration::from_secs(k.queued_recheck_seconds),
                    docker_settings_json: self.build.docker_build_settings.clone(),
                    sources_deny_networks: self.build.sources_deny_networks.clone(),
                }
            },
        })
    }
}

/// The dind sidecar's default image: pinned to a release (a floating tag changes the daemon
/// under running installations).
pub const DEFAULT_DIND_IMAGE: &str = "docker:29.4.3-dind";

/// A Kubernetes quantity (`500m`, `2Gi`, `1e3`), checked at start: a typo would otherwise
/// fail every worker pod's creation with a 422.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(try_from = "QuantityText", into = "String")]
pub struct Quantity(String);

/// A quantity as YAML/JSON may write it: a string or a bare number.
#[derive(Deserialize)]
#[serde(untagged)]
enum QuantityText {
    Text(String),
    Number(serde_json::Number),
}

impl TryFrom<QuantityText> for Quantity {
    type Error = String;
    fn try_from(t: QuantityText) -> Result<Self, String> {
        let text = match t {
            QuantityText::Text(s) => s.trim().to_string(),
            QuantityText::Number(n) => n.to_string(),
        };
        Quantity::parse(&text)
    }
}

impl From<Quantity> for String {
    fn from(q: Quantity) -> String {
        q.0
    }
}

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, String> {
        quantity_value(text)
            .map(|_| Quantity(text.to_string()))
            .ok_or_else(|| format!("{text:?} is not a Kubernetes quantity (e.g. 500m, 2Gi)"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value in base units (cores, bytes).
    pub fn value(&self) -> f64 {
        quantity_value(&self.0).unwrap_or(0.0)
    }
}

/// The value of a quantity, or None when it is not one (Kubernetes' grammar: a signed
/// decimal, then a binary suffix Ki…Ei, a decimal suffix n u m k M G T P E, or an exponent).
fn quantity_value(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || !number.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(n * factor).filter(|v| v.is_finite() && *v >= 0.0)
}

/// Requests and limits of one container, by resource name.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    pub requests: BTreeMap<String, Quantity>,
    pub limits: BTreeMap<String, Quantity>,
}

impl Resources {
    fn of(pairs: &[(&str, &str)], limits: &[(&str, &str)]) -> Self {
        let map = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect()
        };
        Resources {
            requests: map(pairs),
            limits: map(limits),
        }
    }

    /// What the API server refuses: a request above its limit.
    fn check(&self, what: &str) -> Result<(), String> {
        for (name, req) in &self.requests {
            if let Some(lim) = self.limits.get(name) {
                if req.value() > lim.value() {
                    return Err(format!(
                        "{what}: requests.{name} ({}) is more than limits.{name} ({})",
                        req.as_str(),
                        lim.as_str()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// WORKER_POD_OVERRIDES: what a worker pod may use and where it may run. Every key left out
/// keeps the default below (the chart's `worker.pod` defaults are the same); `null` removes a
/// size limit or the affinity.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct WorkerPodOverrides {
    /// The worker container (fetches and unpacks sources, streams the context).
    pub worker_resources: Resources,
    /// The dind sidecar (runs the build itself; its /var/lib/docker is an emptyDir).
    pub dind_resources: Resources,
    /// `sizeLimit` of the worker's /work emptyDir (source archive and unpacked context:
    /// MAX_SOURCE_BYTES + MAX_CONTEXT_BYTES fit in the default).
    pub work_size_limit: Option<Quantity>,
    /// `sizeLimit` of dind's /var/lib/docker emptyDir (base images, layers, the result).
    pub dind_storage_size_limit: Option<Quantity>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
}

impl Default for WorkerPodOverrides {
    fn default() -> Self {
        WorkerPodOverrides {
            worker_resources: Resources::of(
                &[
                    ("cpu", "250m"),
                    ("memory", "256Mi"),
                    ("ephemeral-storage", "1Gi"),
                ],
                &[("memory", "1Gi"), ("ephemeral-storage", "8Gi")],
            ),
            dind_resources: Resources::of(
                &[
                    ("cpu", "1"),
                    ("memory", "1Gi"),
                    ("ephemeral-storage", "10Gi"),
                ],
                &[("memory", "8Gi"), ("ephemeral-storage", "50Gi")],
            ),
            work_size_limit: Some(Quantity("6Gi".into())),
            dind_storage_size_limit: Some(Quantity("40Gi".into())),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
        }
    }
}

impl WorkerPodOverrides {
    pub fn parse(json: Option<&str>) -> Result<Self, ConfigError> {
        const VAR: &str = "WORKER_POD_OVERRIDES";
        let Some(json) = json.filter(|j| !j.trim().is_empty()) else {
            return Ok(Self::default());
        };
        let mut o: Self = serde_json::from_str(json)
            .map_err(|e| invalid(VAR, format!("not valid worker pod settings ({e})")))?;
        // `affinity: {}` (the chart's default) is no affinity.
        if o.affinity
            .as_ref()
            .is_some_and(|a| a == &Default::default())
        {
            o.affinity = None;
        }
        o.worker_resources
            .check("workerResources")
            .and_then(|_| o.dind_resources.check("dindResources"))
            .map_err(|e| invalid(VAR, e))?;
        Ok(o)
    }
}

fn parse_pull_secrets(text: Option<&str>) -> Result<Vec<String>, ConfigError> {
    const VAR: &str = "WORKER_IMAGE_PULL_SECRETS";
    let text = text.map(str::trim).unwrap_or_default();
    let names: Vec<String> = if text.starts_with('[') {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Named {
            name: String,
        }
        serde_json::from_str::<Vec<Named>>(text)
            .map_err(|e| invalid(VAR, format!("must be names or [{{\"name\": …}}] ({e})")))?
            .into_iter()
            .map(|n| n.name)
            .collect()
    } else {
        text.split(',').map(|n| n.trim().to_string()).collect()
    };
    let names: Vec<String> = names.into_iter().filter(|n| !n.is_empty()).collect();
    if let Some(bad) = names.iter().find(|n| !is_dns_subdomain(n)) {
        return Err(invalid(VAR, format!("{bad:?} is not a Secret name")));
    }
    Ok(names)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// INSTANCE_NAME goes into a label value: at most 63 characters of `[A-Za-z0-9._-]`,
/// starting and ending with a letter or digit.
fn parse_instance_name(s: &str) -> Result<Option<String>, ConfigError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && edge(s.chars().next())
        && edge(s.chars().last());
    if !ok {
        return Err(invalid(
            "INSTANCE_NAME",
            format!("{s:?} is not a label value (at most 63 of A-Z a-z 0-9 - _ ., starting and ending with a letter or digit)"),
        ));
    }
    Ok(Some(s.to_string()))
}

#[cfg(test)]
mod kubernetes_tests {
    use super::*;

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        for (text, value) in [
            ("500m", 0.5),
            ("2", 2.0),
            ("1.5Gi", 1.5 * 1024.0 * 1024.0 * 1024.0),
            ("1e3", 1000.0),
            ("128974848", 128974848.0),
            ("129M", 129e6),
        ] {
            let q = Quantity::parse(text).unwrap();
            assert!((q.value() - value).abs() < 1e-6, "{text}");
        }
        for bad in ["", "Gi", "1GB", "1.2.3Mi", "-1", "ten"] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn worker_pod_overrides_keep_defaults_and_name_the_variable_when_wrong() {
        assert_eq!(
            WorkerPodOverrides::parse(None).unwrap(),
            WorkerPodOverrides::default()
        );
        let o = WorkerPodOverrides::parse(Some(
            r#"{"dindStorageSizeLimit": "100Gi", "workSizeLimit": null,
                "workerResources": {"requests": {"cpu": 1, "memory": "1Gi"}},
                "nodeSelector": {"pool": "builds"},
                "tolerations": [{"key": "builds", "operator": "Exists", "effect": "NoSchedule"}]}"#,
        ))
        .unwrap();
        assert_eq!(o.dind_storage_size_limit, Some(Quantity("100Gi".into())));
        assert_eq!(o.work_size_limit, None);
        assert_eq!(o.worker_resources.requests["cpu"].as_str(), "1");
        assert!(
            o.worker_resources.limits.is_empty(),
            "a key replaces, whole"
        );
        assert_eq!(
            o.dind_resources,
            WorkerPodOverrides::default().dind_resources
        );
        assert_eq!(o.tolerations[0].key.as_deref(), Some("builds"));
        for bad in [
            "{",
            r#"{"workSizeLimt": "1Gi"}"#,
            r#"{"workSizeLimit": "1GB"}"#,
            r#"{"dindResources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}"#,
            r#"{"tolerations": {}}"#,
        ] {
            let e = WorkerPodOverrides::parse(Some(bad))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("WORKER_POD_OVERRIDES: "), "{bad}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn pull_secrets_and_instance_names() {
        assert_eq!(parse_pull_secrets(Some(" a, b.c ,")).unwrap(), ["a", "b.c"]);
        assert_eq!(
            parse_pull_secrets(Some(r#"[{"name":"regcred"}]"#)).unwrap(),
            ["regcred"]
        );
        assert!(parse_pull_secrets(None).unwrap().is_empty());
        assert!(parse_pull_secrets(Some("[]")).unwrap().is_empty());
        for bad in ["Reg_Cred", r#"[{"nom":"x"}]"#, "[1"] {
            let e = parse_pull_secrets(Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with("WORKER_IMAGE_PULL_SECRETS"), "{e}");
        }
        assert_eq!(parse_instance_name(" ").unwrap(), None);
        assert_eq!(
            parse_instance_name("bs-prod").unwrap().as_deref(),
            Some("bs-prod")
        );
        for bad in ["-x", "a b", &"x".repeat(64)] {
            let e = parse_instance_name(bad).unwrap_err().to_string();
            assert!(e.starts_with("INSTANCE_NAME"), "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn boolean_settings_take_1_0_yes_no_in_any_case() {
        use clap::Parser;
        for (given, want) in [
            ("1", true),
            ("TRUE", true),
            ("yes", true),
            ("0", false),
            ("Off", false),
        ] {
            let cli = Cli::try_parse_from(["buildshuttle", "serve", "--no-cache", given])
                .unwrap_or_else(|e| panic!("{given}: {e}"));
            let Command::Serve(serve) = cli.command else {
                panic!("not serve")
            };
            assert_eq!(serve.build.no_cache, want, "{given}");
        }
        let e = Cli::try_parse_from(["buildshuttle", "serve", "--no-cache", "ture"]).unwrap_err();
        assert!(e.to_string().contains("use true or false"), "{e}");
    }

    /// `NO_CACHE=` (a template's blank) is the default, as the old shuttle read it, not a
    /// refusal to start.
    #[test]
    fn an_empty_boolean_setting_is_its_default() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "buildshuttle",
            "serve",
            "--no-cache",
            "",
            "--show-build-logs",
            "",
            "--use-kubernetes",
            "",
            "--cache-from-latest",
            "",
            "--run-controller",
            "",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        assert!(!serve.build.no_cache && !serve.build.show_build_logs && !serve.use_kubernetes);
        assert!(serve.build.cache_from_latest && serve.kubernetes.run_controller);
    }

    #[test]
    fn docker_buildkit_auto_means_buildkit_only_on_a_daemon_of_the_builds_own() {
        assert_eq!(Builder::parse("auto"), Ok(Builder::Auto));
        for on in ["1", "true", "TRUE", "yes"] {
            assert_eq!(Builder::parse(on), Ok(Builder::BuildKit), "{on}");
        }
        for off in ["0", "false", "no", "off"] {
            assert_eq!(Builder::parse(off), Ok(Builder::Classic), "{off}");
        }
        assert!(Builder::parse("maybe")
            .unwrap_err()
            .contains("auto, true (1) or false (0)"));
        assert!(Builder::Auto.buildkit(true) && !Builder::Auto.buildkit(false));
        assert!(Builder::BuildKit.buildkit(false) && !Builder::Classic.buildkit(true));
    }

    #[test]
    fn cache_repository_is_a_host_and_a_path() {
        assert_eq!(parse_cache_repository(None).unwrap(), None);
        assert_eq!(parse_cache_repository(Some("  ")).unwrap(), None);
        assert_eq!(
            parse_cache_repository(Some("registry.example.com:5000/build-cache/")).unwrap(),
            Some("registry.example.com:5000/build-cache".into())
        );
        for bad in [
            "https://r.example/cache",
            "r.example",
            "r.example/Cache",
            "r.example/cache:latest",
            "r.example//cache",
            "/cache",
        ] {
            let e = parse_cache_repository(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("CACHE_REPOSITORY"), "{bad}: {e}");
        }
    }

    #[test]
    fn docker_settings_shapes() {
        assert_eq!(
            DockerSettings::parse(r#"{"socketPath":"/var/run/docker.sock"}"#).unwrap(),
            DockerSettings::Socket("/var/run/docker.sock".into())
        );
        assert_eq!(
            DockerSettings::parse(r#"{"host":"http://127.0.0.1","port":"2375"}"#).unwrap(),
            DockerSettings::Http {
                address: "127.0.0.1:2375".into()
            }
        );
        assert_eq!(
            DockerSettings::parse(r#"{"host":"10.0.0.5","port":2375}"#).unwrap(),
            DockerSettings::Http {
                address: "10.0.0.5:2375".into()
            }
        );
        let tls = DockerSettings::parse(
            r#"{"protocol":"https","host":"d.example","port":2376,"ca":"C","cert":"T","key":"K"}"#,
        )
        .unwrap();
        assert!(
            matches!(tls, DockerSettings::Https { ref address, .. } if address == "d.example:2376")
        );
        for bad in [
            "nope",
            r#"{"port":1}"#,
            r#"{"protocol":"https","host":"h"}"#,
            r#"{"host":"h","port":"x"}"#,
        ] {
            let e = DockerSettings::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("DOCKER_BUILD_SETTINGS"), "{e}");
        }
    }

    #[test]
    fn extra_build_args_must_be_an_object() {
        assert_eq!(
            parse_extra_build_args(Some(r#"{"A":"1","B":2}"#))
                .unwrap()
                .len(),
            2
        );
        let e = parse_extra_build_args(Some("[1]")).unwrap_err().to_string();
        assert!(e.starts_with("EXTRA_BUILD_ARGS"), "{e}");
    }

    #[test]
    fn extra_registry_errors_do_not_echo_passwords() {
        let e = parse_extra_registries(Some(
            r#"{"h": {"username": "u", "password": 5, "x": "topsecret"}}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains("topsecret"), "{e}");
        assert!(e.starts_with("EXTRA_DOCKER_REGISTRY_CONFIG"));
        let ok = parse_extra_registries(Some(r#"{"h:5000": {"username": "u", "password": "p"}}"#))
            .unwrap();
        assert_eq!(ok["h:5000"].password.expose(), "p");
    }
}

/// S3 storage for sources and logs (`S3_*`). Off unless `S3_BUCKET` is set.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// Bucket for sources and logs; unset: local files under DATA_DIR.
    #[arg(long, env = "S3_BUCKET", value_name = "S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Access key id; unset: the default AWS credential chain (env, profile, web identity, instance role).
    #[arg(long, env = "S3_ACCESS_KEY", value_name = "S3_ACCESS_KEY", hide_env_values = true, value_parser = secret_arg)]
    pub s3_access_key: Option<Secret>,
    /// Secret access key (with S3_ACCESS_KEY).
    #[arg(long, env = "S3_SECRET_KEY", value_name = "S3_SECRET_KEY", hide_env_values = true, value_parser = secret_arg)]
    pub s3_secret_key: Option<Secret>,
    /// Legacy name of the bucket's region (S3_REGION wins).
    #[arg(long, env = "S3_LOCATION", value_name = "S3_LOCATION")]
    pub s3_location: Option<String>,
    /// The bucket's region; falls back to S3_LOCATION, then the AWS default chain.
    #[arg(long, env = "S3_REGION", value_name = "S3_REGION")]
    pub s3_region: Option<String>,
    /// URL of an S3-compatible server (path-style addressing), e.g. http://127.0.0.1:9100.
    #[arg(long, env = "S3_ENDPOINT", value_name = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// How long one S3 request attempt may take, a part's upload included (16 MiB: 120 s is
    /// ~140 KiB/s); a server that accepts and never answers fails after the retries.
    #[arg(long, env = "S3_TIMEOUT_SECONDS", value_name = "S3_TIMEOUT_SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub s3_timeout_seconds: u64,
}

/// Validated S3 settings. `Debug` shows the keys as `***` (they are `Secret`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Both or neither: without them the default AWS credential chain is used.
    pub keys: Option<(Secret, Secret)>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// One request attempt's limit (`S3_TIMEOUT_SECONDS`).
    pub attempt_timeout: std::time::Duration,
}

/// Keys are parsed straight into `Secret`, so not even `Debug` of the flags shows them.
fn secret_arg(s: &str) -> Result<Secret, std::convert::Infallible> {
    Ok(Secret::new(s.trim()))
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn non_empty_secret(v: &Option<Secret>) -> Option<Secret> {
    v.clone().filter(|s| !s.is_empty())
}

impl S3Args {
    pub fn validate(&self) -> Result<Option<S3Config>, ConfigError> {
        let endpoint = non_empty(&self.s3_endpoint);
        let Some(bucket) = non_empty(&self.s3_bucket) else {
            if endpoint.is_some() {
                return Err(invalid("S3_BUCKET", "must be set when S3_ENDPOINT is"));
            }
            return Ok(None);
        };
        let keys = match (
            non_empty_secret(&self.s3_access_key),
            non_empty_secret(&self.s3_secret_key),
        ) {
            (Some(id), Some(secret)) => Some((id, secret)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "S3_SECRET_KEY",
                    "must be set when S3_ACCESS_KEY is",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "S3_ACCESS_KEY",
                    "must be set when S3_SECRET_KEY is",
                ))
            }
        };
        if let Some(ep) = &endpoint {
            let ok = reqwest::Url::parse(ep)
                .ok()
                .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return Err(invalid(
                    "S3_ENDPOINT",
                    format!("{ep:?} is not an http:// or https:// URL"),
                ));
            }
        }
        Ok(Some(S3Config {
            bucket,
            keys,
            region: non_empty(&self.s3_region).or_else(|| non_empty(&self.s3_location)),
            endpoint,
            attempt_timeout: std::time::Duration::from_secs(self.s3_timeout_seconds),
        }))
    }
}

/// Kafka log delivery (the brokers come with each request, as `kafka_hosts`).
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// How long a finished build waits for its log lines to reach Kafka, in milliseconds;
    /// lines still undelivered then are counted in one warning (the build is not failed).
    #[arg(
        long,
        env = "KAFKA_DELIVERY_TIMEOUT_MS",
        value_name = "KAFKA_DELIVERY_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub kafka_delivery_timeout_ms: u64,
}

#[cfg(test)]
mod s3_tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> S3Args {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        S3Args {
            s3_bucket: get("bucket"),
            s3_access_key: get("ak").map(Secret::new),
            s3_secret_key: get("sk").map(Secret::new),
            s3_location: get("location"),
            s3_region: get("region"),
            s3_endpoint: get("endpoint"),
            s3_timeout_seconds: 120,
        }
    }

    #[test]
    fn s3_is_off_without_a_bucket() {
        assert_eq!(args(&[]).validate().unwrap(), None);
        assert_eq!(args(&[("bucket", " ")]).validate().unwrap(), None);
        let e = args(&[("endpoint", "http://127.0.0.1:9100")])
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("S3_BUCKET"), "{e}");
    }

    #[test]
    fn region_falls_back_to_location_and_keys_come_in_pairs() {
        let c = args(&[("bucket", "b"), ("location", "eu-west-1")])
            .validate()
            .unwrap()
            .unwrap();
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.keys, None);
        let c = args(&[
            ("bucket", "b"),
            ("location", "eu-west-1"),
            ("region", "us-west-2"),
        ])
        .validate()
        .unwrap()
        .unwrap();
        assert_eq!(c.region.as_deref(), Some("us-west-2"));
        let e = args(&[("bucket", "b"), ("ak", "AKID")])
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("S3_SECRET_KEY"), "{e}");
        let e = args(&[("bucket", "b"), ("sk", "topsecret")])
            .validate()
            .unwrap_err();
        assert!(
            e.to_string().starts_with("S3_ACCESS_KEY") && !e.to_string().contains("topsecret"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_must_be_an_http_url() {
        for bad in ["127.0.0.1:9100", "ftp://h/", "http://"] {
            let e = args(&[("bucket", "b"), ("endpoint", bad)])
                .validate()
                .unwrap_err();
            assert!(e.to_string().starts_with("S3_ENDPOINT"), "{bad}: {e}");
        }
        let c = args(&[("bucket", "b"), ("endpoint", "http://127.0.0.1:9100")])
            .validate()
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9100"));
    }

    #[test]
    fn debug_hides_the_secret_key() {
        let a = args(&[("bucket", "b"), ("ak", "AKIDSECRET"), ("sk", "topsecret")]);
        let c = a.validate().unwrap().unwrap();
        for shown in [format!("{c:?}"), format!("{a:?}")] {
            assert!(
                !shown.contains("topsecret") && !shown.contains("AKIDSECRET"),
                "{shown}"
            );
        }
    }
}
