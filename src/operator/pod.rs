//! The worker pod of a BuildJob, built as data (pure). Docker comes from a dind native
//! sidecar, the node's socket, or an external dockerd, as `WORKER_DOCKER_MODE` says.

use super::crd::{labels, secret_keys, BuildJob};
use crate::config::DockerSettings;
use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, EnvVarSource, HostPathVolumeSource, Pod, PodSecurityContext,
    PodSpec, SecretEnvSource, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use std::time::Duration;

pub const WORKER_CONTAINER: &str = "worker";
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
    /// DOCKER_BUILD_SETTINGS of the service: the host socket path, or the external dockerd.
    pub docker: DockerSettings,
    /// The raw DOCKER_BUILD_SETTINGS JSON (passed on in external mode without TLS).
    pub docker_settings_json: String,
    pub timeout: Duration,
    pub no_cache: bool,
    pub kafka_topic: String,
    /// SOURCES_DENY_NETWORKS of the service, applied by the worker too.
    pub sources_deny_networks: String,
    /// A Secret imported whole into the worker's environment (S3 credentials, TLS dockerd…).
    pub env_secret: Option<String>,
    /// Host mode: the group owning the node's docker socket (the worker is not root).
    pub docker_socket_gid: Option<i64>,
    pub service_account: Option<String>,
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
    pod_labels.insert(labels::COMPONENT.into(), "worker".into());
    let secret = &job.spec.credentials_secret;

    let mut env_vars = vec![
        plain(env::SPEC, serde_json::to_string(&job.spec)?),
        plain("TIMEOUT_IN_MS", s.timeout.as_millis().to_string()),
        plain("NO_CACHE", s.no_cache.to_string()),
        plain("KAFKA_TOPIC", s.kafka_topic.clone()),
        plain("SOURCES_DENY_NETWORKS", s.sources_deny_networks.clone()),
        plain("DATA_DIR", WORK_DIR.to_string()),
        plain(env::TERMINATION_LOG_PATH, TERMINATION_LOG.to_string()),
        plain("SHOW_BUILD_LOGS", "true".into()),
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
        from_secret(
            "EXTRA_DOCKER_REGISTRY_CONFIG",
            secret,
            secret_keys::EXTRA_REGISTRIES,
        ),
    ];
    let mut volumes = vec![empty_dir("work")];
    let mut mounts = vec![mount("work", WORK_DIR)];
    let mut init_containers = Vec::new();
    match s.docker_mode {
        DockerMode::Dind => {
            env_vars.push(plain(
                "DOCKER_BUILD_SETTINGS",
                format!(r#"{{"socketPath":"{DIND_SOCKET_DIR}/docker.sock"}}"#),
            ));
            volumes.push(empty_dir("dind-socket"));
            volumes.push(empty_dir("dind-storage"));
            mounts.push(mount("dind-socket", DIND_SOCKET_DIR));
            init_containers.push(Container {
                name: DIND_CONTAINER.into(),
                image: Some(s.dind_image.clone()),
                // A native sidecar: runs beside the worker, stopped when the worker exits.
                restart_policy: Some("Always".into()),
                args: Some(vec![
                    format!("--host=unix://{DIND_SOCKET_DIR}/docker.sock"),
                    format!("--group={WORKER_ID}"),
                ]),
                env: Some(vec![plain("DOCKER_TLS_CERTDIR", String::new())]),
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
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_ID),
            run_as_group: Some(WORKER_ID),
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
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            service_account_name: s.service_account.clone(),
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

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(Default::default()),
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
            dind_image: "docker:27-dind".into(),
            docker: DockerSettings::Socket("/var/run/docker.sock".into()),
            docker_settings_json: r#"{"socketPath":"/var/run/docker.sock"}"#.into(),
            timeout: Duration::from_millis(1_200_000),
            no_cache: false,
            kafka_topic: "alamobuildlogs".into(),
            sources_deny_networks: "169.254.0.0/16".into(),
            env_secret: None,
            docker_socket_gid: None,
            service_account: None,
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
        assert!(
            d.args
                .iter()
                .flatten()
                .any(|a| a == &format!("--group={WORKER_ID}")),
            "the worker's group owns the dind socket"
        );
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
