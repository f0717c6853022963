//! A simulated cluster (kubesim) with buildshuttle's CRD applied, the worker image made from
//! the freshly built binary, and `buildshuttle serve` in Kubernetes mode as a process.

use super::bin::{free_port, Proc, BIN};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// How worker pods reach dockerd.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Host,
    External,
}

pub struct Cluster {
    pub sim: kubesim::Sim,
    pub client: kube::Client,
    pub data: tempfile::TempDir,
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
    crds.patch(
        "buildjobs.buildshuttle.akkeris.io",
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applied");
}

pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    crypto();
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    kube::Client::try_from(cfg).expect("client")
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
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
            )
            .await
            .expect("namespace");
        let env: serde_json::Map<String, Value> =
            S3.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": WORKER_ENV}, "stringData": env}),
                )
                .unwrap(),
            )
            .await
            .expect("worker env secret");
        Cluster {
            sim,
            client,
            data: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn kubeconfig(&self) -> String {
        self.sim.kubeconfig_path().display().to_string()
    }

    /// `buildshuttle serve` in Kubernetes mode against this cluster.
    pub fn serve(&self, mode: Mode, extra: &[(&str, &str)]) -> Proc {
        self.serve_as(&format!("shuttle-{}", free_port()), mode, extra)
    }

    /// Like `serve`, with this replica's identity (POD_NAME) given.
    pub fn serve_as(&self, identity: &str, mode: Mode, extra: &[(&str, &str)]) -> Proc {
        let image = worker_image();
        let port = free_port();
        let data = self.data.path().join(identity);
        std::fs::create_dir_all(&data).expect("data dir");
        let kubeconfig = self.kubeconfig();
        let gid = socket_gid().to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("USE_KUBERNETES", "true"),
            ("KUBECONFIG", &kubeconfig),
            ("KUBERNETES_NAMESPACE", NS),
            ("DOCKER_BUILD_IMAGE", &image),
            ("WORKER_ENV_SECRET", WORKER_ENV),
            ("POD_NAME", identity),
            ("LEASE_NAME", "buildshuttle-controller"),
            ("CALLBACK_RETRY_SECONDS", "20"),
            ("RUST_LOG", "info,buildshuttle=debug"),
        ];
        env.extend_from_slice(S3);
        match mode {
            Mode::Host => {
                env.push(("WORKER_DOCKER_MODE", "host"));
                env.push(("WORKER_DOCKER_SOCKET_GID", &gid));
            }
            Mode::External => {
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

    /// The BuildJob of a controller-api body.
    pub async fn job(&self, b: &Value) -> Value {
        let name = job_name(b);
        self.get(&format!(
            "/apis/buildshuttle.akkeris.io/v1/namespaces/{NS}/buildjobs/{name}"
        ))
        .await
    }

    pub async fn pods(&self) -> Vec<Value> {
        self.get(&format!("/api/v1/namespaces/{NS}/pods")).await["items"]
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
