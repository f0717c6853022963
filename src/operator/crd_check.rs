//! Whether the BuildJob CRD installed in the cluster declares every field this version
//! writes. Helm never upgrades a chart's `crds/`, and an API server drops every field its
//! CRD's schema does not declare (field pruning), silently: on a CRD older than the binary
//! the controller would never see status it wrote (`logEnded`, a callback in flight) and the
//! facade would write BuildJobs without part of their spec. So the installed CRD is read at
//! start and every `RECHECK`: while it lacks fields, `/octhc` fails and `POST /` is refused
//! with a message naming them and the fix, and the controller neither leads nor reconciles
//! (during a rolling upgrade the new replicas stay unready and the old ones keep serving);
//! once the CRD is applied, all goes on without a restart. A CRD declaring more (a newer
//! one, after a rollback) is fine.

use super::crd::BuildJob;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::{Api, Client, CustomResourceExt, Resource};
use std::time::Duration;
use tokio::sync::watch;

/// How often the installed CRD is read again.
pub const RECHECK: Duration = Duration::from_secs(30);

/// How long a `POST /` waits for the first check (at start) before it is refused.
const FIRST_CHECK_WAIT: Duration = Duration::from_secs(10);

/// What the last read of the installed CRD found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrdState {
    /// Not read yet: the first read is under way, or failing (with this error).
    Unchecked(Option<String>),
    /// Declares every field this version writes.
    Current,
    /// Lacks these fields (paths as `status.logEnded`, `spec.buildArgs.*`).
    Stale(Vec<String>),
    /// Not installed: the controller's failing watch fails `/octhc` already, and creating a
    /// BuildJob fails by itself. Read again, as the other states.
    Missing,
    /// May not be read (403: a Role without the chart's ClusterRole): not checked.
    Unreadable,
}

impl CrdState {
    /// Why builds are refused and the controller waits, if they are.
    pub fn refusal(&self) -> Option<String> {
        match self {
            CrdState::Stale(missing) => Some(stale_message(missing)),
            CrdState::Unchecked(error) => Some(format!(
                "cannot tell yet whether the BuildJob CRD installed ({}) is current{}; trying again",
                crd_resource(),
                error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            )),
            CrdState::Current | CrdState::Missing | CrdState::Unreadable => None,
        }
    }
}

fn crd_resource() -> String {
    format!("customresourcedefinitions/{}", BuildJob::crd_name())
}

/// What the log, `/octhc` and a refused `POST /` say about a stale CRD.
pub fn stale_message(missing: &[String]) -> String {
    format!(
        "the BuildJob CRD installed in the cluster ({}) is older than this buildshuttle: it \
         does not declare {}, and the API server drops what it does not declare. Apply this \
         version's CRD (Helm never upgrades crds/): `kubectl apply --server-side -f \
         crds/buildjob.yaml` from this version's chart, or `buildshuttle crd | kubectl apply \
         --server-side -f -`. Until then builds are refused and the controller waits (checked \
         again every {} s)",
        crd_resource(),
        missing.join(", "),
        RECHECK.as_secs()
    )
}

/// The installed CRD's state, as the check keeps it.
#[derive(Clone)]
pub struct CrdCheck {
    state: watch::Receiver<CrdState>,
}

impl CrdCheck {
    /// No check: always current (a facade or controller made without `start`, in tests).
    pub fn off() -> Self {
        let (_, state) = watch::channel(CrdState::Current);
        Self { state }
    }

    /// A check that always finds `state` (tests).
    #[cfg(test)]
    pub(crate) fn fixed(state: CrdState) -> Self {
        let (_, state) = watch::channel(state);
        Self { state }
    }

    pub fn state(&self) -> CrdState {
        self.state.borrow().clone()
    }

    /// Why builds are refused now, if they are.
    pub fn refusal(&self) -> Option<String> {
        self.state.borrow().refusal()
    }

    /// `refusal`, once the first check has answered (waited for at most `FIRST_CHECK_WAIT`).
    pub async fn refusal_after_first_check(&self) -> Option<String> {
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(
            FIRST_CHECK_WAIT,
            state.wait_for(|s| !matches!(s, CrdState::Unchecked(_))),
        )
        .await;
        self.refusal()
    }

    /// Resolves once nothing holds the controller back (the first check answered, and the
    /// CRD is not stale).
    pub async fn usable(&self) {
        let mut state = self.state.clone();
        if state.wait_for(|s| s.refusal().is_none()).await.is_err() {
            // The check stopped (its task is supervised: the service stops too).
            std::future::pending::<()>().await;
        }
    }

    /// Starts reading the installed CRD now and every `RECHECK`: the check, and the task
    /// that runs it (it runs until aborted).
    pub fn start(client: Client) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, state) = watch::channel(CrdState::Unchecked(None));
        let crds: Api<CustomResourceDefinition> = Api::all(client);
        (Self { state }, run(crds, tx))
    }
}

/// Reads the CRD now and every `RECHECK` (sooner after an error, while nothing is known),
/// logging what changes; a stale CRD is logged at every check.
async fn run(crds: Api<CustomResourceDefinition>, tx: watch::Sender<CrdState>) {
    let ours = BuildJob::crd();
    let version = BuildJob::version(&());
    let ours = version_schema(&ours, &version).cloned().unwrap_or_default();
    let mut retry = Duration::from_secs(1);
    loop {
        let read = crds.get_opt(BuildJob::crd_name()).await;
        let before = tx.borrow().clone();
        let next = match read {
            Ok(Some(installed)) => match version_schema(&installed, &version) {
                Some(schema) => {
                    let missing = missing_paths(schema, &ours);
                    if missing.is_empty() {
                        CrdState::Current
                    } else {
                        CrdState::Stale(missing)
                    }
                }
                None => CrdState::Stale(vec![format!("version {version} (with its schema)")]),
            },
            Ok(None) => CrdState::Missing,
            Err(kube::Error::Api(s)) if s.code == 403 => CrdState::Unreadable,
            Err(e) => {
                tracing::warn!(crd = %crd_resource(), error = %e, "cannot read the BuildJob CRD to check that it is current; trying again");
                if let CrdState::Unchecked(_) = before {
                    tx.send_replace(CrdState::Unchecked(Some(e.to_string())));
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RECHECK);
                continue;
            }
        };
        retry = Duration::from_secs(1);
        match &next {
            CrdState::Stale(missing) => {
                tracing::error!("{}", stale_message(missing))
            }
            CrdState::Current if matches!(before, CrdState::Stale(_)) => {
                tracing::info!(crd = %crd_resource(), "the BuildJob CRD installed is current now: builds are accepted and the controller goes on")
            }
            CrdState::Unreadable if before != CrdState::Unreadable => {
                tracing::warn!(crd = %crd_resource(), "may not read the BuildJob CRD (403): not checking that it is current; grant `get` on it (the chart's ClusterRole does)")
            }
            CrdState::Missing if before != CrdState::Missing => {
                tracing::warn!(crd = %crd_resource(), "the BuildJob CRD is not installed: `buildshuttle crd | kubectl apply --server-side -f -`")
            }
            _ => {}
        }
        tx.send_replace(next);
        tokio::time::sleep(RECHECK).await;
    }
}

/// The `openAPIV3Schema` of `version` in `crd`, if it has one.
fn version_schema<'a>(
    crd: &'a CustomResourceDefinition,
    version: &str,
) -> Option<&'a JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version)?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()
}

/// Where a field falls in an installed schema.
enum Installed<'a> {
    /// Declared by this schema (its unknown fields are dropped, its declared ones pruned by
    /// their own schemas).
    Schema(&'a JSONSchemaProps),
    /// Kept whole: an unknown field under `x-kubernetes-preserve-unknown-fields`, or a value
    /// of `additionalProperties: true`.
    Whole,
}

fn preserves(s: &JSONSchemaProps) -> bool {
    s.x_kubernetes_preserve_unknown_fields == Some(true)
}

/// What becomes of a map entry `key` under the installed schema `s`; `None`: dropped.
fn entry<'a>(s: &'a JSONSchemaProps, key: Option<&str>) -> Option<Installed<'a>> {
    if let Some(p) = key.and_then(|k| s.properties.as_ref()?.get(k)) {
        return Some(Installed::Schema(p));
    }
    match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(ap)) => Some(Installed::Schema(ap)),
        Some(JSONSchemaPropsOrBool::Bool(true)) => Some(Installed::Whole),
        _ if preserves(s) => Some(Installed::Whole),
        _ => None,
    }
}

/// The property paths `ours` declares that `installed` does not keep: the fields an API
/// server with `installed` drops from what this version writes (a field missing is named,
/// not what lies below it). Empty: `installed` is current, or newer (it may declare more).
/// Paths: `spec.sha`, `status.timings`, a map's values `spec.buildArgs.*`, a list's items
/// `status.conditions[*].reason`.
pub fn missing_paths(installed: &JSONSchemaProps, ours: &JSONSchemaProps) -> Vec<String> {
    let mut out = Vec::new();
    walk(installed, ours, "", &mut out);
    out
}

fn walk(installed: &JSONSchemaProps, ours: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    let mut visit = |at: Option<Installed<'_>>, ours: &JSONSchemaProps, path: String| match at {
        Some(Installed::Schema(s)) => walk(s, ours, &path, out),
        Some(Installed::Whole) => {}
        None => out.push(path),
    };
    for (key, child) in ours.properties.iter().flatten() {
        let p = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        visit(entry(installed, Some(key)), child, p);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &ours.additional_properties {
        visit(entry(installed, None), values, format!("{path}.*"));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &ours.items {
        let has_fields = items.properties.is_some() || items.additional_properties.is_some();
        let at = match &installed.items {
            Some(JSONSchemaPropsOrArray::Schema(s)) => Some(Installed::Schema(s)),
            // No item schema: scalars stay, an item's fields are all dropped.
            _ if preserves(installed) || !has_fields => Some(Installed::Whole),
            _ => None,
        };
        visit(at, items, format!("{path}[*]"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: serde_json::Value) -> JSONSchemaProps {
        serde_json::from_value(v).expect("a schema")
    }

    fn ours() -> JSONSchemaProps {
        version_schema(&BuildJob::crd(), "v1")
            .cloned()
            .expect("our schema")
    }

    /// Our schema with the properties at `paths` (dotted) removed.
    fn without(paths: &[&str]) -> JSONSchemaProps {
        let mut v = serde_json::to_value(ours()).expect("serializes");
        for p in paths {
            let mut parts: Vec<&str> = p.split('.').collect();
            let last = parts.pop().expect("a path");
            let mut at = &mut v;
            for part in parts {
                at = &mut at["properties"][part];
            }
            at["properties"]
                .as_object_mut()
                .expect("properties")
                .remove(last)
                .unwrap_or_else(|| panic!("{p} is in our schema"));
        }
        schema(v)
    }

    #[test]
    fn our_own_schema_is_current() {
        assert_eq!(missing_paths(&ours(), &ours()), Vec::<String>::new());
    }

    #[test]
    fn each_field_an_older_crd_lacks_is_named_not_what_lies_below() {
        let older = without(&["status.logEnded", "status.timings", "spec.cancelled"]);
        assert_eq!(
            missing_paths(&older, &ours()),
            ["spec.cancelled", "status.logEnded", "status.timings"]
        );
        let older = without(&["status.callbacks.inFlight", "spec.source.storageKey"]);
        assert_eq!(
            missing_paths(&older, &ours()),
            ["spec.source.storageKey", "status.callbacks.inFlight"]
        );
    }

    #[test]
    fn a_newer_crd_declaring_more_is_current() {
        let mut v = serde_json::to_value(ours()).expect("serializes");
        v["properties"]["spec"]["properties"]["newField"] = json!({"type": "string"});
        v["properties"]["status"]["properties"]["more"] =
            json!({"type": "object", "properties": {"x": {"type": "integer"}}});
        assert!(missing_paths(&schema(v), &ours()).is_empty());
    }

    #[test]
    fn maps_lists_and_preserved_subtrees() {
        let ours = schema(json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "args": {"type": "object", "additionalProperties": {"type": "string"}},
            "stages": {"type": "object", "additionalProperties": {"type": "object", "properties": {"ms": {"type": "integer"}}}},
            "conditions": {"type": "array", "items": {"type": "object", "properties": {"reason": {"type": "string"}, "message": {"type": "string"}}}},
            "names": {"type": "array", "items": {"type": "string"}},
        }}}}));
        // Declared the same: current.
        assert!(missing_paths(&ours, &ours).is_empty());
        // A map whose values lost a field, a list whose items did, a map turned into an
        // object without additionalProperties, a list without an item schema.
        let older = schema(json!({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {
            "args": {"type": "object"},
            "stages": {"type": "object", "additionalProperties": {"type": "object"}},
            "conditions": {"type": "array", "items": {"type": "object", "properties": {"reason": {"type": "string"}}}},
            "names": {"type": "array"},
        }}}}));
        assert_eq!(
            missing_paths(&older, &ours),
            [
                "spec.args.*",
                "spec.conditions[*].message",
                "spec.stages.*.ms"
            ]
        );
        // What x-kubernetes-preserve-unknown-fields keeps is not missing: the whole spec
        // kept, or the root.
        let kept = schema(json!({"type": "object", "properties": {
            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}));
        assert!(missing_paths(&kept, &ours).is_empty());
        let root = schema(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        assert!(missing_paths(&root, &ours).is_empty());
        // ... but a declared property below it is pruned by its own schema.
        let declared = schema(
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
            "properties": {"spec": {"type": "object", "properties": {}}}}),
        );
        assert_eq!(
            missing_paths(&declared, &ours),
            ["spec.args", "spec.conditions", "spec.names", "spec.stages"]
        );
    }

    #[test]
    fn the_message_names_the_fields_and_the_fix() {
        let m = stale_message(&["status.logEnded".into(), "spec.cancelled".into()]);
        assert!(m.contains("status.logEnded, spec.cancelled"), "{m}");
        assert!(
            m.contains("kubectl apply --server-side -f crds/buildjob.yaml"),
            "{m}"
        );
        assert!(
            m.contains("buildshuttle crd | kubectl apply --server-side -f -"),
            "{m}"
        );
        assert!(m.contains("customresourcedefinitions/buildjobs.buildshuttle.akkeris.io"));
        assert!(CrdState::Stale(vec!["x".into()]).refusal().is_some());
        assert!(CrdState::Unchecked(None).refusal().is_some());
        for fine in [CrdState::Current, CrdState::Missing, CrdState::Unreadable] {
            assert_eq!(fine.refusal(), None, "{fine:?}");
        }
    }

    #[tokio::test]
    async fn a_post_waits_for_the_first_check_and_the_controller_for_a_current_crd() {
        let (tx, state) = watch::channel(CrdState::Unchecked(None));
        let check = CrdCheck { state };
        let waiting = tokio::spawn({
            let check = check.clone();
            async move { check.refusal_after_first_check().await }
        });
        let usable = tokio::spawn({
            let check = check.clone();
            async move { check.usable().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_replace(CrdState::Stale(vec!["status.logEnded".into()]));
        let refused = waiting.await.expect("joins");
        assert!(refused.is_some_and(|m| m.contains("status.logEnded")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!usable.is_finished(), "the controller waits on a stale CRD");
        tx.send_replace(CrdState::Current);
        tokio::time::timeout(Duration::from_secs(5), usable)
            .await
            .expect("goes on once current")
            .expect("joins");
        assert_eq!(check.refusal(), None);
        assert_eq!(CrdCheck::off().refusal(), None);
    }
}
