//! The cluster an end-to-end scenario runs on, with buildshuttle's CRD applied and
//! `buildshuttle serve` in Kubernetes mode as a process against it. Either the simulator
//! the test owns (`Cluster::start`: kubesim in-process, the worker image made from the
//! freshly built binary, every fault knob) or the cluster the environment names
//! (`Cluster::external`: KUBECONFIG and the `BUILDSHUTTLE_E2E_*` variables below, a fresh
//! namespace per test, only what the Kubernetes API itself can do).
//!
//! External cluster settings (README.md, Kubernetes mode, Tests):
//! - `KUBECONFIG` (required): the cluster; the test applies the CRD and creates and deletes
//!   a namespace `bs-e2e-<random>` (`BUILDSHUTTLE_E2E_KEEP_NAMESPACE=1` keeps it).
//! - `BUILDSHUTTLE_E2E_IMAGE` (required): the worker image, pullable by the cluster's nodes.
//! - `BUILDSHUTTLE_E2E_REGISTRY` (required): where builds push (`gm_registry_host`), as the
//!   workers' dockerd reaches it; `BUILDSHUTTLE_E2E_REGISTRY_FROM_HOST` (default: the same):
//!   that registry as this machine reaches it (plain HTTP, or give `https://host:port`).
//! - `BUILDSHUTTLE_E2E_BASE_IMAGE` (default `busybox:latest`): the apps' `FROM` and the
//!   `docker://` source, pullable by the workers' dockerd.
//! - `BUILDSHUTTLE_E2E_S3_BUCKET`, `_S3_ACCESS_KEY`, `_S3_SECRET_KEY` (required),
//!   `_S3_REGION` (default us-east-1), `_S3_ENDPOINT` (as this machine reaches it; unset:
//!   AWS), `_S3_POD_ENDPOINT` (as pods reach it; default: `_S3_ENDPOINT`).
//! - `WORKER_DOCKER_MODE` (default dind) and whatever else the service reads from its
//!   environment (e.g. `WORKER_DOCKER_SOCKET_GID`, `DOCKER_BUILD_SETTINGS`,
//!   `WORKER_POD_OVERRIDES`): the serve processes inherit it.

use super::bin::{free_port, Proc, BIN};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The simulator's namespace (an external cluster gets a fresh one per test: `ns()`).
pub const NS: &str = "builds";
pub const S3: &[(&str, &str)] = &[
    ("S3_BUCKET", "buildshuttle-test"),
    ("S3_ACCESS_KEY", "buildshuttle-test"),
    ("S3_SECRET_KEY", "buildshuttle-test-secret"),
    ("S3_ENDPOINT", "http://127.0.0.1:9100"),
    ("S3_REGION", "us-east-1"),
];
/// The Secret (WORKER_ENV_SECRET) giving worker pods the S3 settings.
pub const WORKER_ENV: &str = "worker-env";

/// Each named scenario (an `async fn NAME(cluster: Cluster)` in the calling file's
/// `scenario` module) as two tests: `NAME` on the simulator and, ignored,
/// `real_cluster::NAME` on the cluster the environment names (`Cluster::external`).
#[macro_export]
macro_rules! scenarios {
    ($($name:ident),* $(,)? $(; skipped on a real cluster: $($skip:ident => $why:literal),* $(,)?)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                scenario::$name($crate::common::cluster::Cluster::start().await).await
            }
        )*
        /// The same scenarios on the cluster KUBECONFIG names (README.md, Kubernetes mode).
        mod real_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs a Kubernetes cluster: KUBECONFIG and BUILDSHUTTLE_E2E_* (README.md, Kubernetes mode, Tests)"]
                async fn $name() {
                    super::scenario::$name($crate::common::cluster::Cluster::external().await)
                        .await
                }
            )*
            $($(
                /// Simulator only: listed so a real-cluster run says what it left out.
                #[test]
                #[ignore = "needs a Kubernetes cluster: KUBECONFIG and BUILDSHUTTLE_E2E_* (README.md, Kubernetes mode, Tests)"]
                fn $skip() {
                    println!("real cluster: skipped {}: {}", stringify!($skip), $why);
                }
            )*)?
        }
    };
}

/// How worker pods reach dockerd on the simulator. On an external cluster the environment's
/// WORKER_DOCKER_MODE applies instead (host and external need a set-up only its owner knows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Host,
    External,
}

/// The simulator, when the cluster is one; its fault knobs through `Deref`. Scenarios that
/// also run on a real cluster ask `Cluster::sim()` instead.
pub struct SimHandle(Option<kubesim::Sim>);

impl std::ops::Deref for SimHandle {
    type Target = kubesim::Sim;
    fn deref(&self) -> &kubesim::Sim {
        self.0
            .as_ref()
            .expect("this scenario uses a simulator knob: it cannot run on an external cluster")
    }
}

/// What differs between the simulator and an external cluster.
struct Settings {
    ns: String,
    kubeconfig: String,
    /// None: the worker image made from this build (`worker_image()`).
    image: Option<String>,
    registry: String,
    registry_from_host: String,
    base_image: String,
    docker_source: String,
    /// S3 as the serve process (on this machine) reaches it.
    s3: Vec<(String, String)>,
    /// WORKER_DOCKER_MODE on an external cluster.
    worker_mode: Option<String>,
    /// Delete the namespace when the test ends (external clusters).
    cleanup: Option<kube::Config>,
}

pub struct Cluster {
    pub sim: SimHandle,
    pub client: kube::Client,
    pub data: tempfile::TempDir,
    settings: Settings,
}

/// kube's rustls needs one process-level crypto provider (ring and aws-lc-rs are both linked).
pub fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Applies `crds/buildjob.yaml` by server-side apply, as `kubectl apply --server-side` does.
pub async fn apply_crd(client: &kube::Client) {
    let crd: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/buildjob.yaml"))
            .expect("crds/buildjob.yaml"),
    )
    .expect("CRD YAML");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Tests that start at once may both create it: the loser's 409 (AlreadyExists) means
    // "apply again", as `kubectl apply` would be run again.
    let mut attempt = 0;
    loop {
        let applied = crds
            .patch(
                "buildjobs.buildshuttle.akkeris.io",
                &PatchParams::apply("kubectl").force(),
                &Patch::Apply(&crd),
            )
            .await;
        match applied {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("CRD applied: {e}"),
        }
    }
}

/// Waits until the API server serves the BuildJob resource (a real one takes a moment
/// after the CRD is first created).
async fn crd_established(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let crd = crds.get_opt("buildjobs.buildshuttle.akkeris.io").await;
        let established = crd.ok().flatten().and_then(|c| c.status).is_some_and(|st| {
            st.conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the BuildJob CRD never became Established"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    crypto();
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    kube::Client::try_from(cfg).expect("client")
}

/// An environment variable the external cluster needs.
fn need(k: &str) -> String {
    match std::env::var(k) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{k} must be set to run the scenarios on a real cluster (README.md, Kubernetes mode, Tests)"),
    }
}

fn opt(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// Creates the namespace and the workers' Secret (their S3 settings).
async fn namespace_and_secret(
    client: &kube::Client,
    ns: &str,
    labels: Value,
    s3: &[(String, String)],
) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    let env: serde_json::Map<String, Value> =
        s3.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": WORKER_ENV}, "stringData": env}))
                .unwrap(),
        )
        .await
        .expect("worker env secret");
}

impl Cluster {
    pub async fn start() -> Cluster {
        Self::start_with(kubesim::SimConfig::default()).await
    }

    /// Starts the simulator, applies `crds/buildjob.yaml` by server-side apply (as
    /// `kubectl apply --server-side` does), creates the namespace and the workers' Secret.
    pub async fn start_with(cfg: kubesim::SimConfig) -> Cluster {
        super::require_services();
        let sim = kubesim::Sim::start(cfg).await.expect("simulator starts");
        let client = client_for(sim.kubeconfig_path()).await;
        apply_crd(&client).await;
        let s3: Vec<(String, String)> = S3
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        namespace_and_secret(&client, NS, json!({}), &s3).await;
        Cluster {
            settings: Settings {
                ns: NS.into(),
                kubeconfig: sim.kubeconfig_path().display().to_string(),
                image: None,
                registry: super::REGISTRY.into(),
                registry_from_host: super::REGISTRY.into(),
                base_image: super::BASE_IMAGE.into(),
                docker_source: format!("{}/base/busybox:1", super::REGISTRY),
                s3,
                worker_mode: None,
                cleanup: None,
            },
            sim: SimHandle(Some(sim)),
            client,
            data: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The cluster KUBECONFIG names, set up by the `BUILDSHUTTLE_E2E_*` variables (module
    /// doc): applies the CRD, creates a fresh namespace (Pod Security `privileged`, as dind
    /// workers need) with the workers' Secret, and deletes the namespace when dropped.
    pub async fn external() -> Cluster {
        crypto();
        let kubeconfig = need("KUBECONFIG");
        let config = kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("KUBECONFIG={kubeconfig}: {e}"));
        let client = kube::Client::try_from(config.clone()).expect("client");
        apply_crd(&client).await;
        crd_established(&client).await;
        let ns = format!("bs-e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let registry = need("BUILDSHUTTLE_E2E_REGISTRY");
        let base_image =
            opt("BUILDSHUTTLE_E2E_BASE_IMAGE").unwrap_or_else(|| "busybox:latest".into());
        let region = opt("BUILDSHUTTLE_E2E_S3_REGION").unwrap_or_else(|| "us-east-1".into());
        let mut s3 = vec![
            ("S3_BUCKET".to_string(), need("BUILDSHUTTLE_E2E_S3_BUCKET")),
            (
                "S3_ACCESS_KEY".to_string(),
                need("BUILDSHUTTLE_E2E_S3_ACCESS_KEY"),
            ),
            (
                "S3_SECRET_KEY".to_string(),
                need("BUILDSHUTTLE_E2E_S3_SECRET_KEY"),
            ),
            ("S3_REGION".to_string(), region),
        ];
        let mut pod_s3 = s3.clone();
        let endpoint = opt("BUILDSHUTTLE_E2E_S3_ENDPOINT");
        if let Some(e) = &endpoint {
            s3.push(("S3_ENDPOINT".into(), e.clone()));
        }
        if let Some(e) = opt("BUILDSHUTTLE_E2E_S3_POD_ENDPOINT").or(endpoint) {
            pod_s3.push(("S3_ENDPOINT".into(), e));
        }
        namespace_and_secret(
            &client,
            &ns,
            json!({"pod-security.kubernetes.io/enforce": "privileged",
                   "app.kubernetes.io/created-by": "buildshuttle-e2e"}),
            &pod_s3,
        )
        .await;
        println!("real cluster: namespace {ns}");
        let keep = opt("BUILDSHUTTLE_E2E_KEEP_NAMESPACE").is_some_and(|v| v != "0");
        Cluster {
            settings: Settings {
                ns,
                kubeconfig,
                image: Some(need("BUILDSHUTTLE_E2E_IMAGE")),
                registry_from_host: opt("BUILDSHUTTLE_E2E_REGISTRY_FROM_HOST")
                    .unwrap_or_else(|| registry.clone()),
                registry,
                docker_source: base_image.clone(),
                base_image,
                s3,
                worker_mode: Some(opt("WORKER_DOCKER_MODE").unwrap_or_else(|| "dind".into())),
                cleanup: (!keep).then_some(config),
            },
            sim: SimHandle(None),
            client,
            data: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The simulator, or None on an external cluster (scenarios use knobs only through it).
    pub fn sim(&self) -> Option<&kubesim::Sim> {
        self.sim.0.as_ref()
    }

    /// Says, on an external cluster, what part of a scenario it leaves out and why.
    pub fn skip(&self, what: &str) {
        println!("real cluster: skipped {what}");
    }

    /// The namespace builds run in.
    pub fn ns(&self) -> &str {
        &self.settings.ns
    }

    pub fn kubeconfig(&self) -> String {
        self.settings.kubeconfig.clone()
    }

    /// The apps' base image (`FROM`), as the workers' dockerd pulls it.
    pub fn base_image(&self) -> &str {
        &self.settings.base_image
    }

    /// An image for a `docker://` source.
    pub fn docker_source(&self) -> String {
        format!("docker://{}", self.settings.docker_source)
    }

    /// Where builds push, as the workers reach it.
    pub fn registry(&self) -> &str {
        &self.settings.registry
    }

    /// A controller-api body (`common::body`) pushing to this cluster's registry.
    pub fn body(&self, sources: &str, cb: &super::Callbacks) -> Value {
        let mut b = super::body(sources, cb);
        b["gm_registry_host"] = json!(self.settings.registry);
        b
    }

    /// Tags of the build's image repository in the registry it pushed to.
    pub async fn tags(&self, b: &Value) -> Vec<String> {
        let host = &self.settings.registry_from_host;
        let base = if host.starts_with("http://") || host.starts_with("https://") {
            host.trim_end_matches('/').to_string()
        } else {
            format!("http://{host}")
        };
        let url = format!("{base}/v2/{}/tags/list", super::image_repo(b));
        super::tags_list(&url, None).await
    }

    /// kubectl: the suite's (`bash .ci/services` installs it), else the one on PATH.
    pub fn kubectl(&self) -> String {
        let tools = std::env::var("BUILDSHUTTLE_TOOLS")
            .unwrap_or_else(|_| "/opt/buildshuttle-tools".into());
        let p = format!("{tools}/bin/kubectl");
        if std::path::Path::new(&p).exists() {
            return p;
        }
        assert!(
            self.sim().is_none(),
            "{p} missing: run `bash .ci/services` (it installs kubectl)"
        );
        "kubectl".into()
    }

    pub fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    /// `buildshuttle serve` in Kubernetes mode against this cluster.
    pub fn serve(&self, mode: Mode, extra: &[(&str, &str)]) -> Proc {
        self.serve_as(&format!("shuttle-{}", free_port()), mode, extra)
    }

    /// Like `serve`, with this replica's identity (POD_NAME) given.
    pub fn serve_as(&self, identity: &str, mode: Mode, extra: &[(&str, &str)]) -> Proc {
        let image = self.settings.image.clone().unwrap_or_else(worker_image);
        let port = free_port();
        let data = self.data.path().join(identity);
        std::fs::create_dir_all(&data).expect("data dir");
        let kubeconfig = self.kubeconfig();
        let gid = socket_gid().to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("USE_KUBERNETES", "true"),
            ("KUBECONFIG", &kubeconfig),
            ("KUBERNETES_NAMESPACE", self.ns()),
            ("DOCKER_BUILD_IMAGE", &image),
            ("WORKER_ENV_SECRET", WORKER_ENV),
            ("POD_NAME", identity),
            ("LEASE_NAME", "buildshuttle-controller"),
            ("CALLBACK_RETRY_SECONDS", "20"),
            ("RUST_LOG", "info,buildshuttle=debug"),
        ];
        env.extend(
            self.settings
                .s3
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        match (&self.settings.worker_mode, mode) {
            (Some(m), _) => env.push(("WORKER_DOCKER_MODE", m)),
            (None, Mode::Host) => {
                env.push(("WORKER_DOCKER_MODE", "host"));
                env.push(("WORKER_DOCKER_SOCKET_GID", &gid));
            }
            (None, Mode::External) => {
                env.push(("WORKER_DOCKER_MODE", "external"));
                env.push((
                    "DOCKER_BUILD_SETTINGS",
                    r#"{"host":"http://127.0.0.1","port":"2375"}"#,
                ));
            }
        }
        env.extend_from_slice(extra);
        let log = std::fs::File::create(data.join("serve.log")).expect("log file");
        let log2 = log.try_clone().expect("log file");
        super::bin::spawn_with_output(&data, port, &env, Stdio::from(log), Stdio::from(log2))
    }

    /// The serve process's log (for assertion messages).
    pub fn serve_log(&self, identity_dir: &str) -> String {
        std::fs::read_to_string(self.data.path().join(identity_dir).join("serve.log"))
            .unwrap_or_default()
    }

    /// GETs a raw API path (JSON) with the test's client.
    pub async fn get(&self, path: &str) -> Value {
        let req = http::Request::get(path).body(Vec::new()).expect("request");
        self.client
            .request::<Value>(req)
            .await
            .unwrap_or(Value::Null)
    }

    /// The S3 endpoint the service is given, when the suite runs one (the simulator's).
    pub fn s3_endpoint(&self) -> Option<&str> {
        self.settings
            .s3
            .iter()
            .find(|(k, _)| k == "S3_ENDPOINT")
            .map(|(_, v)| v.as_str())
    }

    /// The BuildJob of a controller-api body.
    pub async fn job(&self, b: &Value) -> Value {
        let name = job_name(b);
        self.get(&format!(
            "/apis/buildshuttle.akkeris.io/v1/namespaces/{}/buildjobs/{name}",
            self.ns()
        ))
        .await
    }

    pub async fn pods(&self) -> Vec<Value> {
        self.get(&format!("/api/v1/namespaces/{}/pods", self.ns()))
            .await["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `f` holds for the BuildJob (returns it).
    pub async fn wait_job(
        &self,
        b: &Value,
        what: &str,
        within: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let j = self.job(b).await;
            if f(&j) {
                return j;
            }
            assert!(
                start.elapsed() < within,
                "BuildJob never became {what}: {j:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    /// An external cluster's namespace goes with the test (its BuildJobs, pods and Secrets
    /// with it). A thread of its own: the test's runtime may be the one unwinding.
    fn drop(&mut self) {
        let Some(config) = self.settings.cleanup.take() else {
            return;
        };
        let ns = self.settings.ns.clone();
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let client = kube::Client::try_from(config).ok()?;
                // The controller is gone with the test: nobody would remove the BuildJobs'
                // final-callback finalizer, and the namespace would stay Terminating.
                let jobs: Api<kube::api::DynamicObject> =
                    Api::namespaced_with(client.clone(), &ns, &buildjob_resource());
                for j in jobs.list(&Default::default()).await.ok()?.items {
                    let name = j.metadata.name.unwrap_or_default();
                    let none = Patch::Merge(json!({"metadata": {"finalizers": null}}));
                    let _ = jobs.patch(&name, &PatchParams::default(), &none).await;
                }
                let namespaces: Api<Namespace> = Api::all(client);
                namespaces.delete(&ns, &DeleteParams::default()).await.ok()
            })
        })
        .join()
        .ok()
        .flatten();
        if deleted.is_none() {
            eprintln!(
                "real cluster: could not delete namespace {}: delete it by hand",
                self.settings.ns
            );
        }
    }
}

/// The kubesim binary (`tests/kubesim/src/main.rs`) as a process of its own, the way a user
/// runs it by hand: the external-cluster code path, exercised without a real cluster.
pub struct KubesimProcess {
    child: std::process::Child,
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// The kubesim binary beside buildshuttle's (`cargo nextest run --workspace` builds it),
/// built here when it is missing or older than its sources.
fn kubesim_binary() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("kubesim");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kubesim");
    let newest_source = std::fs::read_dir(src.join("src"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain([src.join("Cargo.toml")])
        .filter_map(|p| modified(&p))
        .max();
    if modified(&bin).is_none() || modified(&bin) < newest_source {
        eprintln!("building the kubesim binary (cargo nextest run --workspace builds it too)");
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "kubesim", "--bin", "kubesim"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cargo build -p kubesim failed");
    }
    bin
}

impl KubesimProcess {
    /// Starts `kubesim --port 0 --kubeconfig …` and waits for it to say where it listens.
    pub fn start() -> KubesimProcess {
        use std::io::BufRead;
        super::require_services();
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        let mut child = Command::new(kubesim_binary())
            .args(["--port", "0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kubesim starts");
        let stdout = child.stdout.take().expect("kubesim stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        // It prints `export KUBECONFIG=…` once it serves (or exits on an error).
        let ready = lines.any(|l| l.is_ok_and(|l| l.starts_with("export KUBECONFIG=")));
        assert!(ready, "kubesim did not start (its error is above)");
        KubesimProcess {
            child,
            kubeconfig,
            _dir: dir,
        }
    }

    /// The environment a user sets for the real-cluster scenarios, pointing at this
    /// simulator and the suite's services: the worker image made from this build, the
    /// loopback registry, s3s-fs, worker pods on the node's Docker socket.
    pub fn e2e_env(&self) -> Vec<(String, String)> {
        let s3 = |k: &str| {
            S3.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        vec![
            ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
            ("BUILDSHUTTLE_E2E_IMAGE".into(), worker_image()),
            ("BUILDSHUTTLE_E2E_REGISTRY".into(), super::REGISTRY.into()),
            (
                "BUILDSHUTTLE_E2E_BASE_IMAGE".into(),
                format!("{}/base/busybox:1", super::REGISTRY),
            ),
            ("BUILDSHUTTLE_E2E_S3_BUCKET".into(), s3("S3_BUCKET")),
            ("BUILDSHUTTLE_E2E_S3_ACCESS_KEY".into(), s3("S3_ACCESS_KEY")),
            ("BUILDSHUTTLE_E2E_S3_SECRET_KEY".into(), s3("S3_SECRET_KEY")),
            ("BUILDSHUTTLE_E2E_S3_ENDPOINT".into(), s3("S3_ENDPOINT")),
            ("BUILDSHUTTLE_E2E_S3_REGION".into(), s3("S3_REGION")),
            ("WORKER_DOCKER_MODE".into(), "host".into()),
            ("WORKER_DOCKER_SOCKET_GID".into(), socket_gid().to_string()),
        ]
    }

    /// Runs the named ignored tests of this test binary (e.g. `real_cluster::x`) in a child
    /// process with `e2e_env()`, as `cargo nextest run --run-ignored only` would on a real
    /// cluster, and asserts that each ran and passed.
    pub fn run_ignored(&self, names: &[&str]) {
        let out_dir = tempfile::tempdir().expect("tempdir");
        let out_path = out_dir.path().join("output");
        let out = std::fs::File::create(&out_path).expect("output file");
        let err = out.try_clone().expect("output file");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--ignored", "--exact", "--nocapture", "--test-threads", "2"])
            .args(names)
            .env_remove("BUILDSHUTTLE_E2E_REGISTRY_FROM_HOST")
            .env_remove("BUILDSHUTTLE_E2E_S3_POD_ENDPOINT")
            .env_remove("BUILDSHUTTLE_E2E_KEEP_NAMESPACE")
            .env_remove("DOCKER_BUILD_SETTINGS")
            .envs(self.e2e_env())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("test binary runs");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(600) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        println!("{output}");
        let summary = format!("test result: ok. {} passed; 0 failed", names.len());
        assert!(
            status.is_some_and(|s| s.success()) && output.contains(&summary),
            "the real-cluster scenarios {names:?} against the kubesim binary ({status:?}):\n{output}"
        );
        // Each made a namespace of its own (`assert_namespaces_deleted` checks they went).
        assert_eq!(
            output.matches("real cluster: namespace bs-e2e-").count(),
            names.len(),
            "{output}"
        );
    }

    /// Asserts that every namespace the external-cluster scenarios created is gone
    /// (deleted when each test's `Cluster` was dropped, not stuck Terminating).
    pub async fn assert_namespaces_deleted(&self) {
        let client = client_for(&self.kubeconfig).await;
        let namespaces: Api<Namespace> = Api::all(client);
        let params = kube::api::ListParams::default()
            .labels("app.kubernetes.io/created-by=buildshuttle-e2e");
        let start = Instant::now();
        loop {
            let list = namespaces.list(&params).await.expect("list namespaces");
            let left: Vec<_> = list
                .items
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "namespaces left behind: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for KubesimProcess {
    /// Ctrl-C, as a user stops it: it removes its pods' containers before it exits.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The BuildJob custom resource, for `Api::namespaced_with`.
pub fn buildjob_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "buildshuttle.akkeris.io".into(),
        version: "v1".into(),
        api_version: "buildshuttle.akkeris.io/v1".into(),
        kind: "BuildJob".into(),
        plural: "buildjobs".into(),
    }
}

/// The BuildJob name the facade derives (one GET by label finds it regardless).
pub fn job_name(b: &Value) -> String {
    format!(
        "{}-{}-{}",
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap(),
        b["build_number"]
    )
}

pub fn socket_gid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/var/run/docker.sock")
        .map(|m| m.gid())
        .unwrap_or(0)
}

fn hash_file(p: &Path) -> String {
    use std::hash::Hasher;
    let bytes = std::fs::read(p).expect("binary readable");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&bytes);
    format!("{:016x}", h.finish())
}

/// The worker image: the test build of the binary, its shared libraries, the CA bundle and
/// busybox, imported as `kubesim/buildshuttle-worker:{hash of the binary}` with the real
/// image's user, entrypoint and environment. Made once per binary.
pub fn worker_image() -> String {
    let tag = format!("kubesim/buildshuttle-worker:{}", hash_file(Path::new(BIN)));
    let exists = |t: &str| {
        Command::new("docker")
            .args(["image", "inspect", t])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if exists(&tag) {
        return tag;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let copy = |src: &Path, dest_rel: &str| {
        let dest = r.join(dest_rel.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(src, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    };
    copy(Path::new(BIN), "/usr/local/bin/buildshuttle");
    let ldd = Command::new("ldd").arg(BIN).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|s| s.starts_with('/'));
        if let Some(p) = path {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
            copy(&real, p);
        }
    }
    copy(
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        "/etc/ssl/certs/ca-certificates.crt",
    );
    copy(Path::new("/bin/busybox"), "/bin/busybox");
    for a in ["sh", "ls", "cat", "env", "sleep", "echo", "id"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(a)).unwrap();
    }
    for d in ["tmp", "var/lib/buildshuttle", "work"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.join(d), std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbuildshuttle:x:10001:10001::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\nbuildshuttle:x:10001:\n").unwrap();
    let mut tar = Command::new("tar")
        .args(["-C", &r.display().to_string(), "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let out = Command::new("docker")
        .args([
            "import",
            "--change",
            "USER 10001:10001",
            "--change",
            r#"ENTRYPOINT ["/usr/local/bin/buildshuttle"]"#,
            "--change",
            "ENV PATH=/usr/local/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt DATA_DIR=/var/lib/buildshuttle",
            "-",
            &tag,
        ])
        .stdin(tar.stdout.take().expect("tar stdout"))
        .output()
        .expect("docker import");
    let _ = tar.wait();
    assert!(
        out.status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tag
}
