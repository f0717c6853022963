//! The simulated scheduler and kubelet of one node, `sim-node-1`. Docker mode runs each
//! pod's containers on the local dockerd with host networking (every pod shares the host's
//! loopback); instant mode completes pods at once without running anything.

use crate::error::ApiError;
use crate::store::{now, DeleteOpts, How, ResourceType, Store, NODE_NAME};
use crate::Shared;
use axum::body::{Body, Bytes};
use axum::response::Response;
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How pods run.
#[derive(Clone, Debug, PartialEq)]
pub enum KubeletMode {
    /// Containers on the local dockerd.
    Docker,
    /// Every pod succeeds at once; containers "terminate" with exit 0 and the configured
    /// termination message (for scale tests).
    Instant,
}

/// A fault the node inflicts on a pod.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Kubelet pressure eviction: phase Failed, reason Evicted, DisruptionTarget.
    Evict,
    /// The main container is OOM-killed (exit 137, reason OOMKilled).
    Oom,
    /// The node stops reporting: no status change, deletion never completes.
    LoseNode,
}

struct PodCtl {
    ns: String,
    name: String,
    notify: Notify,
    faults: Mutex<Vec<Fault>>,
    lost: AtomicBool,
}

pub struct Kubelet {
    store: Arc<Store>,
    mode: KubeletMode,
    docker: Option<Docker>,
    sim_id: String,
    dir: PathBuf,
    instant_message: Mutex<String>,
    pods: Mutex<HashMap<String, Arc<PodCtl>>>,
    pods_rt: ResourceType,
    /// Bumped to end every open `pods/log?follow=true` stream, as an API server or kubelet
    /// restart (or a proxy's idle timeout) does while the container runs on.
    log_cuts: tokio::sync::watch::Sender<u64>,
}

/// Sets (or replaces) a condition, keeping lastTransitionTime unless the status flips.
pub fn set_condition(obj: &mut Value, ty: &str, status: &str, reason: &str, message: &str) {
    if !obj["status"]["conditions"].is_array() {
        obj["status"]["conditions"] = json!([]);
    }
    let conds = obj["status"]["conditions"]
        .as_array_mut()
        .expect("just made an array");
    let mut c =
        json!({"type": ty, "status": status, "lastProbeTime": null, "lastTransitionTime": now()});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
    }
    if !message.is_empty() {
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == ty) {
        Some(old) => {
            if old["status"] == status {
                c["lastTransitionTime"] = old["lastTransitionTime"].clone();
            }
            *old = c;
        }
        None => conds.push(c),
    }
}

/// Binding: spec.nodeName and PodScheduled in one write, as the binding subresource does.
pub fn bind(
    store: &Store,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    node: &str,
) -> Result<Value, ApiError> {
    store.modify(rt, ns, name, "binding", |cur, _| {
        let mut n = cur.clone();
        let bound = cur["spec"]["nodeName"].as_str().unwrap_or("");
        if !bound.is_empty() {
            if bound == node {
                return Ok((
                    n,
                    How::Update {
                        manager: "kube-scheduler".into(),
                    },
                ));
            }
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                &format!("pod {name} is already assigned to node \"{bound}\""),
            ));
        }
        n["spec"]["nodeName"] = json!(node);
        set_condition(&mut n, "PodScheduled", "True", "", "");
        Ok((
            n,
            How::Update {
                manager: "kube-scheduler".into(),
            },
        ))
    })
}

/// One container's life as the kubelet tracks it.
#[derive(Clone, Debug)]
struct Ctr {
    name: String,
    image: String,
    sidecar: bool,
    id: Option<String>,
    state: Value,
    oom: bool,
    term_file: PathBuf,
    fallback_to_logs: bool,
    ready: bool,
}

impl Ctr {
    fn status(&self) -> Value {
        let mut s = json!({"name": self.name, "image": self.image, "imageID": "", "ready": self.ready,
                           "restartCount": 0, "started": self.state.get("running").is_some(), "state": self.state});
        if let Some(id) = &self.id {
            s["containerID"] = json!(format!("docker://{id}"));
        }
        s
    }
    fn exited(&self) -> bool {
        self.state.get("terminated").is_some()
    }
    fn exit_code(&self) -> i64 {
        self.state["terminated"]["exitCode"].as_i64().unwrap_or(0)
    }
}

/// Why the pod's normal course stopped.
enum Stop {
    Deleted(i64),
    Gone,
    Fault(Fault),
    Deadline,
}

fn waiting(reason: &str, message: &str) -> Value {
    let mut w = json!({"reason": reason});
    if !message.is_empty() {
        w["message"] = json!(message);
    }
    json!({"waiting": w})
}

fn valid_image(img: &str) -> bool {
    if img.is_empty()
        || img.contains(char::is_whitespace)
        || img.ends_with(':')
        || img.ends_with('/')
    {
        return false;
    }
    let (name, _) = match img.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (img, None),
    };
    // Tag after the last slash's colon; the repository path must be lowercase.
    let last = name.rsplit('/').next().unwrap_or("");
    let repo_end = name.len() - last.len() + last.find(':').unwrap_or(last.len());
    let repo = &name[..repo_end];
    let host_len = if repo.contains('/')
        && repo
            .split('/')
            .next()
            .is_some_and(|h| h.contains('.') || h.contains(':') || h == "localhost")
    {
        repo.find('/').unwrap_or(0)
    } else {
        0
    };
    repo[host_len..]
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
}

fn split_image(img: &str) -> (String, String) {
    if let Some((n, d)) = img.split_once('@') {
        return (n.to_string(), d.to_string());
    }
    let last = img.rsplit('/').next().unwrap_or("");
    match last.rfind(':') {
        Some(i) => {
            let cut = img.len() - last.len() + i;
            (img[..cut].to_string(), img[cut + 1..].to_string())
        }
        None => (img.to_string(), "latest".to_string()),
    }
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

impl Kubelet {
    pub fn new(
        store: Arc<Store>,
        mode: KubeletMode,
        sim_id: String,
        dir: PathBuf,
    ) -> Result<Arc<Kubelet>, String> {
        let docker = match mode {
            KubeletMode::Docker => {
                Some(Docker::connect_with_unix_defaults().map_err(|e| e.to_string())?)
            }
            KubeletMode::Instant => None,
        };
        let pods_rt = store.type_named("pods").ok_or("pods are built in")?;
        Ok(Arc::new(Kubelet {
            store,
            mode,
            docker,
            sim_id,
            dir,
            instant_message: Mutex::new(String::new()),
            pods: Mutex::new(HashMap::new()),
            pods_rt,
            log_cuts: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Ends every open followed log stream; the containers run on.
    pub fn cut_log_streams(&self) {
        self.log_cuts.send_modify(|n| *n += 1);
    }

    pub fn set_instant_message(&self, msg: &str) {
        *self
            .instant_message
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = msg.to_string();
    }

    /// Watches pods (internally) and schedules, starts and stops them.
    pub async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let mut rx = self.store.tx.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) if ev.group.is_empty() && ev.plural == "pods" => {
                        self.on_pod(&shared, &ev.obj, ev.ty == crate::store::EvType::Deleted);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.scan(&shared, true),
                    Err(_) => return,
                },
                _ = tick.tick() => self.scan(&shared, false),
            }
        }
    }

    /// Picks up pods this node does not track yet (a bind that failed, events missed).
    /// After missed events (`lagged`), every tracked pod also looks at itself again; the
    /// periodic scan leaves them alone (each pod's task wakes on its own events and
    /// timers), so a node with many finished pods costs nothing per second.
    fn scan(self: &Arc<Self>, shared: &Arc<Shared>, lagged: bool) {
        let tracked: Vec<(String, Arc<PodCtl>)> = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(uid, ctl)| (uid.clone(), ctl.clone()))
            .collect();
        if lagged {
            for (_, ctl) in &tracked {
                ctl.notify.notify_one();
            }
        }
        let known: std::collections::HashSet<&str> =
            tracked.iter().map(|(uid, _)| uid.as_str()).collect();
        let fresh = self.store.all_where(&self.pods_rt, |p| {
            !known.contains(p["metadata"]["uid"].as_str().unwrap_or(""))
        });
        for p in fresh {
            self.on_pod(shared, &p, false);
        }
    }

    fn on_pod(self: &Arc<Self>, shared: &Arc<Shared>, pod: &Value, deleted: bool) {
        let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
        let existing = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uid)
            .cloned();
        if let Some(ctl) = existing {
            ctl.notify.notify_one();
            return;
        }
        if deleted || !pod["metadata"]["deletionTimestamp"].is_null() {
            return;
        }
        let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
        if node.is_empty() {
            if shared.knobs.unschedulable.load(Ordering::SeqCst) {
                let _ = self.store.modify(&self.pods_rt, &ns, &name, "status", |cur, _| {
                    let mut n = cur.clone();
                    set_condition(&mut n, "PodScheduled", "False", "Unschedulable",
                        "0/1 nodes are available: 1 node(s) were unschedulable. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.");
                    Ok((n, How::Update { manager: "kube-scheduler".into() }))
                });
            } else {
                let _ = bind(&self.store, &self.pods_rt, &ns, &name, NODE_NAME);
            }
            return;
        }
        if node != NODE_NAME {
            return;
        }
        let ctl = Arc::new(PodCtl {
            ns,
            name,
            notify: Notify::new(),
            faults: Mutex::new(Vec::new()),
            lost: AtomicBool::new(false),
        });
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.clone(), ctl.clone());
        let me = self.clone();
        tokio::spawn(async move {
            match me.mode {
                KubeletMode::Instant => me.run_instant(&ctl).await,
                KubeletMode::Docker => me.run_docker(&ctl, &uid).await,
            }
            if !ctl.lost.load(Ordering::SeqCst) {
                me.pods
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&uid);
                let _ = std::fs::remove_dir_all(me.dir.join(&uid));
            }
        });
    }

    /// Applies a fault to a running pod of this node.
    pub async fn fault(&self, ns: &str, name: &str, f: Fault) -> Result<(), ApiError> {
        let pod = self.store.get(&self.pods_rt, ns, name)?;
        let uid = pod["metadata"]["uid"].as_str().unwrap_or("");
        let ctl = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned();
        let Some(ctl) = ctl else {
            return Err(ApiError::bad_request(format!(
                "pod {name} is not running on {NODE_NAME}"
            )));
        };
        ctl.faults.lock().unwrap_or_else(|e| e.into_inner()).push(f);
        if f == Fault::LoseNode {
            ctl.lost.store(true, Ordering::SeqCst);
        }
        ctl.notify.notify_one();
        Ok(())
    }

    fn write_status(&self, ctl: &PodCtl, f: impl FnOnce(&mut Value)) {
        if ctl.lost.load(Ordering::SeqCst) {
            return;
        }
        let _ = self
            .store
            .modify(&self.pods_rt, &ctl.ns, &ctl.name, "status", |cur, _| {
                let mut n = cur.clone();
                f(&mut n);
                Ok((
                    n,
                    How::Update {
                        manager: "kubelet".into(),
                    },
                ))
            });
    }

    fn check(&self, ctl: &PodCtl, pod: Option<&Value>) -> Option<Stop> {
        if let Some(f) = ctl.faults.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(Stop::Fault(f));
        }
        let Some(pod) = pod else {
            return Some(Stop::Gone);
        };
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            return Some(Stop::Deleted(
                pod["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(30),
            ));
        }
        if let (Some(ads), Some(start)) = (
            pod["spec"]["activeDeadlineSeconds"].as_i64(),
            pod["status"]["startTime"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()),
        ) {
            if chrono::Utc::now() - start.with_timezone(&chrono::Utc)
                >= chrono::Duration::seconds(ads)
            {
                return Some(Stop::Deadline);
            }
        }
        None
    }

    fn pod(&self, ctl: &PodCtl) -> Option<Value> {
        self.store.get(&self.pods_rt, &ctl.ns, &ctl.name).ok()
    }

    /// Waits for a change to the pod or `d`, whichever first.
    async fn pause(&self, ctl: &PodCtl, d: Duration) {
        let _ = tokio::time::timeout(d, ctl.notify.notified()).await;
    }

    /// The pod object goes once its containers are stopped (graceful deletion's end).
    fn finish_delete(&self, ctl: &PodCtl, uid: &str) {
        if ctl.lost.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.store.delete(
            &self.pods_rt,
            &ctl.ns,
            &ctl.name,
            &DeleteOpts {
                grace: Some(0),
                uid: Some(uid.to_string()),
                ..Default::default()
            },
        );
    }

    async fn run_instant(&self, ctl: &PodCtl) {
        let Some(pod) = self.pod(ctl) else { return };
        let msg = self
            .instant_message
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t = now();
        let term = |c: &Value, with_msg: bool| {
            let mut s =
                json!({"exitCode": 0, "reason": "Completed", "startedAt": t, "finishedAt": t});
            if with_msg && !msg.is_empty() {
                s["message"] = json!(msg);
            }
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0,
                   "started": false, "state": {"terminated": s}})
        };
        let init: Vec<Value> = pod["spec"]["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| term(c, false))
            .collect();
        let main: Vec<Value> = pod["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| term(c, true))
            .collect();
        self.write_status(ctl, |n| {
            let s = &mut n["status"];
            s["phase"] = json!("Succeeded");
            s["startTime"] = json!(t);
            s["hostIP"] = json!("127.0.0.1");
            s["podIP"] = json!("127.0.0.1");
            if !init.is_empty() {
                s["initContainerStatuses"] = json!(init);
            }
            s["containerStatuses"] = json!(main);
            set_condition(n, "Initialized", "True", "PodCompleted", "");
            set_condition(n, "Ready", "False", "PodCompleted", "");
            set_condition(n, "ContainersReady", "False", "PodCompleted", "");
        });
        loop {
            let p = self.pod(ctl);
            match self.check(ctl, p.as_ref()) {
                Some(Stop::Gone) => return,
                Some(Stop::Deleted(_)) => {
                    let uid = p
                        .as_ref()
                        .and_then(|p| p["metadata"]["uid"].as_str())
                        .unwrap_or("")
                        .to_string();
                    self.finish_delete(ctl, &uid);
                    return;
                }
                Some(Stop::Fault(Fault::LoseNode)) => return,
                _ => {}
            }
            // Its own events (deletion, a fault) wake it; the timer is only a backstop.
            self.pause(ctl, Duration::from_secs(60)).await;
        }
    }

    fn docker(&self) -> &Docker {
        self.docker.as_ref().expect("docker mode has a client")
    }

    /// Resolves a container's environment; Err = (reason, message) for its waiting state.
    fn env(&self, ns: &str, pod: &Value, c: &Value) -> Result<Vec<String>, (String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let secrets = self.store.type_named("secrets");
        let cms = self.store.type_named("configmaps");
        let fetch = |kind: &str, name: &str| -> Option<Value> {
            let rt = if kind == "Secret" {
                secrets.as_ref()?
            } else {
                cms.as_ref()?
            };
            self.store.get(rt, ns, name).ok()
        };
        let value_of = |kind: &str, obj: &Value, key: &str| -> Option<String> {
            if kind == "Secret" {
                obj["data"][key]
                    .as_str()
                    .map(|v| String::from_utf8_lossy(&b64(v)).into_owned())
            } else {
                obj["data"][key].as_str().map(String::from)
            }
        };
        let cfg_err = |m: String| ("CreateContainerConfigError".to_string(), m);
        for ef in c["envFrom"].as_array().cloned().unwrap_or_default() {
            let (kind, r) = if ef["secretRef"].is_object() {
                ("Secret", &ef["secretRef"])
            } else {
                ("ConfigMap", &ef["configMapRef"])
            };
            let name = r["name"].as_str().unwrap_or("");
            let prefix = ef["prefix"].as_str().unwrap_or("");
            match fetch(kind, name) {
                Some(obj) => {
                    for k in obj["data"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        if let Some(v) = value_of(kind, &obj, &k) {
                            out.push((format!("{prefix}{k}"), v));
                        }
                    }
                }
                None if r["optional"] == true => {}
                None => {
                    return Err(cfg_err(format!(
                        "{} \"{name}\" not found",
                        kind.to_lowercase()
                    )))
                }
            }
        }
        for e in c["env"].as_array().cloned().unwrap_or_default() {
            let k = e["name"].as_str().unwrap_or("").to_string();
            let v = if let Some(v) = e["value"].as_str() {
                Some(v.to_string())
            } else if e["valueFrom"].is_object() {
                let vf = &e["valueFrom"];
                if let Some((kind, r)) = [
                    ("Secret", &vf["secretKeyRef"]),
                    ("ConfigMap", &vf["configMapKeyRef"]),
                ]
                .into_iter()
                .find(|(_, r)| r.is_object())
                {
                    let name = r["name"].as_str().unwrap_or("");
                    let key = r["key"].as_str().unwrap_or("");
                    let optional = r["optional"] == true;
                    match fetch(kind, name) {
                        Some(obj) => match value_of(kind, &obj, key) {
                            Some(v) => Some(v),
                            None if optional => None,
                            None => {
                                return Err(cfg_err(format!(
                                    "couldn't find key {key} in {kind} {ns}/{name}"
                                )))
                            }
                        },
                        None if optional => None,
                        None => {
                            return Err(cfg_err(format!(
                                "{} \"{name}\" not found",
                                kind.to_lowercase()
                            )))
                        }
                    }
                } else {
                    vf["fieldRef"]["fieldPath"].as_str().map(|path| match path {
                        "metadata.name" => {
                            pod["metadata"]["name"].as_str().unwrap_or("").to_string()
                        }
                        "metadata.namespace" => ns.to_string(),
                        "metadata.uid" => pod["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                        "spec.nodeName" => NODE_NAME.to_string(),
                        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
                        _ => String::new(),
                    })
                }
            } else {
                Some(String::new())
            };
            if let Some(v) = v {
                out.retain(|(ok, _)| ok != &k);
                out.push((k, v));
            }
        }
        Ok(out.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
    }

    /// Host directories for the pod's volumes; Err = a mount that cannot be made yet.
    fn volumes(
        &self,
        ns: &str,
        pod: &Value,
        root: &Path,
    ) -> Result<HashMap<String, (PathBuf, bool)>, String> {
        let mut out = HashMap::new();
        for v in pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = v["name"].as_str().unwrap_or("").to_string();
            let dir = root.join("volumes").join(&name);
            if v["emptyDir"].is_object() {
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                set_mode(&dir, 0o777);
                out.insert(name, (dir, false));
            } else if let Some(p) = v["hostPath"]["path"].as_str() {
                if v["hostPath"]["type"] == "Socket" && !Path::new(p).exists() {
                    return Err(format!("MountVolume.SetUp failed for volume \"{name}\" : hostPath type check failed: {p} is not a socket file"));
                }
                out.insert(name, (PathBuf::from(p), false));
            } else if v["secret"].is_object() || v["configMap"].is_object() {
                let (kind, src, key) = if v["secret"].is_object() {
                    ("Secret", &v["secret"], "secretName")
                } else {
                    ("ConfigMap", &v["configMap"], "name")
                };
                let sname = src[key].as_str().unwrap_or("");
                let rt = self
                    .store
                    .type_named(if kind == "Secret" {
                        "secrets"
                    } else {
                        "configmaps"
                    })
                    .ok_or("no such kind")?;
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                match self.store.get(&rt, ns, sname) {
                    Ok(obj) => {
                        for (k, val) in obj["data"].as_object().cloned().unwrap_or_default() {
                            let bytes = if kind == "Secret" {
                                b64(val.as_str().unwrap_or(""))
                            } else {
                                val.as_str().unwrap_or("").as_bytes().to_vec()
                            };
                            let f = dir.join(&k);
                            std::fs::write(&f, bytes).map_err(|e| e.to_string())?;
                            set_mode(&f, 0o644);
                        }
                    }
                    Err(_) if src["optional"] == true => {}
                    Err(_) => {
                        return Err(format!(
                        "MountVolume.SetUp failed for volume \"{name}\" : {} \"{sname}\" not found",
                        kind.to_lowercase()
                    ))
                    }
                }
                out.insert(name, (dir, true));
            } else {
                return Err(format!("volume \"{name}\": only emptyDir, hostPath, secret and configMap volumes are simulated"));
            }
        }
        Ok(out)
    }

    /// Pulls an image if needed. Err = (reason, message).
    async fn ensure_image(&self, img: &str, policy: &str) -> Result<(), (String, String)> {
        if !valid_image(img) {
            return Err(("InvalidImageName".into(), format!("Failed to apply default image tag \"{img}\": couldn't parse image name \"{img}\": invalid reference format")));
        }
        let present = self.docker().inspect_image(img).await.is_ok();
        if present && policy != "Always" {
            return Ok(());
        }
        if policy == "Never" {
            return Err((
                "ErrImageNeverPull".into(),
                format!("Container image \"{img}\" is not present with pull policy of Never"),
            ));
        }
        let (repo, tag) = split_image(img);
        let opts = CreateImageOptions {
            from_image: Some(repo),
            tag: Some(tag),
            ..Default::default()
        };
        let mut s = self.docker().create_image(Some(opts), None, None);
        while let Some(r) = s.next().await {
            if let Err(e) = r {
                return Err((
                    "ErrImagePull".into(),
                    format!("Failed to pull image \"{img}\": {e}"),
                ));
            }
        }
        Ok(())
    }

    async fn run_docker(&self, ctl: &PodCtl, uid: &str) {
        let Some(pod) = self.pod(ctl) else { return };
        let root = self.dir.join(uid);
        let spec = pod["spec"].clone();
        let policy_of = |c: &Value| {
            c["imagePullPolicy"]
                .as_str()
                .unwrap_or("IfNotPresent")
                .to_string()
        };
        let mut init: Vec<Ctr> = Vec::new();
        let mut main: Vec<Ctr> = Vec::new();
        for (list, out) in [("initContainers", &mut init), ("containers", &mut main)] {
            for c in spec[list].as_array().cloned().unwrap_or_default() {
                let name = c["name"].as_str().unwrap_or("").to_string();
                out.push(Ctr {
                    image: c["image"].as_str().unwrap_or("").to_string(),
                    sidecar: list == "initContainers" && c["restartPolicy"] == "Always",
                    id: None,
                    state: if list == "initContainers" {
                        waiting("PodInitializing", "")
                    } else {
                        waiting("ContainerCreating", "")
                    },
                    oom: false,
                    term_file: root.join("term").join(&name),
                    fallback_to_logs: c["terminationMessagePolicy"] == "FallbackToLogsOnError",
                    ready: false,
                    name,
                });
            }
        }
        let start_time = now();
        let render = |init: &[Ctr], main: &[Ctr], phase: &str, reason: Option<(&str, &str)>| {
            let init_s: Vec<Value> = init.iter().map(Ctr::status).collect();
            let main_s: Vec<Value> = main.iter().map(Ctr::status).collect();
            let init_done = init.iter().all(|c| {
                if c.sidecar {
                    c.state.get("running").is_some() || c.exited()
                } else {
                    c.exited() && c.exit_code() == 0
                }
            });
            let all_ready = !main.is_empty() && main.iter().all(|c| c.ready);
            let terminal = phase == "Succeeded" || phase == "Failed";
            let not_ready: Vec<String> = main
                .iter()
                .filter(|c| !c.ready)
                .map(|c| c.name.clone())
                .collect();
            let phase = phase.to_string();
            let reason = reason.map(|(r, m)| (r.to_string(), m.to_string()));
            let start_time = start_time.clone();
            move |n: &mut Value| {
                let s = &mut n["status"];
                s["phase"] = json!(phase);
                s["startTime"] = json!(start_time);
                s["hostIP"] = json!("127.0.0.1");
                s["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
                s["podIP"] = json!("127.0.0.1");
                s["podIPs"] = json!([{"ip": "127.0.0.1"}]);
                if !init_s.is_empty() {
                    s["initContainerStatuses"] = json!(init_s);
                }
                s["containerStatuses"] = json!(main_s);
                if let Some((r, m)) = &reason {
                    s["reason"] = json!(r);
                    s["message"] = json!(m);
                }
                set_condition(
                    n,
                    "PodReadyToStartContainers",
                    if terminal { "False" } else { "True" },
                    "",
                    "",
                );
                if init_done {
                    set_condition(
                        n,
                        "Initialized",
                        "True",
                        if terminal { "PodCompleted" } else { "" },
                        "",
                    );
                } else {
                    set_condition(
                        n,
                        "Initialized",
                        "False",
                        "ContainersNotInitialized",
                        "containers with incomplete status: [init]",
                    );
                }
                let msg = format!("containers with unready status: [{}]", not_ready.join(" "));
                let (st, why, m) = if all_ready {
                    ("True", "", "")
                } else if terminal {
                    ("False", "PodCompleted", "")
                } else {
                    ("False", "ContainersNotReady", msg.as_str())
                };
                set_condition(n, "ContainersReady", st, why, m);
                set_condition(n, "Ready", st, why, m);
            }
        };
        self.write_status(ctl, render(&init, &main, "Pending", None));

        // Before any container starts: config, mounts, images, admission by the runtime.
        let env_and_mounts = loop {
            let p = self.pod(ctl);
            if let Some(stop) = self.check(ctl, p.as_ref()) {
                self.stop_pod(ctl, uid, stop, &mut init, &mut main, &render)
                    .await;
                return;
            }
            let mut problem: Option<(usize, bool, String, String)> = None;
            let all: Vec<(bool, usize, Value)> = spec["initContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, c)| (true, i, c))
                .chain(
                    spec["containers"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| (false, i, c)),
                )
                .collect();
            let mut envs = Vec::new();
            let vols = match self.volumes(&ctl.ns, &pod, &root) {
                Ok(v) => Some(v),
                Err(m) => {
                    problem = Some((0, false, "ContainerCreating".into(), m));
                    None
                }
            };
            if problem.is_none() {
                for (is_init, i, c) in &all {
                    if c["securityContext"]["privileged"] == true {
                        problem = Some((*i, *is_init, "CreateContainerError".into(),
                            "privileged containers cannot run on this simulated node (kubesim: runc refuses them here)".into()));
                        break;
                    }
                    if let Err((r, m)) = self
                        .ensure_image(c["image"].as_str().unwrap_or(""), &policy_of(c))
                        .await
                    {
                        problem = Some((*i, *is_init, r, m));
                        break;
                    }
                    match self.env(&ctl.ns, &pod, c) {
                        Ok(e) => envs.push(e),
                        Err((r, m)) => {
                            problem = Some((*i, *is_init, r, m));
                            break;
                        }
                    }
                }
            }
            match problem {
                None => break (envs, vols.unwrap_or_default()),
                Some((i, is_init, reason, msg)) => {
                    let list = if is_init { &mut init } else { &mut main };
                    if let Some(c) = list.get_mut(i) {
                        c.state = waiting(&reason, &msg);
                    }
                    self.write_status(ctl, render(&init, &main, "Pending", None));
                    if reason == "ErrImagePull" {
                        self.pause(ctl, Duration::from_millis(1000)).await;
                        let list = if is_init { &mut init } else { &mut main };
                        if let Some(c) = list.get_mut(i) {
                            // Since Kubernetes 1.32 the kubelet's back-off message repeats
                            // the last pull error (image_manager.go, prevPullErrMsg).
                            c.state = waiting(
                                "ImagePullBackOff",
                                &format!(
                                    "Back-off pulling image \"{}\": ErrImagePull: {msg}",
                                    c.image
                                ),
                            );
                        }
                        self.write_status(ctl, render(&init, &main, "Pending", None));
                        self.pause(ctl, Duration::from_millis(4000)).await;
                    } else {
                        self.pause(ctl, Duration::from_millis(1000)).await;
                    }
                }
            }
        };
        let (envs, vols) = env_and_mounts;
        let n_init = init.len();
        let containers: Vec<Value> = spec["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .chain(spec["containers"].as_array().cloned().unwrap_or_default())
            .collect();
        let _ = std::fs::create_dir_all(root.join("term"));
        // Init containers in order; native sidecars keep running.
        for i in 0..n_init {
            let c = &containers[i];
            match self
                .start_container(uid, &pod, c, &envs[i], &vols, &init[i].term_file)
                .await
            {
                Ok(id) => {
                    init[i].id = Some(id);
                    init[i].state = json!({"running": {"startedAt": now()}});
                    init[i].ready = init[i].sidecar;
                }
                Err(m) => {
                    init[i].state = waiting("CreateContainerError", &m);
                    self.write_status(ctl, render(&init, &main, "Pending", None));
                    self.wait_deleted(ctl, uid, &mut init, &mut main, &render)
                        .await;
                    return;
                }
            }
            self.write_status(ctl, render(&init, &main, "Pending", None));
            if init[i].sidecar {
                continue;
            }
            loop {
                let p = self.pod(ctl);
                if let Some(stop) = self.check(ctl, p.as_ref()) {
                    self.stop_pod(ctl, uid, stop, &mut init, &mut main, &render)
                        .await;
                    return;
                }
                if self.refresh(&mut init[i]).await {
                    break;
                }
                self.pause(ctl, Duration::from_millis(200)).await;
            }
            if init[i].exit_code() != 0 {
                self.kill_all(&mut init, &mut main, 0).await;
                self.write_status(ctl, render(&init, &main, "Failed", None));
                self.wait_deleted(ctl, uid, &mut init, &mut main, &render)
                    .await;
                return;
            }
        }
        for j in 0..main.len() {
            let c = &containers[n_init + j];
            match self
                .start_container(uid, &pod, c, &envs[n_init + j], &vols, &main[j].term_file)
                .await
            {
                Ok(id) => {
                    main[j].id = Some(id);
                    main[j].state = json!({"running": {"startedAt": now()}});
                    main[j].ready = true;
                }
                Err(m) => main[j].state = waiting("CreateContainerError", &m),
            }
        }
        if main.iter().all(|c| c.id.is_some()) {
            self.write_status(ctl, render(&init, &main, "Running", None));
        } else {
            self.write_status(ctl, render(&init, &main, "Pending", None));
        }
        // Running: until every main container ends, or something stops the pod.
        loop {
            let p = self.pod(ctl);
            if let Some(stop) = self.check(ctl, p.as_ref()) {
                match stop {
                    Stop::Fault(Fault::Oom) => {
                        if let Some(c) = main.iter_mut().find(|c| c.id.is_some() && !c.exited()) {
                            c.oom = true;
                            if let Some(id) = &c.id {
                                let _ = self
                                    .docker()
                                    .kill_container(
                                        id,
                                        Some(KillContainerOptions {
                                            signal: "SIGKILL".into(),
                                        }),
                                    )
                                    .await;
                            }
                        }
                        continue;
                    }
                    other => {
                        self.stop_pod(ctl, uid, other, &mut init, &mut main, &render)
                            .await;
                        return;
                    }
                }
            }
            let mut changed = false;
            for c in main.iter_mut().filter(|c| c.id.is_some() && !c.exited()) {
                changed |= self.refresh(c).await;
            }
            for c in init
                .iter_mut()
                .filter(|c| c.sidecar && c.id.is_some() && !c.exited())
            {
                changed |= self.refresh(c).await;
            }
            if main.iter().all(|c| c.exited() || c.id.is_none()) && main.iter().any(|c| c.exited())
            {
                break;
            }
            if changed {
                self.write_status(ctl, render(&init, &main, "Running", None));
            }
            self.pause(ctl, Duration::from_millis(200)).await;
        }
        // Main containers done: native sidecars are stopped, then the pod is terminal.
        let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
        for c in init.iter_mut().filter(|c| c.sidecar && !c.exited()) {
            self.stop_container(c, grace).await;
        }
        let phase = if main.iter().all(|c| c.exited() && c.exit_code() == 0) {
            "Succeeded"
        } else {
            "Failed"
        };
        self.write_status(ctl, render(&init, &main, phase, None));
        self.wait_deleted(ctl, uid, &mut init, &mut main, &render)
            .await;
    }

    /// After the pod is terminal (or stuck): waits for deletion, then removes its object.
    async fn wait_deleted<F, G>(
        &self,
        ctl: &PodCtl,
        uid: &str,
        init: &mut [Ctr],
        main: &mut [Ctr],
        render: &F,
    ) where
        F: Fn(&[Ctr], &[Ctr], &str, Option<(&str, &str)>) -> G,
        G: FnOnce(&mut Value),
    {
        loop {
            let p = self.pod(ctl);
            match self.check(ctl, p.as_ref()) {
                Some(Stop::Deadline) | Some(Stop::Fault(Fault::Oom)) | None => {}
                Some(stop) => {
                    self.stop_pod(ctl, uid, stop, init, main, render).await;
                    return;
                }
            }
            self.pause(ctl, Duration::from_secs(2)).await;
        }
    }

    /// Ends the pod for `stop` and, when it is being deleted, removes the object.
    async fn stop_pod<F, G>(
        &self,
        ctl: &PodCtl,
        uid: &str,
        stop: Stop,
        init: &mut [Ctr],
        main: &mut [Ctr],
        render: &F,
    ) where
        F: Fn(&[Ctr], &[Ctr], &str, Option<(&str, &str)>) -> G,
        G: FnOnce(&mut Value),
    {
        match stop {
            Stop::Gone => {
                self.remove_all(init, main).await;
            }
            Stop::Deleted(grace) => {
                let was_running = main.iter().any(|c| c.id.is_some() && !c.exited());
                self.kill_all(init, main, grace).await;
                if was_running {
                    let phase = if main.iter().all(|c| c.exited() && c.exit_code() == 0) {
                        "Succeeded"
                    } else {
                        "Failed"
                    };
                    self.write_status(ctl, render(init, main, phase, None));
                }
                self.remove_all(init, main).await;
                self.finish_delete(ctl, uid);
            }
            Stop::Fault(Fault::LoseNode) => {
                // The node is gone: nothing is reported any more; its containers are
                // cleaned up quietly so they do not outlive the test.
                self.remove_all(init, main).await;
                loop {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            }
            Stop::Fault(Fault::Evict) => {
                self.kill_all(init, main, 0).await;
                let msg = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 10Mi. ";
                let f = render(init, main, "Failed", Some(("Evicted", msg)));
                self.write_status(ctl, |n| {
                    f(n);
                    set_condition(n, "DisruptionTarget", "True", "TerminationByKubelet", msg);
                });
                Box::pin(self.wait_deleted(ctl, uid, init, main, render)).await;
            }
            Stop::Deadline => {
                let grace = self
                    .pod(ctl)
                    .and_then(|p| p["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30);
                self.kill_all(init, main, grace).await;
                self.write_status(
                    ctl,
                    render(
                        init,
                        main,
                        "Failed",
                        Some((
                            "DeadlineExceeded",
                            "Pod was active on the node longer than the specified deadline",
                        )),
                    ),
                );
                Box::pin(self.wait_deleted(ctl, uid, init, main, render)).await;
            }
            Stop::Fault(Fault::Oom) => {}
        }
    }

    async fn kill_all(&self, init: &mut [Ctr], main: &mut [Ctr], grace: i64) {
        let mut all: Vec<&mut Ctr> = main
            .iter_mut()
            .chain(init.iter_mut())
            .filter(|c| c.id.is_some() && !c.exited())
            .collect();
        let stops = all.iter().map(|c| {
            let id = c.id.clone().unwrap_or_default();
            async move {
                let _ = self
                    .docker()
                    .stop_container(
                        &id,
                        Some(StopContainerOptions {
                            t: Some(grace.clamp(0, 3600) as i32),
                            signal: None,
                        }),
                    )
                    .await;
            }
        });
        futures::future::join_all(stops).await;
        for c in all.iter_mut() {
            self.refresh(c).await;
        }
        for c in main
            .iter_mut()
            .chain(init.iter_mut())
            .filter(|c| c.id.is_none())
        {
            if c.state.get("waiting").is_some() {
                c.state = json!({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated", "startedAt": null, "finishedAt": now()}});
            }
        }
    }

    async fn stop_container(&self, c: &mut Ctr, grace: i64) {
        if let Some(id) = &c.id {
            let _ = self
                .docker()
                .stop_container(
                    id,
                    Some(StopContainerOptions {
                        t: Some(grace.clamp(0, 3600) as i32),
                        signal: None,
                    }),
                )
                .await;
        }
        self.refresh(c).await;
    }

    async fn remove_all(&self, init: &[Ctr], main: &[Ctr]) {
        for c in init.iter().chain(main.iter()) {
            if let Some(id) = &c.id {
                let _ = self
                    .docker()
                    .remove_container(
                        id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        }
    }

    /// Reads a container's state from dockerd; true when it just terminated.
    async fn refresh(&self, c: &mut Ctr) -> bool {
        let Some(id) = c.id.clone() else { return false };
        if c.exited() {
            return false;
        }
        let Ok(info) = self.docker().inspect_container(&id, None).await else {
            return false;
        };
        let Some(state) = info.state else {
            return false;
        };
        if state.running == Some(true) {
            return false;
        }
        let code = state.exit_code.unwrap_or(0);
        let oom = c.oom || state.oom_killed == Some(true);
        let reason = if oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let mut msg = std::fs::read(&c.term_file).unwrap_or_default();
        msg.truncate(4096);
        let mut message = String::from_utf8_lossy(&msg).into_owned();
        if message.is_empty() && c.fallback_to_logs && code != 0 {
            message = self.tail_log(&id, 80, 2048).await;
        }
        let started = c.state["running"]["startedAt"].clone();
        let mut t = json!({"exitCode": if oom { 137 } else { code }, "reason": reason, "startedAt": started,
                           "finishedAt": now(), "containerID": format!("docker://{id}")});
        if !message.is_empty() {
            t["message"] = json!(message);
        }
        c.state = json!({"terminated": t});
        c.ready = false;
        true
    }

    async fn tail_log(&self, id: &str, lines: usize, max: usize) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut s = self.docker().logs(id, Some(opts));
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = s.next().await {
            out.extend_from_slice(&chunk.into_bytes());
        }
        if out.len() > max {
            out = out.split_off(out.len() - max);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn start_container(
        &self,
        uid: &str,
        pod: &Value,
        c: &Value,
        env: &[String],
        vols: &HashMap<String, (PathBuf, bool)>,
        term_file: &Path,
    ) -> Result<String, String> {
        let name = c["name"].as_str().unwrap_or("");
        let _ = std::fs::write(term_file, b"");
        set_mode(term_file, 0o666);
        let mut binds = Vec::new();
        for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
            let vname = m["name"].as_str().unwrap_or("");
            let Some((host, ro)) = vols.get(vname) else {
                return Err(format!(
                    "volume mount \"{vname}\" names no volume of the pod"
                ));
            };
            let mut host = host.clone();
            if let Some(sp) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
                host = host.join(sp);
                let _ = std::fs::create_dir_all(&host);
            }
            let ro = *ro || m["readOnly"] == true;
            binds.push(format!(
                "{}:{}{}",
                host.display(),
                m["mountPath"].as_str().unwrap_or(""),
                if ro { ":ro" } else { "" }
            ));
        }
        let path = c["terminationMessagePath"]
            .as_str()
            .unwrap_or("/dev/termination-log");
        binds.push(format!("{}:{path}", term_file.display()));
        let psc = &pod["spec"]["securityContext"];
        let csc = &c["securityContext"];
        let user = csc["runAsUser"].as_i64().or(psc["runAsUser"].as_i64());
        let group = csc["runAsGroup"].as_i64().or(psc["runAsGroup"].as_i64());
        let user = match (user, group) {
            (Some(u), Some(g)) => Some(format!("{u}:{g}")),
            (Some(u), None) => Some(u.to_string()),
            _ => None,
        };
        let mut groups: Vec<String> = psc["supplementalGroups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|g| g.as_i64())
            .map(|g| g.to_string())
            .collect();
        if let Some(fs) = psc["fsGroup"].as_i64() {
            groups.push(fs.to_string());
        }
        let strings = |v: &Value| {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect::<Vec<_>>()
            })
        };
        let entrypoint = strings(&c["command"]);
        let mut cmd = strings(&c["args"]);
        if entrypoint.is_some() && cmd.is_none() {
            cmd = Some(vec![]);
        }
        let mut labels = HashMap::new();
        labels.insert("kubesim.sim".to_string(), self.sim_id.clone());
        labels.insert("kubesim.pod-uid".to_string(), uid.to_string());
        labels.insert("kubesim.container".to_string(), name.to_string());
        let body = bollard::models::ContainerCreateBody {
            image: c["image"].as_str().map(String::from),
            entrypoint,
            cmd,
            env: Some(env.to_vec()),
            user,
            working_dir: c["workingDir"].as_str().map(String::from),
            labels: Some(labels),
            tty: Some(false),
            host_config: Some(bollard::models::HostConfig {
                network_mode: Some("host".into()),
                binds: Some(binds),
                group_add: if groups.is_empty() {
                    None
                } else {
                    Some(groups)
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        let cname = format!(
            "kubesim-{}-{}-{}",
            self.sim_id,
            &uid[..uid.len().min(8)],
            name
        );
        let created = self
            .docker()
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(cname),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| e.to_string())?;
        self.docker()
            .start_container(&created.id, None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(created.id)
    }

    /// `pods/log`: a container's output from dockerd (follow streams until it ends).
    pub async fn logs(
        &self,
        pod: &Value,
        q: &HashMap<String, String>,
    ) -> Result<Response, ApiError> {
        let pname = pod["metadata"]["name"].as_str().unwrap_or("");
        let names = |l: &str| -> Vec<String> {
            pod["spec"][l]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        };
        let main = names("containers");
        let init = names("initContainers");
        let container = match q.get("container").filter(|s| !s.is_empty()) {
            Some(c) => c.clone(),
            None if main.len() == 1 => main[0].clone(),
            None => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {pname}, choose one of: [{}] or one of the init containers: [{}]",
                    main.join(" "), init.join(" ")
                )))
            }
        };
        if !main.contains(&container) && !init.contains(&container) {
            return Err(ApiError::bad_request(format!(
                "container {container} is not valid for pod {pname}"
            )));
        }
        let status = ["containerStatuses", "initContainerStatuses"]
            .iter()
            .flat_map(|l| pod["status"][l].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == container.as_str());
        let id = status
            .as_ref()
            .and_then(|s| s["containerID"].as_str())
            .and_then(|s| s.strip_prefix("docker://"))
            .map(String::from);
        let Some(id) = id else {
            if self.mode == KubeletMode::Instant && status.is_some() {
                return Ok(Response::new(Body::empty()));
            }
            let reason = status
                .as_ref()
                .and_then(|s| s["state"]["waiting"]["reason"].as_str())
                .unwrap_or("ContainerCreating")
                .to_string();
            return Err(ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{pname}\" is waiting to start: {reason}"
            )));
        };
        let follow = matches!(q.get("follow").map(String::as_str), Some("true" | "1"));
        let mut opts = LogsOptions {
            stdout: true,
            stderr: true,
            follow,
            timestamps: matches!(q.get("timestamps").map(String::as_str), Some("true")),
            ..Default::default()
        };
        opts.tail = q.get("tailLines").cloned().unwrap_or_else(|| "all".into());
        if let Some(s) = q.get("sinceSeconds").and_then(|s| s.parse::<i64>().ok()) {
            opts.since = (chrono::Utc::now().timestamp() - s) as i32;
        }
        let limit: Option<usize> = q.get("limitBytes").and_then(|s| s.parse().ok());
        let docker = self.docker().clone();
        if follow {
            let mut cut = self.log_cuts.subscribe();
            let stream = docker
                .logs(&id, Some(opts))
                .filter_map(|r| async move {
                    r.ok().map(|c| Ok::<Bytes, std::io::Error>(c.into_bytes()))
                })
                .take_until(async move {
                    let _ = cut.changed().await;
                });
            let stream: std::pin::Pin<
                Box<dyn futures::Stream<Item = Result<Bytes, std::io::Error>> + Send>,
            > = match limit {
                Some(max) => {
                    let mut sent = 0usize;
                    Box::pin(stream.take_while(move |r| {
                        let ok = sent < max;
                        if let Ok(b) = r {
                            sent += b.len();
                        }
                        futures::future::ready(ok)
                    }))
                }
                None => Box::pin(stream),
            };
            return Ok(Response::builder()
                .header("content-type", "text/plain")
                .body(Body::from_stream(stream))
                .unwrap_or_default());
        }
        // Streamed as dockerd reads it (the kubelet copies the log file to the response):
        // a log of any size is never held whole. A failure before the first byte is an
        // error; one later cuts the response short.
        let mut s = docker.logs(&id, Some(opts));
        let first = match s.next().await {
            None => Bytes::new(),
            Some(Ok(c)) => c.into_bytes(),
            Some(Err(e)) => {
                return Err(ApiError::new(
                    500,
                    "InternalError",
                    format!("reading the container log: {e}"),
                ))
            }
        };
        let rest = s.map(|r| r.map(|c| c.into_bytes()).map_err(std::io::Error::other));
        let stream = futures::stream::once(async move { Ok(first) })
            .chain(rest)
            .filter(|r| futures::future::ready(!matches!(r, Ok(c) if c.is_empty())))
            .scan(limit.unwrap_or(usize::MAX), |left, r| {
                let out = match r {
                    _ if *left == 0 => None,
                    Ok(mut c) => {
                        c.truncate(*left);
                        *left -= c.len();
                        Some(Ok(c))
                    }
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(out)
            });
        Ok(Response::builder()
            .header("content-type", "text/plain")
            .body(Body::from_stream(stream))
            .unwrap_or_default())
    }

    /// Removes every container this simulator made (blocking: runs from Drop).
    pub fn cleanup_blocking(&self) {
        if self.mode != KubeletMode::Docker {
            return;
        }
        let filter = format!("label=kubesim.sim={}", self.sim_id);
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let _ = std::process::Command::new("docker")
                    .arg("rm")
                    .arg("-f")
                    .args(&ids)
                    .output();
            }
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert!(valid_image("test/busybox:latest"));
        assert!(valid_image("127.0.0.1:5000/base/busybox:1"));
        assert!(!valid_image("Bad/Name"));
        assert!(!valid_image("a b"));
        assert_eq!(
            split_image("127.0.0.1:5000/x/y:2"),
            ("127.0.0.1:5000/x/y".into(), "2".into())
        );
        assert_eq!(
            split_image("127.0.0.1:5000/x/y"),
            ("127.0.0.1:5000/x/y".into(), "latest".into())
        );
    }
}
