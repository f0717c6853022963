//! The worker pod of a BuildJob, built as data (pure). Docker comes from a dind native
//! sidecar, the node's socket, or an external dockerd, as `WORKER_DOCKER_MODE` says.

use super::crd::{labels, secret_keys, BuildJob};
use crate::config::{DockerSettings, Quantity, Resources, WorkerPodOverrides};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    HostPathVolumeSource, LocalObjectReference, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretKeySelector, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as KubeQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::time::Duration;

pub const WORKER_CONTAINER: &str = "worker";

/// A request for the worker container's log (a pod with sidecars has several), followed or
/// read once.
pub fn worker_log(follow: bool) -> kube::api::LogParams {
    kube::api::LogParams {
        container: Some(WORKER_CONTAINER.into()),
        follow,
        ..Default::default()
    }
}
pub const DIND_CONTAINER: &str = "dind";
/// Where the dind sidecar's socket is shared with the worker.
pub const DIND_SOCKET_DIR: &str = "/var/run/dind";
pub const WORK_DIR: &str = "/work";
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The worker's user and group (the image's `USER 10001:10001`); the dind sidecar gives its
/// socket to this group so the worker can use it without root.
pub const WORKER_ID: i64 = 10001;

/// Environment variables the worker reads (besides the BuildArgs ones).
pub mod env {
    pub const SPEC: &str = "BUILD_JOB_SPEC";
    pub const SOURCES: &str = "WORKER_SOURCES";
    pub const GM_REGISTRY_USERNAME: &str = "WORKER_GM_REGISTRY_USERNAME";
    pub const GM_REGISTRY_PASSWORD: &str = "WORKER_GM_REGISTRY_PASSWORD";
    pub const DOCKER_PASSWORD: &str = "WORKER_DOCKER_PASSWORD";
    pub const BUILD_ARGS: &str = "WORKER_BUILD_ARGS";
    pub const TERMINATION_LOG_PATH: &str = "TERMINATION_LOG_PATH";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerMode {
    /// A privileged dind native sidecar per pod (init container with restartPolicy Always).
    Dind,
    /// The node's dockerd socket (hostPath), at DOCKER_BUILD_SETTINGS' socketPath.
    Host,
    /// The dockerd DOCKER_BUILD_SETTINGS names (TLS settings come from WORKER_ENV_SECRET).
    External,
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("the BuildJob has no uid yet (it was not read from the API server)")]
    NoUid,
    #[error("WORKER_DOCKER_MODE=external with a TLS DOCKER_BUILD_SETTINGS needs WORKER_ENV_SECRET holding DOCKER_BUILD_SETTINGS: keys must not go into a pod spec")]
    TlsNeedsSecret,
    #[error("the BuildJob spec cannot be serialized: {0}")]
    Spec(#[from] serde_json::Error),
}

/// How worker pods are made.
#[derive(Clone, Debug)]
pub struct PodSettings {
    /// DOCKER_BUILD_IMAGE: the worker's image (this project's).
    pub image: String,
    pub docker_mode: DockerMode,
    /// The dind sidecar's image.
    pub dind_image: String,
    /// DIND_MTU: `dockerd --mtu` of the sidecar (overlay networks need less than 1500).
    pub dind_mtu: Option<u32>,
    /// DOCKER_BUILD_SETTINGS of the service: the host socket path, or the external dockerd.
    pub docker: DockerSettings,
    /// The raw DOCKER_BUILD_SETTINGS JSON (passed on in external mode without TLS).
    pub docker_settings_json: String,
    pub timeout: Duration,
    pub no_cache: bool,
    /// CACHE_FROM_LATEST of the service, passed on to workers.
    pub cache_from_latest: bool,
    /// DOCKER_BUILDKIT of the service; workers get it resolved for the mode (`auto`:
    /// BuildKit in a dind pod, whose daemon serves that one build).
    pub builder: crate::config::Builder,
    /// CACHE_REPOSITORY of the service, passed on to workers.
    pub cache_repository: Option<String>,
    pub kafka_topic: String,
    /// SOURCES_DENY_NETWORKS of the service, applied by the worker too.
    pub sources_deny_networks: String,
    /// A Secret imported whole into the worker's environment (S3 credentials, TLS dockerd…).
    pub env_secret: Option<String>,
    /// Host mode: the group owning the node's docker socket (the worker is not root).
    pub docker_socket_gid: Option<i64>,
    pub service_account: Option<String>,
    /// WORKER_IMAGE_PULL_SECRETS: for a worker (or dind) image in a private registry.
    pub image_pull_secrets: Vec<String>,
    /// The API's limits and timeouts that builds obey (`forwarded`), as env of the worker.
    pub forwarded: Vec<(&'static str, String)>,
    /// WORKER_IMAGE_PULL_POLICY: the worker container's imagePullPolicy (unset: the default).
    pub image_pull_policy: Option<String>,
    /// WORKER_AUTOMOUNT_SERVICE_ACCOUNT_TOKEN: off unless an identity needs the token.
    pub automount_token: bool,
    /// WORKER_POD_OVERRIDES: resources, emptyDir size limits, placement.
    pub overrides: WorkerPodOverrides,
}

/// `{job}-worker-{attempt}`: a re-created pod gets a new name, so it never waits for the
/// old one to go.
pub fn pod_name(job: &str, attempt: u32) -> String {
    format!("{job}-worker-{attempt}")
}

/// Seconds the kubelet lets the pod run: the build timeout (enforced by the worker itself,
/// which then reports Timeout) plus time to start dockerd and pull the worker image.
pub fn active_deadline_seconds(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_secs().saturating_add(120)).unwrap_or(i64::MAX)
}

pub fn worker_pod(job: &BuildJob, attempt: u32, s: &PodSettings) -> Result<Pod, PodError> {
    let owner = job.controller_owner_ref(&()).ok_or(PodError::NoUid)?;
    let name = pod_name(&job.name_any(), attempt);
    let mut pod_labels = job.spec.labels();
    // The installation's label too, so its controller's pod watch sees the pod.
    if let Some(i) = job.labels().get(labels::INSTANCE) {
        pod_labels.insert(labels::INSTANCE.into(), i.clone());
    }
    pod_labels.insert(labels::COMPONENT.into(), "worker".into());
    // Derived from the BuildJob's own name, never taken from its spec (the controller only
    // starts a pod once it has checked that this Secret is owned by the BuildJob).
    let secret = &super::crd::secret_name(&job.name_any());

    let mut env_vars = vec![
        plain(env::SPEC, serde_json::to_string(&job.spec)?),
        plain("TIMEOUT_IN_MS", s.timeout.as_millis().to_string()),
        plain("NO_CACHE", s.no_cache.to_string()),
        plain("CACHE_FROM_LATEST", s.cache_from_latest.to_string()),
        plain(
            "DOCKER_BUILDKIT",
            s.builder
                .buildkit(s.docker_mode == DockerMode::Dind)
                .to_string(),
        ),
        plain(
            "CACHE_REPOSITORY",
            s.cache_repository.clone().unwrap_or_default(),
        ),
        plain("KAFKA_TOPIC", s.kafka_topic.clone()),
        plain("SOURCES_DENY_NETWORKS", s.sources_deny_networks.clone()),
        plain("DATA_DIR", WORK_DIR.to_string()),
        plain(env::TERMINATION_LOG_PATH, TERMINATION_LOG.to_string()),
        plain("SHOW_BUILD_LOGS", "true".into()),
        // Explicit env wins over WORKER_ENV_SECRET's envFrom: the API's settings decide.
        from_secret(env::SOURCES, secret, secret_keys::SOURCES),
        from_secret(
            env::GM_REGISTRY_USERNAME,
            secret,
            secret_keys::GM_REGISTRY_USERNAME,
        ),
        from_secret(
            env::GM_REGISTRY_PASSWORD,
            secret,
            secret_keys::GM_REGISTRY_PASSWORD,
        ),
        from_secret(env::DOCKER_PASSWORD, secret, secret_keys::DOCKER_PASSWORD),
        from_secret(env::BUILD_ARGS, secret, secret_keys::BUILD_ARGS),
        from_secret(
            "EXTRA_DOCKER_REGISTRY_CONFIG",
            secret,
            secret_keys::EXTRA_REGISTRIES,
        ),
    ];
    env_vars.extend(s.forwarded.iter().map(|(k, v)| plain(k, v.clone())));
    let o = &s.overrides;
    let mut volumes = vec![empty_dir("work", o.work_size_limit.as_ref())];
    let mut mounts = vec![mount("work", WORK_DIR)];
    let mut init_containers = Vec::new();
    match s.docker_mode {
        DockerMode::Dind => {
            env_vars.push(plain(
                "DOCKER_BUILD_SETTINGS",
                format!(r#"{{"socketPath":"{DIND_SOCKET_DIR}/docker.sock"}}"#),
            ));
            volumes.push(empty_dir("dind-socket", None));
            volumes.push(empty_dir(
                "dind-storage",
                o.dind_storage_size_limit.as_ref(),
            ));
            mounts.push(mount("dind-socket", DIND_SOCKET_DIR));
            init_containers.push(Container {
                name: DIND_CONTAINER.into(),
                image: Some(s.dind_image.clone()),
                // A native sidecar: runs beside the worker, stopped when the worker exits.
                restart_policy: Some("Always".into()),
                command: Some(dind_command(s.dind_mtu)),
                // Belt and braces: with `dockerd` as its first argument the entrypoint makes
                // no TLS certificates anyway (and so never waits for them).
                env: Some(vec![plain("DOCKER_TLS_CERTDIR", String::new())]),
                resources: resources(&o.dind_resources),
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    mount("dind-storage", "/var/lib/docker"),
                    mount("dind-socket", DIND_SOCKET_DIR),
                ]),
                ..Default::default()
            });
        }
        DockerMode::Host => {
            let path = match &s.docker {
                DockerSettings::Socket(p) => p.clone(),
                _ => "/var/run/docker.sock".to_string(),
            };
            env_vars.push(plain(
                "DOCKER_BUILD_SETTINGS",
                format!(r#"{{"socketPath":"{path}"}}"#),
            ));
            volumes.push(Volume {
                name: "docker-socket".into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.clone(),
                    type_: Some("Socket".into()),
                }),
                ..Default::default()
            });
            mounts.push(mount("docker-socket", &path));
        }
        DockerMode::External => match &s.docker {
            DockerSettings::Https { .. } if s.env_secret.is_none() => {
                return Err(PodError::TlsNeedsSecret)
            }
            // From WORKER_ENV_SECRET (envFrom): an explicit env var would override it.
            DockerSettings::Https { .. } => {}
            _ => env_vars.push(plain(
                "DOCKER_BUILD_SETTINGS",
                s.docker_settings_json.clone(),
            )),
        },
    }
    let worker = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(s.image.clone()),
        image_pull_policy: s.image_pull_policy.clone(),
        args: Some(vec!["worker".into()]),
        env: Some(env_vars),
        env_from: s.env_secret.as_ref().map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        }),
        volume_mounts: Some(mounts),
        resources: resources(&o.worker_resources),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        // Pod Security "restricted" for the worker, whatever the mode. Set on the container
        // (not the pod) so the privileged dind sidecar, which runs as root, is not bound.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_ID),
            run_as_group: Some(WORKER_ID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: job.namespace(),
            labels: Some(pod_labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(active_deadline_seconds(s.timeout)),
            automount_service_account_token: Some(s.automount_token),
            enable_service_links: Some(false),
            service_account_name: s.service_account.clone(),
            image_pull_secrets: (!s.image_pull_secrets.is_empty()).then(|| {
                s.image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect()
            }),
            node_selector: (!o.node_selector.is_empty()).then(|| o.node_selector.clone()),
            tolerations: (!o.tolerations.is_empty()).then(|| o.tolerations.clone()),
            affinity: o.affinity.clone(),
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            containers: vec![worker],
            volumes: Some(volumes),
            security_context: match (s.docker_mode, s.docker_socket_gid) {
                (DockerMode::Host, Some(gid)) => Some(PodSecurityContext {
                    supplemental_groups: Some(vec![gid]),
                    ..Default::default()
                }),
                _ => None,
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The API's settings that bound what a build may do, for its worker: set on the API
/// (`config.extraEnv`), they must hold for the builds its workers run too.
pub fn forwarded(b: &crate::config::BuildConfig) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("MAX_SOURCE_BYTES", b.limits.max_source_bytes.to_string()),
        ("MAX_CONTEXT_BYTES", b.limits.max_context_bytes.to_string()),
        (
            "MAX_ARCHIVE_ENTRIES",
            b.limits.max_archive_entries.to_string(),
        ),
        ("MAX_LOG_BYTES", b.max_log_bytes.to_string()),
        (
            "SOURCES_CONNECT_TIMEOUT_SECONDS",
            b.sources_connect_timeout.as_secs().to_string(),
        ),
        (
            "SOURCES_TOTAL_TIMEOUT_SECONDS",
            b.sources_total_timeout.as_secs().to_string(),
        ),
        (
            "KAFKA_DELIVERY_TIMEOUT_MS",
            b.kafka_delivery_timeout.as_millis().to_string(),
        ),
    ];
    // Where the API keeps sources and logs is where the worker must find and put them (a
    // worker without it would use its pod's own disk, gone with the pod). Not the keys:
    // WORKER_ENV_SECRET, or the pod's cloud identity, gives those.
    if let Some(s3) = &b.s3 {
        out.push(("S3_BUCKET", s3.bucket.clone()));
        if let Some(r) = &s3.region {
            out.push(("S3_REGION", r.clone()));
        }
        if let Some(e) = &s3.endpoint {
            out.push(("S3_ENDPOINT", e.clone()));
        }
        out.push((
            "S3_TIMEOUT_SECONDS",
            s3.attempt_timeout.as_secs().to_string(),
        ));
    }
    out
}

fn plain(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(true),
            }),
            ..Default::default()
        }),
    }
}

/// The dind sidecar's command line. `dockerd` is named explicitly: given only flags, the
/// docker:dind entrypoint would prepend `--host=tcp://0.0.0.0:2375` (an unauthenticated,
/// privileged Docker API for every pod in the cluster, and for every `RUN` step through the
/// bridge gateway). The entrypoint script still runs (tini as pid 1, iptables detection, the
/// cgroup v2 nesting set-up) but adds nothing to the daemon's flags: the daemon listens only
/// on the pod-local unix socket, owned by the worker's group.
pub fn dind_command(mtu: Option<u32>) -> Vec<String> {
    let mut c = vec![
        "dockerd-entrypoint.sh".to_string(),
        "dockerd".to_string(),
        format!("--host=unix://{DIND_SOCKET_DIR}/docker.sock"),
        format!("--group={WORKER_ID}"),
    ];
    c.extend(mtu.map(|m| format!("--mtu={m}")));
    c
}

fn resources(r: &Resources) -> Option<ResourceRequirements> {
    let map = |m: &BTreeMap<String, Quantity>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), KubeQuantity(v.as_str().to_string())))
                .collect()
        })
    };
    let (requests, limits) = (map(&r.requests), map(&r.limits));
    (requests.is_some() || limits.is_some()).then_some(ResourceRequirements {
        requests,
        limits,
        claims: None,
    })
}

fn empty_dir(name: &str, size_limit: Option<&Quantity>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: size_limit.map(|q| KubeQuantity(q.as_str().to_string())),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::operator::decide::tests::{job, JOB};
    use crate::secret::Secret;

    pub fn settings(mode: DockerMode) -> PodSettings {
        PodSettings {
            image: "akkeris/buildshuttle:test".into(),
            docker_mode: mode,
            dind_image: crate::config::DEFAULT_DIND_IMAGE.into(),
            dind_mtu: None,
            docker: DockerSettings::Socket("/var/run/docker.sock".into()),
            docker_settings_json: r#"{"socketPath":"/var/run/docker.sock"}"#.into(),
            timeout: Duration::from_millis(1_200_000),
            no_cache: false,
            cache_from_latest: true,
            builder: crate::config::Builder::Auto,
            cache_repository: Some("127.0.0.1:5000/build-cache".into()),
            kafka_topic: "alamobuildlogs".into(),
            sources_deny_networks: "169.254.0.0/16".into(),
            env_secret: None,
            docker_socket_gid: None,
            service_account: None,
            image_pull_secrets: Vec::new(),
            image_pull_policy: None,
            forwarded: vec![("MAX_LOG_BYTES", "1000".into())],
            automount_token: false,
            overrides: WorkerPodOverrides::default(),
        }
    }

    fn build(mode: DockerMode) -> Pod {
        worker_pod(&job(None), 0, &settings(mode)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn worker(p: &Pod) -> &Container {
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        spec.containers
            .iter()
            .find(|c| c.name == WORKER_CONTAINER)
            .unwrap_or_else(|| panic!("worker"))
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.iter().flatten().find(|e| e.name == name)
    }

    #[test]
    fn workers_build_with_buildkit_on_a_daemon_of_their_own_unless_told() {
        use crate::config::Builder;
        let env = |mode, builder| {
            let mut s = settings(mode);
            s.builder = builder;
            let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
            env_value(worker(&p), "DOCKER_BUILDKIT").and_then(|e| e.value.clone())
        };
        for (mode, builder, want) in [
            (DockerMode::Dind, Builder::Auto, "true"),
            (DockerMode::Host, Builder::Auto, "false"),
            (DockerMode::External, Builder::Auto, "false"),
            (DockerMode::Host, Builder::BuildKit, "true"),
            (DockerMode::Dind, Builder::Classic, "false"),
        ] {
            assert_eq!(
                env(mode, builder).as_deref(),
                Some(want),
                "{mode:?} {builder:?}"
            );
        }
    }

    #[test]
    fn every_pod_has_the_safety_basics() {
        for mode in [DockerMode::Dind, DockerMode::Host, DockerMode::External] {
            let p = build(mode);
            let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
            assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
            assert_eq!(spec.automount_service_account_token, Some(false));
            assert_eq!(spec.active_deadline_seconds, Some(1200 + 120));
            let owner = &p
                .metadata
                .owner_references
                .as_ref()
                .unwrap_or_else(|| panic!("owner"))[0];
            assert_eq!(owner.kind, "BuildJob");
            assert_eq!(owner.uid, "uid-1");
            assert_eq!(owner.controller, Some(true));
            let l = p
                .metadata
                .labels
                .as_ref()
                .unwrap_or_else(|| panic!("labels"));
            assert_eq!(l["app"], "myapp");
            assert_eq!(l["app_uuid"], "0b1c2d3e-aaaa-bbbb-cccc-111122223333");
            assert_eq!(l["build_uuid"], "6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11");
            assert_eq!(l[labels::COMPONENT], "worker");
            assert_eq!(
                p.metadata.name.as_deref(),
                Some(format!("{JOB}-worker-0").as_str())
            );
            let w = worker(&p);
            assert_eq!(w.args, Some(vec!["worker".to_string()]));
            assert_eq!(w.termination_message_path.as_deref(), Some(TERMINATION_LOG));
            let pw =
                env_value(w, env::GM_REGISTRY_PASSWORD).unwrap_or_else(|| panic!("password env"));
            assert!(pw.value.is_none());
            let sel = pw
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .unwrap_or_else(|| panic!("ref"));
            assert_eq!(sel.name, format!("{JOB}-credentials"));
            assert_eq!(sel.key, secret_keys::GM_REGISTRY_PASSWORD);
            // No credential appears anywhere in the pod.
            let text = serde_json::to_string(&p).unwrap_or_default();
            for s in crate::build::tests::spec().secrets() {
                assert!(!text.contains(s), "{s} in the pod spec");
            }
        }
    }

    #[test]
    fn dind_is_a_privileged_native_sidecar_with_its_own_storage() {
        let p = build(DockerMode::Dind);
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        let init = spec
            .init_containers
            .as_ref()
            .unwrap_or_else(|| panic!("init"));
        assert_eq!(init.len(), 1);
        let d = &init[0];
        assert_eq!(d.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            d.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );
        let mounts: Vec<_> = d
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(mounts.contains(&"/var/lib/docker"));
        let vols = spec.volumes.as_ref().unwrap_or_else(|| panic!("volumes"));
        assert!(vols
            .iter()
            .any(|v| v.name == "dind-storage" && v.empty_dir.is_some()));
        let w = worker(&p);
        assert_eq!(
            env_value(w, "DOCKER_BUILD_SETTINGS").and_then(|e| e.value.as_deref()),
            Some(r#"{"socketPath":"/var/run/dind/docker.sock"}"#)
        );
        assert!(
            w.security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .is_none(),
            "only the sidecar is privileged"
        );
        assert_eq!(
            w.security_context.as_ref().and_then(|s| s.run_as_group),
            Some(WORKER_ID)
        );
        // dockerd is named, so the entrypoint adds no `--host=tcp://0.0.0.0:2375`: the daemon
        // listens on the pod-local socket only, which the worker's group owns.
        assert_eq!(
            d.command.as_deref(),
            Some(
                &[
                    "dockerd-entrypoint.sh",
                    "dockerd",
                    "--host=unix:///var/run/dind/docker.sock",
                    "--group=10001",
                ]
                .map(String::from)[..]
            )
        );
        assert_eq!(
            d.args, None,
            "nothing the image's entrypoint could prepend to"
        );
        assert_eq!(
            d.env.as_deref(),
            Some(&[plain("DOCKER_TLS_CERTDIR", String::new())][..]),
            "no TLS certificates made (and no wait for them)"
        );
        let text = serde_json::to_string(d).unwrap_or_default();
        assert!(!text.contains("tcp://") && !text.contains("2375"), "{text}");
        assert!(!has_ports(d));
    }

    fn has_ports(c: &Container) -> bool {
        c.ports.as_ref().is_some_and(|p| !p.is_empty())
    }

    #[test]
    fn dind_mtu_and_the_pinned_image() {
        let mut s = settings(DockerMode::Dind);
        s.dind_mtu = Some(1450);
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        let d = &p
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default()[0];
        assert_eq!(
            d.command
                .as_ref()
                .and_then(|c| c.last())
                .map(String::as_str),
            Some("--mtu=1450")
        );
        assert_eq!(d.image.as_deref(), Some(crate::config::DEFAULT_DIND_IMAGE));
        let tag = crate::config::DEFAULT_DIND_IMAGE
            .rsplit(':')
            .next()
            .unwrap_or("");
        assert!(
            tag.ends_with("-dind") && tag.split('.').count() == 3,
            "a full version: {tag}"
        );
        assert_eq!(dind_command(None).len(), 4);
    }

    #[test]
    fn pull_secrets_service_account_and_token() {
        let mut s = settings(DockerMode::Dind);
        s.image_pull_secrets = vec!["regcred".into(), "other".into()];
        s.service_account = Some("bs-worker".into());
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        let names: Vec<_> = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["regcred", "other"]);
        assert_eq!(spec.service_account_name.as_deref(), Some("bs-worker"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        s.automount_token = true;
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.spec.and_then(|s| s.automount_service_account_token),
            Some(true)
        );
        let p = build(DockerMode::Dind);
        assert_eq!(p.spec.and_then(|s| s.image_pull_secrets), None);
    }

    #[test]
    fn the_apis_limits_reach_the_worker_under_names_the_worker_reads() {
        use crate::config::{Cli, Command};
        use clap::Parser;
        // A process's build settings, from its flags.
        let build_config = |flags: &[String]| {
            let mut argv: Vec<String> = ["buildshuttle", "worker", "--spec", "{}"]
                .map(String::from)
                .into();
            argv.extend(flags.iter().cloned());
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}"));
            let Command::Worker(w) = cli.command else {
                panic!("not worker")
            };
            w.build.validate().unwrap_or_else(|e| panic!("{e}"))
        };
        let api = build_config(
            &[
                "--max-log-bytes",
                "1234",
                "--max-archive-entries",
                "77",
                "--s3-bucket",
                "builds",
                "--s3-endpoint",
                "http://127.0.0.1:9100",
                "--s3-region",
                "eu-west-1",
            ]
            .map(String::from),
        );
        let env = forwarded(&api);
        assert!(env.contains(&("MAX_LOG_BYTES", "1234".into())));
        assert!(env.contains(&("S3_BUCKET", "builds".into())));
        // The worker, given that env (as the flags its names stand for), ends up the same.
        let flags: Vec<String> = env
            .iter()
            .flat_map(|(name, value)| {
                [
                    format!("--{}", name.to_lowercase().replace('_', "-")),
                    value.clone(),
                ]
            })
            .collect();
        assert_eq!(forwarded(&build_config(&flags)), env);
        let p = worker_pod(&job(None), 0, &settings(DockerMode::Host))
            .unwrap_or_else(|e| panic!("{e}"));
        let c = &p.spec.as_ref().unwrap_or_else(|| panic!("spec")).containers[0];
        assert!(c
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "MAX_LOG_BYTES" && e.value.as_deref() == Some("1000")));
    }

    #[test]
    fn build_args_reach_the_worker_from_the_secret_not_the_pod_spec() {
        let p = worker_pod(&job(None), 0, &settings(DockerMode::Host))
            .unwrap_or_else(|e| panic!("{e}"));
        let c = &p.spec.as_ref().unwrap_or_else(|| panic!("spec")).containers[0];
        let e = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == env::BUILD_ARGS)
            .unwrap_or_else(|| panic!("no {}", env::BUILD_ARGS));
        let key = e
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap_or_else(|| panic!("not from the Secret"));
        assert_eq!(key.key, secret_keys::BUILD_ARGS);
        assert_eq!(key.optional, Some(true), "BuildJobs without build args");
    }

    #[test]
    fn the_worker_is_pulled_as_configured_and_by_default_as_kubernetes_decides() {
        let worker = |p: &Pod| {
            p.spec
                .as_ref()
                .unwrap_or_else(|| panic!("spec"))
                .containers
                .iter()
                .find(|c| c.name == WORKER_CONTAINER)
                .unwrap_or_else(|| panic!("worker"))
                .image_pull_policy
                .clone()
        };
        assert_eq!(worker(&build(DockerMode::Dind)), None);
        let mut s = settings(DockerMode::Host);
        s.image_pull_policy = Some("Always".into());
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(worker(&p).as_deref(), Some("Always"));
    }

    #[test]
    fn resources_size_limits_and_placement_come_from_the_overrides() {
        let p = build(DockerMode::Dind);
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        let q = |s: &str| KubeQuantity(s.into());
        let size = |name: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .and_then(|v| v.empty_dir.as_ref())
                .and_then(|e| e.size_limit.clone())
        };
        // Defaults: dind has room for /var/lib/docker, and both containers are bounded.
        assert_eq!(size("dind-storage"), Some(q("40Gi")));
        assert_eq!(size("work"), Some(q("6Gi")));
        let d = &spec
            .init_containers
            .as_ref()
            .unwrap_or_else(|| panic!("init"))[0];
        let r = d
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("dind resources"));
        let limits = r.limits.as_ref().unwrap_or_else(|| panic!("limits"));
        assert_eq!(limits["ephemeral-storage"], q("50Gi"));
        assert_eq!(limits["memory"], q("8Gi"));
        assert!(r.requests.as_ref().is_some_and(|m| m.contains_key("cpu")));
        let w = worker(&p)
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("worker resources"));
        assert_eq!(
            w.limits.as_ref().map(|l| l["memory"].clone()),
            Some(q("1Gi"))
        );
        assert!(spec.node_selector.is_none() && spec.tolerations.is_none());
        assert!(spec.affinity.is_none());

        let mut s = settings(DockerMode::Dind);
        s.overrides = WorkerPodOverrides::parse(Some(
            r#"{"workSizeLimit": null, "dindResources": {},
                "nodeSelector": {"pool": "builds"},
                "tolerations": [{"key": "builds", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                  {"nodeSelectorTerms": [{"matchExpressions":
                    [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}}"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        let work = spec.volumes.iter().flatten().find(|v| v.name == "work");
        assert_eq!(
            work.and_then(|v| v.empty_dir.as_ref())
                .and_then(|e| e.size_limit.clone()),
            None
        );
        let d = &spec
            .init_containers
            .as_ref()
            .unwrap_or_else(|| panic!("init"))[0];
        assert_eq!(d.resources, None);
        assert_eq!(
            spec.node_selector.as_ref().map(|m| m["pool"].as_str()),
            Some("builds")
        );
        assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
        assert!(spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .is_some());
    }

    // -----------------------------------------------------------------------------------
    // Pod Security Standards, as data: each rule of the "baseline" and "restricted" levels
    // (kubernetes.io/docs/concepts/security/pod-security-standards) is a check that lists
    // violations. Host and external worker pods are checked against all of them.

    type Rule = (&'static str, fn(&PodSpec) -> Vec<String>);

    fn all_containers(p: &PodSpec) -> impl Iterator<Item = &Container> {
        p.init_containers
            .iter()
            .flatten()
            .chain(p.containers.iter())
    }

    fn each_container(p: &PodSpec, bad: impl Fn(&PodSpec, &Container) -> bool) -> Vec<String> {
        all_containers(p)
            .filter(|c| bad(p, c))
            .map(|c| format!("container {}", c.name))
            .collect()
    }

    fn sc(c: &Container) -> SecurityContext {
        c.security_context.clone().unwrap_or_default()
    }

    fn psc(p: &PodSpec) -> PodSecurityContext {
        p.security_context.clone().unwrap_or_default()
    }

    const BASELINE_CAPS: [&str; 14] = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
        "",
    ];
    const RESTRICTED_VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];

    fn volume_kinds(v: &Volume) -> Vec<String> {
        let json = serde_json::to_value(v).unwrap_or_default();
        json.as_object()
            .map(|m| m.keys().filter(|k| *k != "name").cloned().collect())
            .unwrap_or_default()
    }

    const RULES: &[Rule] = &[
        // baseline
        ("host namespaces", |p| {
            [
                ("hostNetwork", p.host_network),
                ("hostPID", p.host_pid),
                ("hostIPC", p.host_ipc),
            ]
            .into_iter()
            .filter(|(_, v)| *v == Some(true))
            .map(|(n, _)| n.to_string())
            .collect()
        }),
        ("privileged containers", |p| {
            each_container(p, |_, c| sc(c).privileged == Some(true))
        }),
        ("capabilities beyond baseline", |p| {
            each_container(p, |_, c| {
                sc(c)
                    .capabilities
                    .and_then(|c| c.add)
                    .unwrap_or_default()
                    .iter()
                    .any(|a| !BASELINE_CAPS.contains(&a.as_str()))
            })
        }),
        ("hostPath volumes", |p| {
            p.volumes
                .iter()
                .flatten()
                .filter(|v| v.host_path.is_some())
                .map(|v| format!("volume {}", v.name))
                .collect()
        }),
        ("host ports", |p| {
            each_container(p, |_, c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|port| port.host_port.unwrap_or(0) != 0)
            })
        }),
        ("proc mount", |p| {
            each_container(p, |_, c| sc(c).proc_mount.is_some_and(|m| m != "Default"))
        }),
        ("seccomp not unconfined", |p| {
            let unconfined =
                |s: &Option<SeccompProfile>| s.as_ref().is_some_and(|s| s.type_ == "Unconfined");
            let mut v = each_container(p, |_, c| unconfined(&sc(c).seccomp_profile));
            if unconfined(&psc(p).seccomp_profile) {
                v.push("pod".into());
            }
            v
        }),
        ("sysctls", |p| {
            psc(p)
                .sysctls
                .unwrap_or_default()
                .iter()
                .map(|s| s.name.clone())
                .collect()
        }),
        // restricted
        ("volume types", |p| {
            p.volumes
                .iter()
                .flatten()
                .filter(|v| {
                    volume_kinds(v)
                        .iter()
                        .any(|k| !RESTRICTED_VOLUMES.contains(&k.as_str()))
                })
                .map(|v| format!("volume {}", v.name))
                .collect()
        }),
        ("privilege escalation", |p| {
            each_container(p, |_, c| sc(c).allow_privilege_escalation != Some(false))
        }),
        ("running as non-root", |p| {
            each_container(p, |p, c| {
                sc(c).run_as_non_root.or(psc(p).run_as_non_root) != Some(true)
            })
        }),
        ("running as non-root user", |p| {
            each_container(p, |p, c| {
                sc(c).run_as_user.or(psc(p).run_as_user) == Some(0)
            })
        }),
        ("seccomp RuntimeDefault or Localhost", |p| {
            each_container(p, |p, c| {
                let profile = sc(c).seccomp_profile.or(psc(p).seccomp_profile);
                !profile.is_some_and(|s| s.type_ == "RuntimeDefault" || s.type_ == "Localhost")
            })
        }),
        (
            "capabilities: drop ALL, add at most NET_BIND_SERVICE",
            |p| {
                each_container(p, |_, c| {
                    let caps = sc(c).capabilities.unwrap_or_default();
                    !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL")
                        || caps
                            .add
                            .unwrap_or_default()
                            .iter()
                            .any(|a| a != "NET_BIND_SERVICE")
                })
            },
        ),
    ];

    fn violations(p: &Pod) -> Vec<(&'static str, String)> {
        let spec = p.spec.clone().unwrap_or_default();
        RULES
            .iter()
            .flat_map(|(rule, check)| check(&spec).into_iter().map(move |v| (*rule, v)))
            .collect()
    }

    #[test]
    fn worker_pods_meet_pod_security_restricted_except_what_their_mode_needs() {
        let mut ext = settings(DockerMode::External);
        ext.docker = DockerSettings::Http {
            address: "10.0.0.5:2375".into(),
        };
        let p = worker_pod(&job(None), 0, &ext).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(violations(&p), vec![], "external mode: restricted");
        // Host mode: only the node's socket (a hostPath volume) is outside restricted.
        let v = violations(&build(DockerMode::Host));
        assert_eq!(
            v,
            vec![
                ("hostPath volumes", "volume docker-socket".to_string()),
                ("volume types", "volume docker-socket".to_string()),
            ]
        );
        // dind: only the sidecar is outside (privileged, root); the worker is restricted.
        let v = violations(&build(DockerMode::Dind));
        assert!(!v.is_empty());
        for (rule, what) in &v {
            assert_eq!(what, "container dind", "{rule}");
        }
    }

    #[test]
    fn the_pod_security_checker_catches_each_rule() {
        use k8s_openapi::api::core::v1::{ContainerPort, Sysctl};
        type Breaker = fn(&mut PodSpec);
        let cases: &[(&str, Breaker)] = &[
            ("host namespaces", |p| p.host_network = Some(true)),
            ("privileged containers", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .privileged = Some(true)
            }),
            ("capabilities beyond baseline", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .capabilities = Some(Capabilities {
                    add: Some(vec!["SYS_ADMIN".into()]),
                    drop: Some(vec!["ALL".into()]),
                })
            }),
            ("hostPath volumes", |p| {
                p.volumes.get_or_insert_with(Vec::new).push(Volume {
                    name: "h".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: "/".into(),
                        type_: None,
                    }),
                    ..Default::default()
                })
            }),
            ("host ports", |p| {
                p.containers[0].ports = Some(vec![ContainerPort {
                    container_port: 80,
                    host_port: Some(80),
                    ..Default::default()
                }])
            }),
            ("proc mount", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .proc_mount = Some("Unmasked".into())
            }),
            ("seccomp not unconfined", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .seccomp_profile = Some(SeccompProfile {
                    type_: "Unconfined".into(),
                    localhost_profile: None,
                })
            }),
            ("sysctls", |p| {
                p.security_context = Some(PodSecurityContext {
                    sysctls: Some(vec![Sysctl {
                        name: "kernel.msgmax".into(),
                        value: "1".into(),
                    }]),
                    ..Default::default()
                })
            }),
            ("volume types", |p| {
                p.volumes.get_or_insert_with(Vec::new).push(Volume {
                    name: "n".into(),
                    nfs: Some(Default::default()),
                    ..Default::default()
                })
            }),
            ("privilege escalation", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .allow_privilege_escalation = None
            }),
            ("running as non-root", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .run_as_non_root = None
            }),
            ("running as non-root user", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .run_as_user = Some(0)
            }),
            ("seccomp RuntimeDefault or Localhost", |p| {
                p.containers[0]
                    .security_context
                    .get_or_insert_with(Default::default)
                    .seccomp_profile = None
            }),
            (
                "capabilities: drop ALL, add at most NET_BIND_SERVICE",
                |p| {
                    p.containers[0]
                        .security_context
                        .get_or_insert_with(Default::default)
                        .capabilities = None
                },
            ),
        ];
        let names: Vec<_> = RULES.iter().map(|r| r.0).collect();
        let broken: Vec<_> = cases.iter().map(|c| c.0).collect();
        assert_eq!(names, broken, "one case per rule");
        let mut ext = settings(DockerMode::External);
        ext.docker = DockerSettings::Http {
            address: "10.0.0.5:2375".into(),
        };
        for (rule, breaker) in cases {
            let mut p = worker_pod(&job(None), 0, &ext).unwrap_or_else(|e| panic!("{e}"));
            if let Some(spec) = p.spec.as_mut() {
                breaker(spec);
            }
            assert!(
                violations(&p).iter().any(|(r, _)| r == rule),
                "{rule} not caught: {:?}",
                violations(&p)
            );
        }
    }

    #[test]
    fn host_mode_gives_the_worker_the_sockets_group() {
        let mut s = settings(DockerMode::Host);
        s.docker_socket_gid = Some(998);
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        let sc = p.spec.as_ref().and_then(|s| s.security_context.as_ref());
        assert_eq!(
            sc.and_then(|c| c.supplemental_groups.clone()),
            Some(vec![998])
        );
        let mut d = settings(DockerMode::Dind);
        d.docker_socket_gid = Some(998);
        let p = worker_pod(&job(None), 0, &d).unwrap_or_else(|e| panic!("{e}"));
        assert!(p
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .is_none());
    }

    #[test]
    fn host_mode_mounts_the_nodes_socket() {
        let p = build(DockerMode::Host);
        let spec = p.spec.as_ref().unwrap_or_else(|| panic!("spec"));
        assert!(spec.init_containers.is_none());
        let v = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "docker-socket")
            .unwrap_or_else(|| panic!("vol"));
        assert_eq!(
            v.host_path.as_ref().map(|h| h.path.as_str()),
            Some("/var/run/docker.sock")
        );
    }

    #[test]
    fn external_mode_passes_plain_settings_and_refuses_tls_keys_in_the_spec() {
        let mut s = settings(DockerMode::External);
        s.docker = DockerSettings::Http {
            address: "10.0.0.5:2375".into(),
        };
        s.docker_settings_json = r#"{"host":"http://10.0.0.5","port":"2375"}"#.into();
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            env_value(worker(&p), "DOCKER_BUILD_SETTINGS").and_then(|e| e.value.as_deref()),
            Some(s.docker_settings_json.as_str())
        );
        s.docker = DockerSettings::Https {
            address: "d:2376".into(),
            ca: "C".into(),
            cert: Secret::new("CERT"),
            key: Secret::new("KEY"),
        };
        assert!(matches!(
            worker_pod(&job(None), 0, &s),
            Err(PodError::TlsNeedsSecret)
        ));
        s.env_secret = Some("worker-env".into());
        let p = worker_pod(&job(None), 0, &s).unwrap_or_else(|e| panic!("{e}"));
        let w = worker(&p);
        assert!(env_value(w, "DOCKER_BUILD_SETTINGS").is_none());
        assert_eq!(
            w.env_from
                .as_ref()
                .and_then(|e| e[0].secret_ref.as_ref())
                .map(|r| r.name.as_str()),
            Some("worker-env")
        );
    }

    #[test]
    fn a_job_never_read_from_the_api_has_no_owner_and_is_refused() {
        let mut j = job(None);
        j.metadata.uid = None;
        assert!(matches!(
            worker_pod(&j, 0, &settings(DockerMode::Dind)),
            Err(PodError::NoUid)
        ));
    }
}
