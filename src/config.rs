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

/// Flags of `serve`. Booleans accept true/false (and 1/0, yes/no) from the environment.
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
    #[arg(long, env = "USE_KUBERNETES", value_name = "USE_KUBERNETES", default_value_t = false, action = clap::ArgAction::Set)]
    pub use_kubernetes: bool,
    /// Builds running at once; more wait in a queue, first come first served.
    #[arg(long, env = "MAXIMUM_PARALLEL_BUILDS", value_name = "MAXIMUM_PARALLEL_BUILDS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub maximum_parallel_builds: u32,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "MAX_REQUEST_BYTES", value_name = "MAX_REQUEST_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_request_bytes: usize,
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
    #[arg(long, env = "RUN_CONTROLLER", value_name = "RUN_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set)]
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
    /// Image of the dind sidecar.
    #[arg(
        long,
        env = "DIND_IMAGE",
        value_name = "DIND_IMAGE",
        default_value = "docker:27-dind"
    )]
    pub dind_image: String,
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
}

/// Validated Kubernetes-mode settings.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    pub namespace: Option<String>,
    pub run_controller: bool,
    pub worker_image: String,
    pub docker_mode: crate::operator::pod::DockerMode,
    pub dind_image: String,
    pub worker_env_secret: Option<String>,
    pub worker_docker_socket_gid: Option<i64>,
    pub worker_service_account: Option<String>,
    pub max_pod_retries: u32,
    pub finished_ttl: Duration,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub identity: String,
    pub pod_pending_limit: Duration,
    pub max_admission_retries: u32,
    pub pod_lost_grace: Duration,
    /// DOCKER_BUILD_SETTINGS as given (passed to external-mode workers).
    pub docker_settings_json: String,
    /// SOURCES_DENY_NETWORKS as given (passed to workers).
    pub sources_deny_networks: String,
}

/// What every process that runs the pipeline needs (serve in local mode, and the worker).
#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// Build with no layer cache.
    #[arg(long, env = "NO_CACHE", value_name = "NO_CACHE", default_value_t = false, action = clap::ArgAction::Set)]
    pub no_cache: bool,
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
    #[arg(long, env = "SHOW_BUILD_LOGS", value_name = "SHOW_BUILD_LOGS", default_value_t = false, action = clap::ArgAction::Set)]
    pub show_build_logs: bool,
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

/// Everything the pipeline needs, validated.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    pub no_cache: bool,
    pub docker: DockerSettings,
    pub data_dir: PathBuf,
    pub extra_build_args: BTreeMap<String, String>,
    pub extra_registries: BTreeMap<String, RegistryAuth>,
    pub timeout: Duration,
    pub kafka_topic: String,
    pub show_build_logs: bool,
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
            docker: DockerSettings::parse(&self.docker_build_settings)?,
            data_dir: self.data_dir.clone(),
            extra_build_args: parse_extra_build_args(self.extra_build_args.as_deref())?,
            extra_registries: parse_extra_registries(self.extra_docker_registry_config.as_deref())?,
            timeout: Duration::from_millis(self.timeout_in_ms),
            kafka_topic: self.kafka_topic.clone(),
            show_build_logs: self.show_build_logs,
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

    /// The tracing filter: RUST_LOG wins; DEBUG (legacy) means debug; else info.
    pub fn log_filter(&self) -> String {
        std::env::var("RUST_LOG").unwrap_or_else(|_| {
            if self.debug.as_deref().is_some_and(|d| !d.is_empty()) {
                "debug,hyper=info,h2=info,rustls=info".into()
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
    pub max_request_bytes: usize,
    pub callback_retry_for: Duration,
    pub shutdown_grace: Duration,
    pub kubernetes: KubernetesConfig,
}

impl ServeArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        Ok(Config {
            listen: format!("{}:{}", self.listen_address, self.port),
            build: self.build.validate()?,
            use_kubernetes: self.use_kubernetes,
            maximum_parallel_builds: self.maximum_parallel_builds as usize,
            max_request_bytes: self.max_request_bytes,
            callback_retry_for: Duration::from_secs(self.callback_retry_seconds),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            kubernetes: {
                let k = &self.kubernetes;
                KubernetesConfig {
                    namespace: k.kubernetes_namespace.clone().filter(|n| !n.is_empty()),
                    run_controller: k.run_controller,
                    worker_image: k.docker_build_image.clone(),
                    docker_mode: k.worker_docker_mode,
                    dind_image: k.dind_image.clone(),
                    worker_env_secret: k.worker_env_secret.clone().filter(|n| !n.is_empty()),
                    worker_docker_socket_gid: k.worker_docker_socket_gid,
                    worker_service_account: k
                        .worker_service_account
                        .clone()
                        .filter(|n| !n.is_empty()),
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
                    docker_settings_json: self.build.docker_build_settings.clone(),
                    sources_deny_networks: self.build.sources_deny_networks.clone(),
                }
            },
        })
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
}

/// Validated S3 settings. `Debug` shows the keys as `***` (they are `Secret`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Both or neither: without them the default AWS credential chain is used.
    pub keys: Option<(Secret, Secret)>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
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
