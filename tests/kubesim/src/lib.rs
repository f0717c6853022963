//! kubesim: a simulated Kubernetes cluster for end-to-end tests. An API server (HTTPS,
//! JSON only) that follows the real kube-apiserver's documented semantics for the
//! resources buildshuttle uses, and a kubelet that runs pods on the local dockerd (or
//! completes them at once). Fault and admission knobs are on the library API and on
//! `/sim/...` admin routes. See the README section "Simulated cluster" for what it does
//! not model.

pub mod api;
pub mod error;
pub mod fields;
pub mod kubelet;
pub mod prune;
pub mod select;
pub mod store;
mod table;
mod tls;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use store::Store;

pub use error::ApiError;
pub use kubelet::KubeletMode;

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot make the self-signed certificate: {0}")]
    Cert(String),
    #[error("cannot write the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach dockerd for the kubelet (is `bash .ci/services` running?): {0}")]
    Docker(String),
}

/// How a simulator starts.
#[derive(Clone)]
pub struct SimConfig {
    /// 0: any free port.
    pub port: u16,
    /// Serve HTTPS with a self-signed certificate (its CA goes into the kubeconfig).
    pub tls: bool,
    pub kubelet: KubeletMode,
    /// Where to write the kubeconfig (default: a file in the simulator's temp dir).
    pub kubeconfig: Option<PathBuf>,
    /// Events kept for watch resume; older resourceVersions get 410 Gone.
    pub history_limit: usize,
    /// Seconds between watch bookmarks (when the client allows them).
    pub bookmark_seconds: u64,
    /// Namespaces created at start.
    pub namespaces: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            port: 0,
            tls: true,
            kubelet: KubeletMode::Docker,
            kubeconfig: None,
            history_limit: 100_000,
            bookmark_seconds: 5,
            namespaces: vec!["default".into()],
        }
    }
}

/// Which calls a fault applies to: verb (`get`, `list`, `watch`, `create`, `update`,
/// `patch`, `delete`), resource plural, and optionally the name and subresource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Matcher {
    pub verb: String,
    pub resource: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub subresource: Option<String>,
}

impl Matcher {
    pub fn new(verb: &str, resource: &str) -> Matcher {
        Matcher {
            verb: verb.into(),
            resource: resource.into(),
            name: None,
            subresource: None,
        }
    }
    pub fn name(mut self, n: &str) -> Matcher {
        self.name = Some(n.into());
        self
    }
    pub fn subresource(mut self, s: &str) -> Matcher {
        self.subresource = Some(s.into());
        self
    }
    fn matches(&self, verb: &str, resource: &str, name: &str, sub: &str) -> bool {
        self.verb == verb
            && self.resource == resource
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.subresource.as_deref().unwrap_or("") == sub
    }
}

/// One error answered instead of the next matching call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Injection {
    #[serde(flatten)]
    pub matcher: Matcher,
    pub code: u16,
    pub reason: String,
    #[serde(default)]
    pub message: Option<String>,
}

/// The knobs, shared by the library API and the admin routes.
#[derive(Default)]
pub struct Knobs {
    pub watch_delay: AtomicBool,
    pub refuse_privileged: AtomicBool,
    pub unschedulable: AtomicBool,
    injections: Mutex<Vec<Injection>>,
    blackholes: Mutex<Vec<Matcher>>,
    /// One call each to hold until the black holes are cleared (`Sim::swallow_once`).
    swallow: Mutex<Vec<Matcher>>,
    /// How many times the black holes were cleared: what a swallowed call waits for.
    clears: std::sync::atomic::AtomicU64,
    release: tokio::sync::Notify,
}

/// Requests served, per (verb, resource[/subresource]).
pub type Counters = BTreeMap<String, u64>;

pub struct Shared {
    pub store: Arc<Store>,
    pub knobs: Knobs,
    pub token: String,
    pub kubelet: Arc<kubelet::Kubelet>,
    pub bookmark_seconds: u64,
    counters: Mutex<Counters>,
    pub addr: Mutex<Option<SocketAddr>>,
}

impl Shared {
    fn count(&self, verb: &str, resource: &str) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(format!("{verb} {resource}")).or_insert(0) += 1;
    }

    fn take_injection(
        &self,
        verb: &str,
        resource: &str,
        name: &str,
        sub: &str,
    ) -> Option<Injection> {
        let mut inj = self
            .knobs
            .injections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let i = inj
            .iter()
            .position(|i| i.matcher.matches(verb, resource, name, sub))?;
        Some(inj.remove(i))
    }

    /// Waits while a black hole matches this call, or until the black holes are cleared
    /// when this call is the one a `swallow_once` matcher was waiting for.
    async fn black_hole(&self, verb: &str, resource: &str, name: &str, sub: &str) {
        // Taken, and the clears counted, under one lock: a clear cannot fall between.
        let swallowed = {
            let mut once = self.knobs.swallow.lock().unwrap_or_else(|e| e.into_inner());
            let at = once
                .iter()
                .position(|m| m.matches(verb, resource, name, sub));
            at.map(|i| (once.remove(i), self.knobs.clears.load(Ordering::SeqCst)))
        };
        if let Some((_, cleared)) = swallowed {
            loop {
                let released = self.knobs.release.notified();
                if self.knobs.clears.load(Ordering::SeqCst) != cleared {
                    return;
                }
                released.await;
            }
        }
        loop {
            let released = self.knobs.release.notified();
            let held = self
                .knobs
                .blackholes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|m| m.matches(verb, resource, name, sub));
            if !held {
                return;
            }
            released.await;
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn reset_counters(&self) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn inject(&self, i: Injection) {
        self.knobs
            .injections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(i);
    }

    pub fn black_hole_add(&self, m: Matcher) {
        self.knobs
            .blackholes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m);
    }

    pub fn swallow_once(&self, m: Matcher) {
        self.knobs
            .swallow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m);
    }

    pub fn black_hole_clear(&self) {
        self.knobs
            .blackholes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let mut once = self.knobs.swallow.lock().unwrap_or_else(|e| e.into_inner());
        once.clear();
        self.knobs.clears.fetch_add(1, Ordering::SeqCst);
        drop(once);
        self.knobs.release.notify_waiters();
    }
}

/// A running simulated cluster. Dropping it stops the server and removes the kubelet's
/// containers.
pub struct Sim {
    pub shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sim {
    pub async fn start(cfg: SimConfig) -> Result<Sim, SimError> {
        let dir = tempfile::Builder::new()
            .prefix("kubesim-")
            .tempdir()
            .map_err(|e| SimError::Kubeconfig {
                path: std::env::temp_dir(),
                source: e,
            })?;
        let (store, gc_rx) = Store::new(cfg.history_limit);
        let sim_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let kubelet = kubelet::Kubelet::new(
            store.clone(),
            cfg.kubelet.clone(),
            sim_id,
            dir.path().join("pods"),
        )
        .map_err(SimError::Docker)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let shared = Arc::new(Shared {
            store: store.clone(),
            knobs: Knobs::default(),
            token: token.clone(),
            kubelet: kubelet.clone(),
            bookmark_seconds: cfg.bookmark_seconds,
            counters: Mutex::new(Counters::new()),
            addr: Mutex::new(None),
        });
        for ns in &cfg.namespaces {
            let _ = shared.create_namespace(ns);
        }
        let _ = store.create(
            &store.type_named("nodes").expect("nodes are built in"),
            "",
            serde_json::json!({"metadata": {"name": store::NODE_NAME, "labels": {"kubernetes.io/hostname": store::NODE_NAME}},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
                           "nodeInfo": {"kubeletVersion": "v1.33.0-kubesim"}}}),
            store::How::Update {
                manager: "kubelet".into(),
            },
        );
        let bind = format!("127.0.0.1:{}", cfg.port);
        let listener =
            tokio::net::TcpListener::bind(&bind)
                .await
                .map_err(|e| SimError::Listen {
                    addr: bind.clone(),
                    source: e,
                })?;
        let addr = listener.local_addr().map_err(|e| SimError::Listen {
            addr: bind,
            source: e,
        })?;
        *shared.addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        let router = api::router(shared.clone());
        let mut tasks = Vec::new();
        let ca = if cfg.tls {
            let (acceptor, ca_pem) = tls::acceptor().map_err(SimError::Cert)?;
            tasks.push(tokio::spawn(tls::serve(listener, acceptor, router)));
            Some(ca_pem)
        } else {
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            }));
            None
        };
        tasks.push(tokio::spawn(store.clone().run_gc(gc_rx)));
        tasks.push(tokio::spawn(kubelet.clone().run(shared.clone())));
        let kubeconfig = cfg
            .kubeconfig
            .clone()
            .unwrap_or_else(|| dir.path().join("kubeconfig"));
        write_kubeconfig(&kubeconfig, addr, ca.as_deref(), &token)?;
        Ok(Sim {
            shared,
            addr,
            kubeconfig,
            _dir: dir,
            tasks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    pub fn set_watch_delay(&self, on: bool) {
        self.shared.knobs.watch_delay.store(on, Ordering::SeqCst);
    }

    pub fn set_refuse_privileged(&self, on: bool) {
        self.shared
            .knobs
            .refuse_privileged
            .store(on, Ordering::SeqCst);
    }

    pub fn set_unschedulable(&self, on: bool) {
        self.shared.knobs.unschedulable.store(on, Ordering::SeqCst);
    }

    pub fn inject(&self, matcher: Matcher, code: u16, reason: &str) {
        self.shared.inject(Injection {
            matcher,
            code,
            reason: reason.into(),
            message: None,
        });
    }

    pub fn black_hole(&self, matcher: Matcher) {
        self.shared.black_hole_add(matcher);
    }

    /// The next call `matcher` matches gets no answer until `clear_black_holes` (later ones
    /// are served): a request whose connection died silently, as when an API server behind
    /// a load balancer goes away mid-request.
    pub fn swallow_once(&self, matcher: Matcher) {
        self.shared.swallow_once(matcher);
    }

    pub fn clear_black_holes(&self) {
        self.shared.black_hole_clear();
    }

    /// API requests served so far, keyed `"{verb} {resource}"` (e.g. `"watch pods"`).
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    pub fn reset_counters(&self) {
        self.shared.reset_counters();
    }

    /// Drops the watch history: resuming from any earlier resourceVersion gets 410.
    pub fn compact(&self) {
        self.shared.store.compact();
    }

    pub async fn evict(&self, ns: &str, pod: &str) -> Result<(), ApiError> {
        self.shared
            .kubelet
            .fault(ns, pod, kubelet::Fault::Evict)
            .await
    }

    pub async fn oom_kill(&self, ns: &str, pod: &str) -> Result<(), ApiError> {
        self.shared
            .kubelet
            .fault(ns, pod, kubelet::Fault::Oom)
            .await
    }

    pub async fn lose_node(&self, ns: &str, pod: &str) -> Result<(), ApiError> {
        self.shared
            .kubelet
            .fault(ns, pod, kubelet::Fault::LoseNode)
            .await
    }

    /// Ends every open `pods/log?follow=true` stream while the containers run on (an API
    /// server restart does that to every streaming request).
    pub fn cut_log_streams(&self) {
        self.shared.kubelet.cut_log_streams();
    }

    /// The instant kubelet's termination message for worker containers.
    pub fn set_instant_message(&self, msg: &str) {
        self.shared.kubelet.set_instant_message(msg);
    }
}

impl Shared {
    pub fn create_namespace(&self, ns: &str) -> Result<serde_json::Value, ApiError> {
        let rt = self
            .store
            .type_named("namespaces")
            .ok_or_else(|| ApiError::not_found("", "namespaces", ns))?;
        self.store.create(
            &rt,
            "",
            serde_json::json!({"metadata": {"name": ns}}),
            store::How::Update {
                manager: "kubesim".into(),
            },
        )
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.kubelet.cleanup_blocking();
    }
}

fn write_kubeconfig(
    path: &Path,
    addr: SocketAddr,
    ca_pem: Option<&str>,
    token: &str,
) -> Result<(), SimError> {
    use base64::Engine;
    let cluster = match ca_pem {
        Some(ca) => serde_json::json!({
            "server": format!("https://{addr}"),
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca),
        }),
        None => serde_json::json!({ "server": format!("http://{addr}") }),
    };
    let cfg = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubesim", "preferences": {},
        "clusters": [{"name": "kubesim", "cluster": cluster}],
        "users": [{"name": "kubesim", "user": {"token": token}}],
        "contexts": [{"name": "kubesim", "context": {"cluster": "kubesim", "user": "kubesim", "namespace": "default"}}],
    });
    let text = serde_yaml::to_string(&cfg).unwrap_or_default();
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(path, text).map_err(|e| SimError::Kubeconfig {
        path: path.to_path_buf(),
        source: e,
    })
}
