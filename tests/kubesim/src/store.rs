//! The API server's state and write semantics: one global resourceVersion, a bounded event
//! history for watch resume (older versions are "compacted": 410), metadata the server owns,
//! generation, managed fields, status subresource rules, finalizers, graceful pod deletion
//! and garbage collection.

use crate::error::ApiError;
use crate::fields::{self, Manager};
use crate::select::{FieldSelector, LabelSelector};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc};

pub const NODE_NAME: &str = "sim-node-1";

/// A printer column of a CRD (or a built-in kind's table).
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub description: String,
    pub priority: i64,
}

/// A resource the server serves.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a status subresource: writes to the object ignore `.status`.
    pub status: bool,
    pub short_names: Vec<String>,
    pub columns: Vec<Column>,
    /// Defined by a CRD (merge rules, unconditional updates and SMP differ).
    pub custom: bool,
    /// Extra subresources listed in discovery (`log`, `eviction`).
    pub extra_subresources: Vec<&'static str>,
    /// A CRD version's `openAPIV3Schema`: what writes are pruned by (see `prune`).
    pub schema: Option<Arc<Value>>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn builtin(group: &str, plural: &str, kind: &str, namespaced: bool, status: bool) -> Self {
        let version = "v1".to_string();
        ResourceType {
            group: group.into(),
            version,
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status,
            short_names: vec![],
            columns: vec![],
            custom: false,
            extra_subresources: vec![],
            schema: None,
        }
    }
}

/// Object key: group, plural, namespace ("" if cluster-scoped), name.
pub type Key = (String, String, String, String);

#[derive(Debug, Clone)]
struct Entry {
    obj: Value,
    managers: Vec<Manager>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvType {
    Added,
    Modified,
    Deleted,
}

impl EvType {
    pub fn as_str(self) -> &'static str {
        match self {
            EvType::Added => "ADDED",
            EvType::Modified => "MODIFIED",
            EvType::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it (with the previous state, for selector transitions).
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub ty: EvType,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub obj: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

struct State {
    types: BTreeMap<(String, String), ResourceType>,
    objects: BTreeMap<Key, Entry>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Watches from a resourceVersion at or below this get 410 Gone.
    compacted: u64,
}

/// How a write is attributed in managedFields.
pub enum How {
    Update { manager: String },
    Applied { managers: Vec<Manager> },
}

/// What to do with dependents when an owner goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    pub grace: Option<i64>,
    pub propagation: Option<Propagation>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Work for the garbage collector and namespace controller.
pub enum GcWork {
    OwnerGone { uid: String, orphan: bool },
    Namespace(String),
}

pub struct Store {
    state: Mutex<State>,
    pub tx: broadcast::Sender<Arc<Event>>,
    gc: mpsc::UnboundedSender<GcWork>,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn now_plus(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn meta_str<'a>(o: &'a Value, k: &str) -> &'a str {
    o["metadata"][k].as_str().unwrap_or("")
}

/// What `generation` tracks: everything outside metadata (and status, when it is a
/// subresource).
fn spec_part(o: &Value, status_sub: bool) -> Value {
    let mut v = o.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if status_sub {
            m.remove("status");
        }
    }
    v
}

fn without_rv(o: &Value) -> Value {
    let mut v = o.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    v
}

const GENERATE_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

impl Store {
    pub fn new(history_limit: usize) -> (Arc<Store>, mpsc::UnboundedReceiver<GcWork>) {
        let (tx, _) = broadcast::channel(65_536);
        let (gc, gc_rx) = mpsc::unbounded_channel();
        let mut types = BTreeMap::new();
        let mut add = |t: ResourceType| {
            types.insert((t.group.clone(), t.plural.clone()), t);
        };
        let mut pods = ResourceType::builtin("", "pods", "Pod", true, true);
        pods.short_names = vec!["po".into()];
        pods.extra_subresources = vec!["log", "eviction", "binding"];
        add(pods);
        add(ResourceType::builtin("", "secrets", "Secret", true, false));
        let mut ev = ResourceType::builtin("", "events", "Event", true, false);
        ev.short_names = vec!["ev".into()];
        add(ev);
        let mut ns = ResourceType::builtin("", "namespaces", "Namespace", false, true);
        ns.short_names = vec!["ns".into()];
        add(ns);
        let mut cm = ResourceType::builtin("", "configmaps", "ConfigMap", true, false);
        cm.short_names = vec!["cm".into()];
        add(cm);
        let mut sa = ResourceType::builtin("", "serviceaccounts", "ServiceAccount", true, false);
        sa.short_names = vec!["sa".into()];
        add(sa);
        let mut no = ResourceType::builtin("", "nodes", "Node", false, true);
        no.short_names = vec!["no".into()];
        add(no);
        let mut ev2 = ResourceType::builtin("events.k8s.io", "events", "Event", true, false);
        ev2.short_names = vec!["ev".into()];
        add(ev2);
        add(ResourceType::builtin(
            "coordination.k8s.io",
            "leases",
            "Lease",
            true,
            false,
        ));
        let mut crd = ResourceType::builtin(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        );
        crd.short_names = vec!["crd".into(), "crds".into()];
        add(crd);
        let store = Arc::new(Store {
            state: Mutex::new(State {
                types,
                objects: BTreeMap::new(),
                rv: 1,
                history: VecDeque::new(),
                history_limit,
                compacted: 1,
            }),
            tx,
            gc,
        });
        (store, gc_rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.values().cloned().collect()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Finds a type by group and plural, singular, kind or short name (kubectl style).
    pub fn resolve(&self, group: &str, version: &str, name: &str) -> Option<ResourceType> {
        let st = self.lock();
        st.types
            .values()
            .find(|t| t.group == group && t.version == version && t.plural == name)
            .cloned()
    }

    /// Forgets all history: any watch resuming from an earlier version gets 410.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.compacted = st.rv;
    }

    fn emit(&self, st: &mut State, ty: EvType, key: &Key, obj: &Value, old: Option<Value>) {
        let ev = Arc::new(Event {
            rv: st.rv,
            ty,
            group: key.0.clone(),
            plural: key.1.clone(),
            namespace: key.2.clone(),
            obj: Arc::new(obj.clone()),
            old: old.map(Arc::new),
        });
        st.history.push_back(ev.clone());
        while st.history.len() > st.history_limit {
            if let Some(e) = st.history.pop_front() {
                st.compacted = e.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    /// A snapshot for a new watch, taken under the lock together with the subscription so
    /// no event falls between them. `from`: None = current state as ADDED events.
    #[allow(clippy::type_complexity)]
    pub fn watch_start(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        from: Option<u64>,
    ) -> Result<(broadcast::Receiver<Arc<Event>>, Vec<Arc<Event>>, u64), ApiError> {
        let st = self.lock();
        let rx = self.tx.subscribe();
        let cur = st.rv;
        let mut initial = Vec::new();
        match from {
            None => {
                for (k, e) in st.objects.iter() {
                    if k.0 == rt.group && k.1 == rt.plural && ns.is_none_or(|n| n == k.2) {
                        initial.push(Arc::new(Event {
                            rv: cur,
                            ty: EvType::Added,
                            group: k.0.clone(),
                            plural: k.1.clone(),
                            namespace: k.2.clone(),
                            obj: Arc::new(e.obj.clone()),
                            old: None,
                        }));
                    }
                }
            }
            Some(rv) => {
                if rv < st.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        st.compacted
                    )));
                }
                for e in st.history.iter().filter(|e| e.rv > rv) {
                    if e.group == rt.group
                        && e.plural == rt.plural
                        && ns.is_none_or(|n| n == e.namespace)
                    {
                        initial.push(e.clone());
                    }
                }
            }
        }
        Ok((rx, initial, cur))
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        let st = self.lock();
        st.objects
            .get(&key(rt, ns, name))
            .map(|e| e.obj.clone())
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// Matching objects sorted by namespace and name, and the list's resourceVersion.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        after: Option<&(String, String)>,
    ) -> (Vec<Value>, u64, u64) {
        let st = self.lock();
        let items = of_type(&st.objects, rt)
            .filter(|(k, _)| ns.is_none_or(|n| n == k.2))
            .filter(|(k, _)| after.is_none_or(|(ans, aname)| (&k.2, &k.3) > (ans, aname)))
            .map(|(_, e)| e.obj.clone())
            .filter(|o| labels.matches(o) && fields.matches(o))
            .collect();
        (items, st.rv, st.compacted)
    }

    /// All objects of every type in a namespace (for namespace deletion).
    fn keys_in_namespace(&self, ns: &str) -> Vec<Key> {
        self.lock()
            .objects
            .keys()
            .filter(|k| k.2 == ns)
            .cloned()
            .collect()
    }

    fn namespace_exists(st: &State, ns: &str) -> bool {
        st.objects.contains_key(&(
            String::new(),
            "namespaces".to_string(),
            String::new(),
            ns.to_string(),
        ))
    }

    /// POST: a new object (201). `how` attributes its fields.
    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        how: How,
    ) -> Result<Value, ApiError> {
        shape(rt, &obj)?;
        if obj["metadata"].is_null() {
            obj["metadata"] = json!({});
        }
        let body_ns = meta_str(&obj, "namespace").to_string();
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let gen = meta_str(&obj, "generateName").to_string();
            if gen.is_empty() {
                return Err(ApiError::invalid(
                    &rt.group,
                    &rt.kind,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
            let mut r = random_u64();
            let mut suffix = String::new();
            for _ in 0..5 {
                suffix.push(GENERATE_CHARS[(r % GENERATE_CHARS.len() as u64) as usize] as char);
                r /= GENERATE_CHARS.len() as u64;
            }
            name = format!("{gen}{suffix}");
        }
        if !valid_name(&name, rt) {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                &name,
                "metadata.name",
                &format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            ));
        }
        let mut st = self.lock();
        if rt.namespaced && !Self::namespace_exists(&st, ns) {
            return Err(ApiError::not_found("", "namespaces", ns));
        }
        if rt.namespaced
            && st
                .objects
                .get(&(String::new(), "namespaces".into(), String::new(), ns.into()))
                .is_some_and(|e| !e.obj["metadata"]["deletionTimestamp"].is_null())
        {
            return Err(ApiError::forbidden(format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                crate::error::qualified(&rt.group, &rt.plural)
            )));
        }
        let k = key(rt, ns, &name);
        if st.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        {
            let m = obj["metadata"]
                .as_object_mut()
                .expect("metadata is an object");
            m.insert("name".into(), json!(name));
            if rt.namespaced {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(now()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
            m.remove("selfLink");
        }
        if rt.status && rt.custom {
            // A CR's status is set only through /status.
            obj.as_object_mut().map(|m| m.remove("status"));
        }
        normalize(rt, &mut obj, None);
        validate(rt, &name, &obj)?;
        let managers = match how {
            How::Update { manager } => {
                let mut ms = Vec::new();
                fields::record_update(
                    &mut ms,
                    &manager,
                    "",
                    &rt.api_version(),
                    &json!({}),
                    &obj,
                    &now(),
                );
                ms
            }
            How::Applied { managers } => managers,
        };
        if !managers.is_empty() {
            obj["metadata"]["managedFields"] = fields::render(&managers);
        }
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        if rt.group == "apiextensions.k8s.io" {
            register_crd(&mut st, &obj)?;
        }
        st.objects.insert(
            k.clone(),
            Entry {
                obj: obj.clone(),
                managers,
            },
        );
        self.emit(&mut st, EvType::Added, &k, &obj, None);
        Ok(obj)
    }

    /// The current object and its managers, for a read-modify-write under the caller's
    /// precondition checks.
    pub fn current(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<(Value, Vec<Manager>), ApiError> {
        let st = self.lock();
        st.objects
            .get(&key(rt, ns, name))
            .map(|e| (e.obj.clone(), e.managers.clone()))
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }

    /// Writes `new` over the object. `expect_rv`: the resourceVersion `new` was computed
    /// from (stale = 409). `sub`: "" or "status".
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        sub: &str,
        new: Value,
        expect_rv: Option<&str>,
        how: How,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        self.update_locked(&mut st, rt, ns, name, sub, new, expect_rv, how)
    }

    /// An atomic read-modify-write (the real server's GuaranteedUpdate): `f` computes the
    /// new object (and its attribution) from the current one and its managers.
    pub fn modify<F>(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        sub: &str,
        f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnOnce(&Value, &[Manager]) -> Result<(Value, How), ApiError>,
    {
        let mut st = self.lock();
        let k = key(rt, ns, name);
        let Some(entry) = st.objects.get(&k).cloned() else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let (new, how) = f(&entry.obj, &entry.managers)?;
        self.update_locked(&mut st, rt, ns, name, sub, new, None, how)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_locked(
        &self,
        st: &mut State,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        sub: &str,
        mut new: Value,
        expect_rv: Option<&str>,
        how: How,
    ) -> Result<Value, ApiError> {
        let k = key(rt, ns, name);
        let Some(entry) = st.objects.get(&k).cloned() else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let old = entry.obj;
        if let Some(rv) = expect_rv.filter(|r| !r.is_empty()) {
            if rv != meta_str(&old, "resourceVersion") {
                return Err(ApiError::stale(&rt.group, &rt.plural, name));
            }
        }
        let body_name = meta_str(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&new, "namespace");
        if rt.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        shape(rt, &new)?;
        if sub == "status" {
            let status = new.get("status").cloned();
            let managed = new["metadata"]["managedFields"].clone();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    new.as_object_mut().map(|m| m.remove("status"));
                }
            }
            new["metadata"]["managedFields"] = managed;
        } else if rt.status && sub != "binding" {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|m| m.remove("status"));
                }
            }
        }
        if new["metadata"].is_null() {
            new["metadata"] = json!({});
        }
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "generateName",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    new["metadata"].as_object_mut().map(|m| m.remove(f));
                }
            }
        }
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        normalize(rt, &mut new, Some(&old));
        validate(rt, name, &new)?;
        if rt.plural == "pods" && sub.is_empty() {
            // Pod specs are immutable but for a few fields; the simulator keeps the old
            // spec except nodeName set by binding (internal writes).
            let node = new["spec"]["nodeName"].clone();
            let deadline = new["spec"]["activeDeadlineSeconds"].clone();
            new["spec"] = old["spec"].clone();
            if !node.is_null() {
                new["spec"]["nodeName"] = node;
            }
            if !deadline.is_null() {
                new["spec"]["activeDeadlineSeconds"] = deadline;
            }
        }
        if !old["metadata"]["deletionTimestamp"].is_null() {
            let before: Vec<&Value> = old["metadata"]["finalizers"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            if let Some(now_f) = new["metadata"]["finalizers"].as_array() {
                if now_f.iter().any(|f| !before.contains(&f)) {
                    return Err(ApiError::invalid(
                        &rt.group,
                        &rt.kind,
                        name,
                        "metadata.finalizers",
                        "Forbidden: no new finalizers can be added if the object is being deleted",
                    ));
                }
            }
        }
        // Binding sets spec.nodeName without a new generation.
        if sub != "binding" && spec_part(&old, rt.status) != spec_part(&new, rt.status) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        let managers = match how {
            How::Update { manager } => {
                let mut ms = entry.managers.clone();
                let mut o = old.clone();
                let mut n = new.clone();
                for v in [&mut o, &mut n] {
                    v["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("managedFields"));
                }
                fields::record_update(&mut ms, &manager, sub, &rt.api_version(), &o, &n, &now());
                ms
            }
            How::Applied { mut managers } => {
                fields::prune(&mut managers, &new);
                managers
            }
        };
        if managers.is_empty() {
            new["metadata"]
                .as_object_mut()
                .map(|m| m.remove("managedFields"));
        } else {
            new["metadata"]["managedFields"] = fields::render(&managers);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if without_rv(&new) == without_rv(&old) {
            // A no-op write: no new resourceVersion, no event.
            return Ok(old);
        }
        st.rv += 1;
        new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let finalizers_empty = new["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|a| a.is_empty());
        let deleting = !new["metadata"]["deletionTimestamp"].is_null();
        if deleting
            && finalizers_empty
            && !(rt.plural == "pods"
                && new["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(0)
                    > 0)
        {
            st.objects.remove(&k);
            self.emit(st, EvType::Deleted, &k, &new, Some(old));
            let _ = self.gc.send(GcWork::OwnerGone {
                uid: meta_str(&new, "uid").to_string(),
                orphan: false,
            });
            return Ok(new);
        }
        if rt.group == "apiextensions.k8s.io" {
            register_crd(st, &new)?;
        }
        st.objects.insert(
            k.clone(),
            Entry {
                obj: new.clone(),
                managers,
            },
        );
        self.emit(st, EvType::Modified, &k, &new, Some(old));
        Ok(new)
    }

    /// DELETE. Returns the object (still there: graceful or finalizers) and whether it is
    /// gone.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let mut st = self.lock();
        let k = key(rt, ns, name);
        let Some(entry) = st.objects.get(&k).cloned() else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, name));
        };
        let old = entry.obj;
        if let Some(uid) = &opts.uid {
            if uid != meta_str(&old, "uid") {
                return Err(ApiError::conflict(
                    &rt.group,
                    &rt.plural,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid")
                    ),
                ));
            }
        }
        if let Some(rv) = &opts.resource_version {
            if rv != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &rt.group,
                    &rt.plural,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        meta_str(&old, "resourceVersion")
                    ),
                ));
            }
        }
        let has_finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|a| !a.is_empty());
        let mut grace = 0;
        if rt.plural == "pods" {
            let bound = !old["spec"]["nodeName"].as_str().unwrap_or("").is_empty();
            let terminal = matches!(
                old["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            );
            grace = opts.grace.unwrap_or_else(|| {
                old["spec"]["terminationGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(30)
            });
            if !bound || terminal {
                grace = 0;
            }
        }
        let orphan = opts.propagation == Some(Propagation::Orphan);
        let already = !old["metadata"]["deletionTimestamp"].is_null();
        if already {
            // A second delete may shorten a pod's grace period (grace 0: force).
            let force_now = rt.plural == "pods" && opts.grace == Some(0) && !has_finalizers;
            if !force_now {
                return Ok((old, false));
            }
        } else if has_finalizers || grace > 0 {
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = json!(now_plus(grace));
            new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            if has_finalizers {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                new["metadata"]["generation"] = json!(g + 1);
            }
            if orphan {
                let _ = self.gc.send(GcWork::OwnerGone {
                    uid: meta_str(&old, "uid").to_string(),
                    orphan: true,
                });
            }
            st.rv += 1;
            new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(
                k.clone(),
                Entry {
                    obj: new.clone(),
                    managers: entry.managers,
                },
            );
            self.emit(&mut st, EvType::Modified, &k, &new, Some(old));
            if rt.plural == "namespaces" {
                let _ = self.gc.send(GcWork::Namespace(name.to_string()));
            }
            return Ok((new, false));
        }
        if rt.plural == "namespaces" {
            // The namespace controller empties it first.
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            new["status"]["phase"] = json!("Terminating");
            st.rv += 1;
            new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.objects.insert(
                k.clone(),
                Entry {
                    obj: new.clone(),
                    managers: entry.managers,
                },
            );
            self.emit(&mut st, EvType::Modified, &k, &new, Some(old));
            let _ = self.gc.send(GcWork::Namespace(name.to_string()));
            return Ok((new, false));
        }
        st.rv += 1;
        let mut gone = old.clone();
        gone["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.remove(&k);
        self.emit(&mut st, EvType::Deleted, &k, &gone, Some(old));
        let _ = self.gc.send(GcWork::OwnerGone {
            uid: meta_str(&gone, "uid").to_string(),
            orphan,
        });
        Ok((gone, true))
    }

    /// The garbage collector and namespace controller: deletes dependents of removed
    /// owners (background propagation), strips owner references (orphan), empties and
    /// removes terminating namespaces.
    pub async fn run_gc(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<GcWork>) {
        while let Some(work) = rx.recv().await {
            match work {
                GcWork::OwnerGone { uid, orphan } => {
                    let dependents: Vec<(ResourceType, Key)> = {
                        let st = self.lock();
                        st.objects
                            .iter()
                            .filter(|(_, e)| {
                                e.obj["metadata"]["ownerReferences"]
                                    .as_array()
                                    .is_some_and(|a| a.iter().any(|r| r["uid"] == uid.as_str()))
                            })
                            .filter_map(|(k, _)| {
                                st.types
                                    .get(&(k.0.clone(), k.1.clone()))
                                    .map(|t| (t.clone(), k.clone()))
                            })
                            .collect()
                    };
                    for (rt, k) in dependents {
                        if orphan {
                            if let Ok((mut o, _)) = self.current(&rt, &k.2, &k.3) {
                                if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut()
                                {
                                    refs.retain(|r| r["uid"] != uid.as_str());
                                }
                                let _ = self.update(
                                    &rt,
                                    &k.2,
                                    &k.3,
                                    "",
                                    o,
                                    None,
                                    How::Update {
                                        manager: "generic-garbage-collector".into(),
                                    },
                                );
                            }
                        } else {
                            let _ = self.delete(&rt, &k.2, &k.3, &DeleteOpts::default());
                        }
                    }
                }
                GcWork::Namespace(ns) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.empty_namespace(&ns).await });
                }
            }
        }
    }

    async fn empty_namespace(&self, ns: &str) {
        loop {
            let keys = self.keys_in_namespace(ns);
            if keys.is_empty() {
                break;
            }
            for k in keys {
                let rt = self.lock().types.get(&(k.0.clone(), k.1.clone())).cloned();
                if let Some(rt) = rt {
                    let _ = self.delete(&rt, &k.2, &k.3, &DeleteOpts::default());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let mut st = self.lock();
        let k: Key = (
            String::new(),
            "namespaces".into(),
            String::new(),
            ns.to_string(),
        );
        if let Some(e) = st.objects.remove(&k) {
            st.rv += 1;
            let mut gone = e.obj.clone();
            gone["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            self.emit(&mut st, EvType::Deleted, &k, &gone, Some(e.obj));
        }
    }

    /// Looks a type up by any of its names (for kubectl-style resolution in tests).
    pub fn type_named(&self, name: &str) -> Option<ResourceType> {
        let st = self.lock();
        st.types
            .values()
            .find(|t| {
                t.plural == name
                    || t.singular == name
                    || t.short_names.iter().any(|s| s == name)
                    || t.kind.eq_ignore_ascii_case(name)
            })
            .cloned()
    }

    /// Every object of a type (internal, uncounted: the kubelet's own view).
    pub fn all(&self, rt: &ResourceType) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.0 == rt.group && k.1 == rt.plural)
            .map(|(_, e)| e.obj.clone())
            .collect()
    }

    /// The objects of a type that `keep` selects (internal, uncounted); only those are
    /// copied.
    pub fn all_where(&self, rt: &ResourceType, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let st = self.lock();
        of_type(&st.objects, rt)
            .filter(|(_, e)| keep(&e.obj))
            .map(|(_, e)| e.obj.clone())
            .collect()
    }

    pub fn counts(&self) -> HashMap<String, usize> {
        let st = self.lock();
        let mut m = HashMap::new();
        for k in st.objects.keys() {
            *m.entry(k.1.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// The object's top-level shape, checked before anything indexes into it (a body from a
/// client must never panic the server): 400, as the real decoder answers.
pub fn shape(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let bad = |what: &str| {
        Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {what}",
            rt.kind, rt.version, rt.kind
        )))
    };
    if !obj.is_object() {
        return bad("the body is not a JSON object");
    }
    for f in ["metadata", "spec", "status", "data", "stringData"] {
        if !(obj[f].is_null() || obj[f].is_object()) {
            return bad(&format!("{f} must be an object"));
        }
    }
    for f in ["labels", "annotations"] {
        if !(obj["metadata"][f].is_null() || obj["metadata"][f].is_object()) {
            return bad(&format!("metadata.{f} must be an object"));
        }
    }
    for f in ["finalizers", "ownerReferences"] {
        if !(obj["metadata"][f].is_null() || obj["metadata"][f].is_array()) {
            return bad(&format!("metadata.{f} must be a list"));
        }
    }
    if rt.plural == "pods" {
        for list in ["containers", "initContainers"] {
            let l = &obj["spec"][list];
            if !(l.is_null() || l.as_array().is_some_and(|a| a.iter().all(Value::is_object))) {
                return bad(&format!("spec.{list} must be a list of objects"));
            }
        }
    }
    Ok(())
}

/// The objects of one type, in key order (a range of the map, not a scan of it).
fn of_type<'a>(
    objects: &'a BTreeMap<Key, Entry>,
    rt: &'a ResourceType,
) -> impl Iterator<Item = (&'a Key, &'a Entry)> + 'a {
    let from = (
        rt.group.clone(),
        rt.plural.clone(),
        String::new(),
        String::new(),
    );
    objects
        .range(from..)
        .take_while(move |(k, _)| k.0 == rt.group && k.1 == rt.plural)
}

pub fn key(rt: &ResourceType, ns: &str, name: &str) -> Key {
    (
        rt.group.clone(),
        rt.plural.clone(),
        if rt.namespaced {
            ns.to_string()
        } else {
            String::new()
        },
        name.to_string(),
    )
}

fn valid_name(name: &str, rt: &ResourceType) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    // Leases and events allow subdomains; everything here is a lowercase RFC 1123 name
    // or subdomain.
    let _ = rt;
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let last = name
        .chars()
        .last()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    ok_chars && first && last
}

/// The most a Secret's `data` values may hold together (the API server's MaxSecretSize).
pub const MAX_SECRET_SIZE: usize = 1024 * 1024;

/// The real server's validation of a kind's objects on every write, where the simulator
/// models it: a Secret's `data` values (decoded) total at most MAX_SECRET_SIZE bytes
/// (ValidateSecret: 422 `data: Too long`).
fn validate(rt: &ResourceType, name: &str, obj: &Value) -> Result<(), ApiError> {
    if (rt.group.as_str(), rt.plural.as_str()) == ("", "secrets") {
        use base64::Engine;
        let total: usize = obj["data"]
            .as_object()
            .map(|data| {
                data.values()
                    .filter_map(Value::as_str)
                    .map(|v| {
                        base64::engine::general_purpose::STANDARD
                            .decode(v)
                            .map_or(v.len(), |b| b.len())
                    })
                    .sum()
            })
            .unwrap_or(0);
        if total > MAX_SECRET_SIZE {
            let msg = format!("Too long: may not be more than {MAX_SECRET_SIZE} bytes");
            let mut e = ApiError::invalid("", "Secret", name, "data", &msg);
            if let Some(d) = e.details.as_mut() {
                d["causes"] =
                    json!([{ "reason": "FieldValueTooLong", "message": msg, "field": "data" }]);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// What the real server does to a kind's objects on every write.
fn normalize(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => {
            use base64::Engine;
            if let Some(sd) = obj.get("stringData").and_then(Value::as_object).cloned() {
                for (k, v) in sd {
                    let enc = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(enc);
                }
                obj.as_object_mut().map(|m| m.remove("stringData"));
            }
            if obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
        }
        ("", "pods") if old.is_none() => {
            let spec = &mut obj["spec"];
            for (k, v) in [
                ("restartPolicy", json!("Always")),
                ("terminationGracePeriodSeconds", json!(30)),
                ("dnsPolicy", json!("ClusterFirst")),
                ("schedulerName", json!("default-scheduler")),
                ("securityContext", json!({})),
            ] {
                if spec[k].is_null() {
                    spec[k] = v;
                }
            }
            for list in ["initContainers", "containers"] {
                if let Some(cs) = spec[list].as_array_mut() {
                    for c in cs {
                        if c["terminationMessagePath"].is_null() {
                            c["terminationMessagePath"] = json!("/dev/termination-log");
                        }
                        if c["terminationMessagePolicy"].is_null() {
                            c["terminationMessagePolicy"] = json!("File");
                        }
                        if c["imagePullPolicy"].is_null() {
                            let img = c["image"].as_str().unwrap_or("");
                            let latest = img.ends_with(":latest")
                                || !img.rsplit('/').next().unwrap_or("").contains(':');
                            c["imagePullPolicy"] =
                                json!(if latest { "Always" } else { "IfNotPresent" });
                        }
                    }
                }
            }
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        ("", "namespaces") if old.is_none() => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let names = obj["spec"]["names"].clone();
            obj["status"] = json!({
                "acceptedNames": names,
                "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found",
                     "lastTransitionTime": old.and_then(|o| o["status"]["conditions"][0]["lastTransitionTime"].as_str()).map(String::from).unwrap_or_else(now)},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted",
                     "lastTransitionTime": old.and_then(|o| o["status"]["conditions"][1]["lastTransitionTime"].as_str()).map(String::from).unwrap_or_else(now)},
                ]
            });
        }
        _ => {}
    }
}

/// A CRD registers (or updates) its resource when written.
fn register_crd(st: &mut State, crd: &Value) -> Result<(), ApiError> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or("").to_string();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or("").to_string();
    if group.is_empty() || plural.is_empty() {
        return Err(ApiError::invalid(
            "apiextensions.k8s.io",
            "CustomResourceDefinition",
            meta_str(crd, "name"),
            "spec.group",
            "Required value",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let v = versions
        .iter()
        .find(|v| v["storage"] == true)
        .or(versions.first())
        .cloned()
        .unwrap_or(Value::Null);
    let columns = v["additionalPrinterColumns"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| Column {
                    name: c["name"].as_str().unwrap_or("").into(),
                    type_: c["type"].as_str().unwrap_or("string").into(),
                    json_path: c["jsonPath"].as_str().unwrap_or("").into(),
                    description: c["description"].as_str().unwrap_or("").into(),
                    priority: c["priority"].as_i64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    let rt = ResourceType {
        group: group.clone(),
        version: v["name"].as_str().unwrap_or("v1").into(),
        plural: plural.clone(),
        singular: names["singular"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| names["kind"].as_str().unwrap_or("").to_lowercase()),
        kind: names["kind"].as_str().unwrap_or("").into(),
        namespaced: spec["scope"] != "Cluster",
        status: v["subresources"]["status"].is_object(),
        short_names: names["shortNames"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        columns,
        custom: true,
        extra_subresources: vec![],
        schema: v["schema"]["openAPIV3Schema"]
            .is_object()
            .then(|| Arc::new(v["schema"]["openAPIV3Schema"].clone())),
    };
    st.types.insert((group, plural), rt);
    Ok(())
}
