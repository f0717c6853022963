//! The `BuildJob` custom resource (`buildshuttle.akkeris.io/v1`): what to build, without
//! secrets, and what happened to it. Credentials live in a Secret owned by the BuildJob
//! (see `facade`); a `data:` archive lives in storage and the spec names its key.

use crate::build::BuildSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Keys of the per-build credentials Secret.
pub mod secret_keys {
    /// The full source URI when it is not stored (http(s) URLs may carry tokens, `docker://`
    /// URLs may carry a password).
    pub const SOURCES: &str = "sources";
    pub const GM_REGISTRY_USERNAME: &str = "gm_registry_username";
    pub const GM_REGISTRY_PASSWORD: &str = "gm_registry_password";
    pub const DOCKER_PASSWORD: &str = "docker_password";
    pub const CALLBACK_AUTH: &str = "callback_auth";
    /// The whole callback URL, when it has userinfo or a query (which may hold a token):
    /// the spec then holds it without them.
    pub const CALLBACK: &str = "callback";
    /// EXTRA_DOCKER_REGISTRY_CONFIG of the service that accepted the build (holds passwords).
    pub const EXTRA_REGISTRIES: &str = "extra_docker_registry_config";
    /// The build args, names and values, as a JSON object: controller-api passes the app's
    /// config vars, which hold database URLs and tokens.
    pub const BUILD_ARGS: &str = "build_args";
}

pub use crate::pipeline::sources::SOURCES_TOO_LARGE;

/// What to build. Holds no credential: see `secret_keys` for what the Secret holds.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "buildshuttle.akkeris.io",
    version = "v1",
    kind = "BuildJob",
    namespaced,
    shortname = "bj",
    status = "BuildJobStatus",
    printcolumn = r#"{"name":"App","type":"string","jsonPath":".spec.app"}"#,
    printcolumn = r#"{"name":"Space","type":"string","jsonPath":".spec.space"}"#,
    printcolumn = r#"{"name":"Build","type":"integer","jsonPath":".spec.buildNumber"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".status.image"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BuildJobSpec {
    pub build_uuid: String,
    pub app: String,
    pub space: String,
    pub app_uuid: String,
    #[schemars(schema_with = "int64")]
    pub build_number: u64,
    /// Where the sources come from, without credentials.
    pub source: SourceRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// Callback URL, without its userinfo and query when it has them (the whole URL is then
    /// in the Secret, `secret_keys::CALLBACK`); its Authorization value is in the Secret.
    /// BuildJobs made before that carry the whole URL here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_hosts: Option<String>,
    pub gm_registry_host: String,
    pub gm_registry_repo: String,
    /// The build args' names (merged with EXTRA_BUILD_ARGS), each with an empty value: the
    /// values are in the Secret (`secret_keys::BUILD_ARGS`). BuildJobs made before that
    /// carry the values here, and their workers use them.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_login: Option<String>,
    /// Name of the Secret (same namespace) holding this build's credentials. For people
    /// only: the controller derives the name from the BuildJob's own name and checks that the
    /// Secret is owned by this BuildJob, so a spec cannot point at another build's Secret.
    pub credentials_secret: String,
    /// Set to stop the build: the controller deletes its pod and records `Cancelled`.
    #[serde(default)]
    pub cancelled: bool,
}

/// The source of a build, as the CR may show it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    pub kind: SourceKind,
    /// For people: the URI without its userinfo, fragment and query (shown as `?…`,
    /// percent-encoded), or the storage key.
    pub display: String,
    /// `Stored`: the storage key of the archive (the `data:` URI's bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_key: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SourceKind {
    /// An http(s) archive; the full URL is in the Secret.
    Http,
    /// A `docker://` image to re-tag; the full URI is in the Secret.
    Docker,
    /// An archive already in storage under `storageKey`.
    Stored,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Queued,
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
    /// Holds a build slot (a pod exists or is being created).
    pub fn holds_slot(self) -> bool {
        matches!(self, Phase::Pending | Phase::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "Queued",
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// One condition, Kubernetes style. The only type is `Succeeded`: `Unknown` while the build
/// is on its way, `True` or `False` at the end with the reason.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Which callbacks controller-api has been sent (delivered, or given up on after retries).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbacksSent {
    #[serde(default)]
    pub pending: bool,
    #[serde(default, rename = "final")]
    pub final_: bool,
    /// A callback being delivered right now. Written (with the resourceVersion it was
    /// decided from) before the first byte is sent, so a second controller, or the next
    /// leader, never sends it again while its sender may still be at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<CallbackInFlight>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbackInFlight {
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    /// The controller identity that sends it.
    pub by: String,
    pub since: Time,
}

/// Where a build's time went. Milestones are milliseconds after the BuildJob was created;
/// `stages` are the worker's own stage durations (fetch, store, context, build, push).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildTimings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opt_int64")]
    pub pod_created_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opt_int64")]
    pub pod_running_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opt_int64")]
    pub worker_done_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opt_int64")]
    pub final_callback_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "int64_map")]
    pub stages: BTreeMap<String, u64>,
}

// Kubernetes' OpenAPI knows int32/int64 only (schemars would say uint64/uint32), and an
// `enum` listing `null` is not structural: these spell the schemas the API server expects.
fn int64(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int64", "minimum": 0})
}
fn opt_int64(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int64", "minimum": 0, "nullable": true})
}
fn int32(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int32", "minimum": 0, "default": 0})
}
fn int64_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "additionalProperties": {"type": "integer", "format": "int64"}})
}
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["Queued", "Pending", "Running", "Succeeded", "Failed"]})
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub conditions: Vec<BuildCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default)]
    pub callbacks: CallbacksSent,
    /// How many times the worker pod was lost (evicted, deleted, its node gone) and
    /// re-created.
    #[serde(default)]
    #[schemars(schema_with = "int32")]
    pub pod_retries: u32,
    /// How many times creating the worker pod was refused for a reason that may pass
    /// (a ResourceQuota), and retried.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(schema_with = "int32")]
    pub admission_retries: u32,
    /// When creating the worker pod was last refused for a reason that may pass: the next
    /// try waits its backoff from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_admission_refusal: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<BuildTimings>,
    /// Whether the build's stored log and Kafka lines have their end (the outcome and
    /// `Build finished`), set when the build ends. `true`: its worker wrote it, or the
    /// controller has (or gave up after retries). `false`: the build ended without a worker
    /// writing it (stopped while queued, a pod that never started or was lost): the
    /// controller owes it. Absent: the build has not ended (or ended before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_ended: Option<bool>,
    /// Set when the worker reported that its log is not in storage (storage refused it past
    /// the worker's retries, or the worker was stopped while storing it). `false`: the
    /// controller owes a copy of the worker pod's log into storage; `true`: copied (or
    /// given up on). Absent: the worker stored its log, or never said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_copied: Option<bool>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl BuildJobStatus {
    /// The status with every timestamp removed: what "changed" means for status writes.
    pub fn without_timestamps(&self) -> Self {
        let mut s = self.clone();
        s.start_time = None;
        s.completion_time = None;
        for c in &mut s.conditions {
            c.last_transition_time = None;
        }
        s
    }

    pub fn timings_mut(&mut self) -> &mut BuildTimings {
        self.timings.get_or_insert_with(BuildTimings::default)
    }

    pub fn condition(&self) -> Option<&BuildCondition> {
        self.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SUCCEEDED)
    }
}

pub const CONDITION_SUCCEEDED: &str = "Succeeded";

/// Labels on BuildJobs and their pods.
pub mod labels {
    pub const APP: &str = "app";
    pub const APP_UUID: &str = "app_uuid";
    pub const BUILD_UUID: &str = "build_uuid";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "buildshuttle";
    /// Selects the worker pods the controller watches (and nothing else).
    pub const WORKER_SELECTOR: &str =
        "app.kubernetes.io/managed-by=buildshuttle,app.kubernetes.io/component=worker";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// INSTANCE_NAME: which installation owns a BuildJob (and its pods), when several share
    /// a namespace.
    pub const INSTANCE: &str = "buildshuttle.akkeris.io/instance";

    /// The label selector an installation's controller watches with (`None`: all).
    pub fn instance_selector(instance: Option<&str>) -> Option<String> {
        instance.map(|i| format!("{INSTANCE}={i}"))
    }
}

/// The BuildJob's name: `{app}-{app_uuid}-{build_number}`, lower-cased (a DNS subdomain).
pub fn job_name(app: &str, app_uuid: &str, build_number: u64) -> String {
    format!("{app}-{app_uuid}-{build_number}").to_ascii_lowercase()
}

/// Held by every BuildJob until its final callback is sent: deleting a running BuildJob
/// stops its pod and tells controller-api `failed` before the object goes.
pub const FINALIZER: &str = "buildshuttle.akkeris.io/final-callback";

/// The name of a BuildJob's credentials Secret.
pub fn secret_name(job: &str) -> String {
    format!("{job}-credentials")
}

impl BuildJobSpec {
    /// The build as the spec alone tells it (`from_build` the other way round): no sources
    /// and no credentials, which the worker adds from the credentials Secret.
    pub fn build_spec(&self, build_uuid: uuid::Uuid) -> BuildSpec {
        BuildSpec {
            build_uuid,
            app: self.app.clone(),
            space: self.space.clone(),
            app_uuid: self.app_uuid.clone(),
            build_number: self.build_number,
            sources: crate::secret::Secret::default(),
            sources_stored: false,
            sha: self.sha.clone(),
            branch: self.branch.clone(),
            repo: self.repo.clone(),
            org: self.org.clone(),
            callback: None,
            callback_auth: None,
            kafka_hosts: self.kafka_hosts.clone(),
            gm_registry_host: self.gm_registry_host.clone(),
            gm_registry_repo: self.gm_registry_repo.clone(),
            gm_registry_auth: None,
            build_args: self.build_args.clone(),
            docker_registry: self.docker_registry.clone(),
            docker_login: self.docker_login.clone(),
            docker_password: None,
        }
    }

    /// The spec of `build`, with `source` in place of its source URI and no credentials.
    pub fn from_build(build: &BuildSpec, source: SourceRef) -> Self {
        let name = job_name(&build.app, &build.app_uuid, build.build_number);
        Self {
            build_uuid: build.build_uuid.to_string(),
            app: build.app.clone(),
            space: build.space.clone(),
            app_uuid: build.app_uuid.clone(),
            build_number: build.build_number,
            source,
            sha: build.sha.clone(),
            branch: build.branch.clone(),
            repo: build.repo.clone(),
            org: build.org.clone(),
            callback: build.callback.as_deref().map(crate::secret::redact_url),
            kafka_hosts: build.kafka_hosts.clone(),
            gm_registry_host: build.gm_registry_host.clone(),
            gm_registry_repo: build.gm_registry_repo.clone(),
            build_args: build
                .build_args
                .keys()
                .map(|k| (k.clone(), String::new()))
                .collect(),
            docker_registry: build.docker_registry.clone(),
            docker_login: build.docker_login.clone(),
            credentials_secret: secret_name(&name),
            cancelled: false,
        }
    }

    pub fn job_name(&self) -> String {
        job_name(&self.app, &self.app_uuid, self.build_number)
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::APP.to_string(), self.app.clone()),
            (labels::APP_UUID.to_string(), self.app_uuid.clone()),
            (labels::BUILD_UUID.to_string(), self.build_uuid.clone()),
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
        ])
    }
}

/// The CRD as YAML, as `buildshuttle crd` prints it and `crds/buildjob.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&BuildJob::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn committed_crd_matches_the_code() {
        let committed =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/buildjob.yaml"))
                .expect("crds/buildjob.yaml is committed");
        let generated = crd_yaml().expect("the CRD serializes");
        assert!(
            committed == generated,
            "crds/buildjob.yaml is stale: regenerate it with `cargo run -- crd > crds/buildjob.yaml`"
        );
    }

    #[test]
    fn crd_has_the_decided_shape() {
        let crd = BuildJob::crd();
        assert_eq!(crd.spec.group, "buildshuttle.akkeris.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["bj".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1");
        assert!(v
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["App", "Space", "Build", "Phase", "Image", "Age"]);
    }

    #[test]
    fn names_are_dns_safe_and_deterministic() {
        let n = job_name("MyApp", "0B1C2D3E-aaaa-bbbb-cccc-111122223333", 12);
        assert_eq!(n, "myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12");
        assert_eq!(secret_name(&n), format!("{n}-credentials"));
    }

    #[test]
    fn spec_from_build_carries_no_secret() {
        let b = crate::build::tests::spec();
        let spec = BuildJobSpec::from_build(
            &b,
            SourceRef {
                kind: SourceKind::Stored,
                display: "stored".into(),
                storage_key: Some(b.source_key()),
            },
        );
        let json = serde_json::to_string(&spec).expect("serializes");
        for s in b.secrets() {
            assert!(!json.contains(s), "{s} leaked into the spec");
        }
        assert_eq!(
            spec.credentials_secret,
            format!("{}-credentials", spec.job_name())
        );
    }
}
