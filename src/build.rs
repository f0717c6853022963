//! What to build (`BuildSpec`), how it ended (`Outcome`), and every name derived from a
//! build: image references, storage keys, route keys. Pure data; no I/O.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Username and password for a registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegistryAuth {
    pub username: String,
    pub password: Secret,
}

/// One build, as accepted by the API. Validated before it exists (see `api::validate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub build_uuid: Uuid,
    pub app: String,
    pub space: String,
    pub app_uuid: String,
    pub build_number: u64,
    /// The source URI. For `docker://user:pass@…` it carries credentials, hence `Secret`.
    pub sources: Secret,
    /// The archive is already in storage under `source_key()` (a `data:` URI decoded at
    /// submit time); `sources` then no longer carries the payload.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sources_stored: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_auth: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_hosts: Option<String>,
    pub gm_registry_host: String,
    pub gm_registry_repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gm_registry_auth: Option<RegistryAuth>,
    /// Already merged with `EXTRA_BUILD_ARGS`; keys not yet sanitized (see `sanitize_arg_key`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_login: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_password: Option<Secret>,
}

impl BuildSpec {
    /// `{app}-{app_uuid}`: the prefix of the stop and log routes.
    pub fn app_key(&self) -> String {
        format!("{}-{}", self.app, self.app_uuid)
    }

    /// `{host}/{repo}/{app}-{app_uuid}` without a tag.
    pub fn image_repository(&self) -> String {
        format!(
            "{}/{}/{}",
            self.gm_registry_host.trim_end_matches('/'),
            self.gm_registry_repo.trim_matches('/'),
            self.app_key()
        )
    }

    /// The build's own tag, `1.{build_number}`.
    pub fn version_tag(&self) -> String {
        format!("1.{}", self.build_number)
    }

    /// `{repository}:1.{n}`: the image this build produces.
    pub fn image(&self) -> String {
        format!("{}:{}", self.image_repository(), self.version_tag())
    }

    /// Storage key of the original source archive.
    pub fn source_key(&self) -> String {
        source_key(&self.build_uuid)
    }

    /// Storage key of the build's log.
    pub fn log_key(&self) -> String {
        log_key(&self.app, &self.app_uuid, self.build_number)
    }

    /// Labels put on the image.
    pub fn image_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_string(), self.app.clone()),
            ("space".to_string(), self.space.clone()),
            ("build_uuid".to_string(), self.build_uuid.to_string()),
            ("app_uuid".to_string(), self.app_uuid.clone()),
        ])
    }

    /// Build args as sent to dockerd: keys stripped to `[A-Za-z0-9_]`, empty keys dropped.
    pub fn docker_build_args(&self) -> BTreeMap<String, String> {
        self.build_args
            .iter()
            .map(|(k, v)| (sanitize_arg_key(k), v.clone()))
            .filter(|(k, _)| !k.is_empty())
            .collect()
    }

    /// The spec with every credential removed: what is kept once nothing needs them.
    pub fn scrubbed(&self) -> Self {
        let mut s = self.clone();
        if let Some(a) = &mut s.gm_registry_auth {
            a.password = Secret::default();
        }
        s.docker_password = None;
        s.callback_auth = None;
        // A callback URL may carry a token in its query or its userinfo.
        s.callback = s.callback.as_deref().map(crate::secret::redact_url);
        let sources = self.sources.expose();
        if let Some((user, pass)) = docker_source_userinfo(sources) {
            let without = sources.replacen(&format!("{user}:{pass}@"), "", 1);
            s.sources = Secret::new(without);
        } else if sources
            .get(..4)
            .is_some_and(|s| s.eq_ignore_ascii_case("http"))
        {
            // A presigned URL's signature, or user:token@, is a credential too.
            s.sources = Secret::new(crate::secret::redact_url(sources));
        }
        // Build args often carry tokens (NPM_TOKEN, …); their names say enough afterwards.
        for value in s.build_args.values_mut() {
            value.clear();
        }
        s
    }

    /// Every credential this spec carries, for redaction of outside text.
    pub fn secrets(&self) -> Vec<&str> {
        let mut out = Vec::new();
        if let Some(a) = &self.gm_registry_auth {
            out.push(a.password.expose());
        }
        if let Some(p) = &self.docker_password {
            out.push(p.expose());
        }
        if let Some(c) = &self.callback_auth {
            out.push(c.expose());
        }
        if let Some(userinfo) = docker_source_userinfo(self.sources.expose()) {
            out.push(userinfo.1);
        }
        out
    }
}

/// The `user:pass` part of a `docker://user:pass@host/…` source, if any, split where
/// `sources::parse` splits it (the last `@` not followed by a digest).
fn docker_source_userinfo(sources: &str) -> Option<(&str, &str)> {
    let scheme = sources.get(..9)?;
    if !scheme.eq_ignore_ascii_case("docker://") {
        return None;
    }
    let (userinfo, _) = crate::pipeline::sources::split_userinfo(&sources[9..]);
    userinfo?.split_once(':')
}

pub fn source_key(build_uuid: &Uuid) -> String {
    build_uuid.to_string()
}

pub fn log_key(app: &str, app_uuid: &str, build_number: u64) -> String {
    format!("{app}-{app_uuid}-{build_number}.logs")
}

/// Strips every character outside `[A-Za-z0-9_]`, as the legacy shuttle did.
pub fn sanitize_arg_key(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Why a build failed. The names are the reasons of the BuildJob `Succeeded` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureReason {
    SourceFetchFailed,
    SourceStoreFailed,
    InvalidSources,
    BuildFailed,
    PushFailed,
    PullFailed,
    DockerUnavailable,
    Cancelled,
    Timeout,
    Interrupted,
    Internal,
}

impl FailureReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::SourceFetchFailed => "SourceFetchFailed",
            Self::SourceStoreFailed => "SourceStoreFailed",
            Self::InvalidSources => "InvalidSources",
            Self::BuildFailed => "BuildFailed",
            Self::PushFailed => "PushFailed",
            Self::PullFailed => "PullFailed",
            Self::DockerUnavailable => "DockerUnavailable",
            Self::Cancelled => "Cancelled",
            Self::Timeout => "Timeout",
            Self::Interrupted => "Interrupted",
            Self::Internal => "Internal",
        }
    }
}

/// How a build ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Outcome {
    Succeeded {
        image: String,
        #[serde(default)]
        digest: Option<String>,
    },
    Failed {
        reason: FailureReason,
        message: String,
    },
}

impl Outcome {
    pub fn failed(reason: FailureReason, message: impl Into<String>) -> Self {
        Self::Failed {
            reason,
            message: message.into(),
        }
    }
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Succeeded { .. })
    }
    /// The legacy callback status: `succeeded` or `failed`.
    pub fn callback_status(&self) -> &'static str {
        if self.is_success() {
            "succeeded"
        } else {
            "failed"
        }
    }
}

/// Milliseconds each stage of one build took; a stage that did not run stays `None`.
/// Stages may overlap (the archive is stored while the context is prepared), so they need
/// not add up to `total`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTimings {
    /// Accepted → a build slot was free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// Download or decoding of the sources (or reading them back from storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<u64>,
    /// Storing the original archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<u64>,
    /// Archive → build context on disk (extraction, ARG lines, .dockerignore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u64>,
    /// Pulling the previous image as the layer cache (CACHE_FROM_LATEST).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<u64>,
    /// docker build (or the pull of a `docker://` source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<u64>,
    /// Tagging and pushing both tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<u64>,
    /// Accepted → the build's outcome was known (its log ends here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Accepted → the `pending` callback was delivered (or given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_pending: Option<u64>,
    /// Outcome known → the final callback was delivered (or given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_final: Option<u64>,
}

impl StageTimings {
    /// Every stage that ran, in pipeline order, with its milliseconds.
    pub fn stages(&self) -> Vec<(&'static str, u64)> {
        [
            ("queued", self.queued),
            ("fetch", self.fetch),
            ("store", self.store),
            ("context", self.context),
            ("cache", self.cache),
            ("build", self.build),
            ("push", self.push),
            ("total", self.total),
            ("callback_pending", self.callback_pending),
            ("callback_final", self.callback_final),
        ]
        .into_iter()
        .filter_map(|(name, ms)| Some((name, ms?)))
        .collect()
    }

    /// The line that ends a build's log: `Timings: queued 3 ms, fetch 120 ms, … total 1450 ms`
    /// (callbacks are not in it: the final one is sent after the log ends).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .stages()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("callback"))
            .map(|(name, ms)| format!("{name} {ms} ms"))
            .collect();
        format!("Timings: {}", parts.join(", "))
    }
}

/// Milliseconds since `since`, for `StageTimings`.
pub fn elapsed_ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What a worker reports through its termination message: the outcome's own fields (so a
/// parser that knows only `Outcome` still reads it) plus an optional `timings` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<StageTimings>,
    /// `false`: the worker could not put its log in storage (refused past its retries, or
    /// stopped while storing), so the controller copies it from the pod's log. Absent from
    /// older workers and from a worker that never opened its log.
    #[serde(default, rename = "logStored", skip_serializing_if = "Option::is_none")]
    pub log_stored: Option<bool>,
}

impl Termination {
    /// Parses a termination message (with or without `timings`); `None` when it is not one
    /// (e.g. cut by the kubelet).
    pub fn parse(message: &str) -> Option<Self> {
        serde_json::from_str(message.trim()).ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn spec() -> BuildSpec {
        BuildSpec {
            build_uuid: Uuid::parse_str("6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11").unwrap(),
            app: "myapp".into(),
            space: "default".into(),
            app_uuid: "0b1c2d3e-aaaa-bbbb-cccc-111122223333".into(),
            build_number: 12,
            sources: Secret::new("data:base64,AAAA"),
            sources_stored: false,
            sha: None,
            branch: None,
            repo: None,
            org: None,
            callback: None,
            callback_auth: Some(Secret::new("cb-token")),
            kafka_hosts: None,
            gm_registry_host: "registry.example.com".into(),
            gm_registry_repo: "akkeris".into(),
            gm_registry_auth: Some(RegistryAuth {
                username: "u".into(),
                password: Secret::new("regpass"),
            }),
            build_args: BTreeMap::from([
                ("A-B.c".into(), "x\ny".into()),
                ("--".into(), "z".into()),
            ]),
            docker_registry: None,
            docker_login: None,
            docker_password: None,
        }
    }

    #[test]
    fn names_follow_the_contract() {
        let s = spec();
        assert_eq!(
            s.image(),
            "registry.example.com/akkeris/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333:1.12"
        );
        assert_eq!(s.source_key(), "6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11");
        assert_eq!(
            s.log_key(),
            "myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12.logs"
        );
        assert_eq!(s.app_key(), "myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333");
    }

    #[test]
    fn build_args_keys_are_stripped_and_values_untouched() {
        let args = spec().docker_build_args();
        assert_eq!(args.get("ABc").map(String::as_str), Some("x\ny"));
        assert_eq!(args.len(), 1, "a key stripped to nothing is dropped");
    }

    #[test]
    fn secrets_include_docker_url_password() {
        let mut s = spec();
        s.sources = Secret::new("docker://bob:pw123@host/repo:tag");
        assert!(s.secrets().contains(&"pw123"));
        assert!(s.secrets().contains(&"regpass"));
        assert!(s.secrets().contains(&"cb-token"));
        s.sources = Secret::new(format!(
            "docker://bob:pw456@host/repo@sha256:{}",
            "a".repeat(64)
        ));
        assert!(s.secrets().contains(&"pw456"));
    }

    #[test]
    fn scrubbed_specs_hold_no_secret() {
        let mut s = spec();
        s.sources = Secret::new("docker://bob:pw123@host/repo:tag");
        s.docker_password = Some(Secret::new("dpw"));
        let json = serde_json::to_string(&s.scrubbed()).unwrap();
        for secret in ["pw123", "regpass", "cb-token", "dpw"] {
            assert!(!json.contains(secret), "{secret} in {json}");
        }
        assert!(json.contains("docker://host/repo:tag"));
        // A password with a raw '@', an http source's userinfo and signature, a callback's
        // userinfo, build args.
        s.sources = Secret::new("DOCKER://bob:p@ss@host/repo:tag");
        let json = serde_json::to_string(&s.scrubbed()).unwrap();
        assert!(
            !json.contains("p@ss") && json.contains("host/repo:tag"),
            "{json}"
        );
        s.sources = Secret::new("https://u:tok3n@h.example/a.tgz?X-Amz-Signature=sig9");
        s.callback = Some("https://cbuser:cbpass@cb.example/hook?t=q1".into());
        s.build_args = [("NPM_TOKEN".to_string(), "npm-s3cret".to_string())].into();
        let json = serde_json::to_string(&s.scrubbed()).unwrap();
        for secret in ["tok3n", "sig9", "cbpass", "q1", "npm-s3cret"] {
            assert!(!json.contains(secret), "{secret} in {json}");
        }
        assert!(
            json.contains("https://h.example/a.tgz") && json.contains("NPM_TOKEN"),
            "{json}"
        );
    }

    #[test]
    fn outcome_serializes_with_result_tag() {
        let o = Outcome::failed(FailureReason::BuildFailed, "boom");
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j["result"], "failed");
        assert_eq!(j["reason"], "BuildFailed");
        assert_eq!(o.callback_status(), "failed");
    }

    #[test]
    fn timings_list_stages_in_pipeline_order() {
        let t = StageTimings {
            queued: Some(3),
            fetch: Some(120),
            context: Some(4),
            build: Some(900),
            push: Some(300),
            total: Some(1450),
            callback_final: Some(2),
            ..Default::default()
        };
        assert_eq!(
            t.summary(),
            "Timings: queued 3 ms, fetch 120 ms, context 4 ms, build 900 ms, push 300 ms, total 1450 ms"
        );
        let j = serde_json::to_value(&t).unwrap();
        assert!(
            j.get("store").is_none(),
            "stages that did not run are left out: {j}"
        );
    }

    #[test]
    fn termination_adds_timings_beside_the_outcome() {
        let t = Termination {
            outcome: Outcome::Succeeded {
                image: "r/a:1.2".into(),
                digest: None,
            },
            timings: Some(StageTimings {
                build: Some(5),
                ..Default::default()
            }),
            log_stored: Some(false),
        };
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.starts_with(r#"{"result":"succeeded""#), "{json}");
        assert!(json.contains(r#""logStored":false"#), "{json}");
        // A parser that knows only `Outcome` still reads it.
        let old: Outcome = serde_json::from_str(&json).unwrap();
        assert_eq!(old, t.outcome);
        assert_eq!(Termination::parse(&json), Some(t));
        let bare = Termination::parse(r#"{"result":"failed","reason":"Timeout","message":"m"}"#);
        assert_eq!(bare.map(|b| (b.timings, b.log_stored)), Some((None, None)));
    }
}
