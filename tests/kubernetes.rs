//! Kubernetes mode as a process: without shared storage, a cluster or with a bad setting it
//! refuses to start (one line naming the setting, exit 2); `crd` prints the committed CRD;
//! and, `#[ignore]`d, an end-to-end run against a real cluster (KUBECONFIG set; see
//! README.md, Kubernetes mode).

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_buildshuttle");

/// The test set-up's S3 server (`bash .ci/services`); only its settings are checked here.
const S3: [(&str, &str); 4] = [
    ("S3_BUCKET", "buildshuttle-test"),
    ("S3_ENDPOINT", "http://127.0.0.1:9100"),
    ("S3_ACCESS_KEY", "buildshuttle-test"),
    ("S3_SECRET_KEY", "buildshuttle-test-secret"),
];

/// `buildshuttle serve` in Kubernetes mode with only `env` (and no reachable cluster).
fn serve_kubernetes(env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("DATA_DIR", dir.path())
        .env("USE_KUBERNETES", "true")
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env("HOME", dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run")
}

/// Exit 2 with exactly one line on stderr, which is returned.
fn one_line_start_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"));
    lines[0].to_string()
}

#[test]
fn kubernetes_mode_without_a_cluster_is_a_one_line_start_error() {
    // Storage is set, so what fails is the missing cluster.
    let line = one_line_start_error(&serve_kubernetes(&S3));
    assert!(line.contains("USE_KUBERNETES"), "{line}");
    assert!(!line.contains("S3_BUCKET"), "{line}");
}

#[test]
fn kubernetes_mode_refuses_to_start_without_shared_storage() {
    // Worker pods cannot read the facade's DATA_DIR: staged sources and logs need S3.
    let line = one_line_start_error(&serve_kubernetes(&[]));
    assert!(line.starts_with("buildshuttle: S3_BUCKET: "), "{line}");
    assert!(line.contains("USE_KUBERNETES=true"), "{line}");
    let line = one_line_start_error(&serve_kubernetes(&[("S3_BUCKET", " ")]));
    assert!(line.contains("S3_BUCKET"), "{line}");
}

#[test]
fn bad_worker_pod_settings_name_their_variable() {
    for (var, value) in [
        ("WORKER_POD_OVERRIDES", "{"),
        ("WORKER_POD_OVERRIDES", r#"{"workSizeLimit": "6GB"}"#),
        ("WORKER_POD_OVERRIDES", r#"{"nodeSelectr": {}}"#),
        (
            "WORKER_POD_OVERRIDES",
            r#"{"workerResources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}"#,
        ),
        ("WORKER_IMAGE_PULL_SECRETS", "Not_A_Name"),
        ("DIND_MTU", "10"),
        ("INSTANCE_NAME", "-bad-"),
        ("WORKER_AUTOMOUNT_SERVICE_ACCOUNT_TOKEN", "maybe"),
    ] {
        let mut env = S3.to_vec();
        env.push((var, value));
        let line = one_line_start_error(&serve_kubernetes(&env));
        assert!(line.contains(var), "{var}={value}: {line}");
    }
}

#[test]
fn bad_kubernetes_settings_name_their_variable() {
    for (var, value) in [
        ("WORKER_DOCKER_MODE", "bogus"),
        ("LEASE_SECONDS", "1"),
        ("MAX_POD_RETRIES", "-1"),
    ] {
        let mut env = S3.to_vec();
        env.push((var, value));
        let line = one_line_start_error(&serve_kubernetes(&env));
        assert!(line.contains(var), "{var}={value}: {line}");
    }
}

#[test]
fn crd_subcommand_prints_the_committed_crd() {
    let out = Command::new(BIN).arg("crd").output().expect("run");
    assert!(out.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/buildjob.yaml"))
            .expect("committed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

/// End to end on a real cluster. Needs KUBECONFIG, S3_* settings (a bucket both this machine
/// and the cluster's pods reach, e.g. S3_BUCKET and S3_ENDPOINT), the CRD applied, the worker image
/// loaded (BUILDSHUTTLE_E2E_IMAGE), sources the cluster can fetch (BUILDSHUTTLE_E2E_SOURCES,
/// an http(s) .tar.gz with a Dockerfile) and a registry the worker's dockerd can push to
/// (BUILDSHUTTLE_E2E_REGISTRY). The service runs here (facade + controller); callbacks come
/// to this process.
#[test]
#[ignore = "needs a Kubernetes cluster: see README.md, Kubernetes mode"]
fn e2e_build_on_a_real_cluster() {
    use std::time::{Duration, Instant};
    let need = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} must be set (see README.md, Kubernetes mode)"))
    };
    let _ = need("KUBECONFIG");
    let image = need("BUILDSHUTTLE_E2E_IMAGE");
    let sources = need("BUILDSHUTTLE_E2E_SOURCES");
    let registry = need("BUILDSHUTTLE_E2E_REGISTRY");
    let namespace =
        std::env::var("BUILDSHUTTLE_E2E_NAMESPACE").unwrap_or_else(|_| "default".into());
    let mode = std::env::var("WORKER_DOCKER_MODE").unwrap_or_else(|_| "dind".into());

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        // A callback receiver (the controller runs in the service, on this machine).
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let g = got.clone();
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move |body: axum::Json<serde_json::Value>| {
                let g = g.clone();
                async move {
                    g.lock().expect("lock").push(body.0["status"].as_str().unwrap_or("").to_string());
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cb = format!("http://{}/cb", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let port_probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let port = port_probe.local_addr().expect("addr").port();
        drop(port_probe);
        let data = tempfile::tempdir().expect("tempdir");
        let mut service = tokio::process::Command::new(BIN)
            .arg("serve")
            .env("USE_KUBERNETES", "true")
            .env("LISTEN_ADDRESS", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("DATA_DIR", data.path())
            .env("KUBERNETES_NAMESPACE", &namespace)
            .env("DOCKER_BUILD_IMAGE", &image)
            .env("WORKER_DOCKER_MODE", &mode)
            .env("POD_NAME", "e2e-test")
            .kill_on_drop(true)
            .spawn()
            .expect("serve");

        let app_uuid = uuid::Uuid::new_v4().to_string();
        let build_uuid = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "sha": "e2e", "app": "e2eapp", "space": "default", "branch": "main", "repo": "r", "org": "o",
            "callback": cb, "callback_auth": "e2e-token", "build_uuid": build_uuid, "app_uuid": app_uuid,
            "build_number": 1, "sources": sources, "gm_registry_host": registry, "gm_registry_repo": "e2e",
        });
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.post(&base).json(&body).send().await {
                assert_eq!(r.status(), 200);
                break;
            }
            assert!(Instant::now() < deadline, "the service did not come up");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        let client = kube::Client::try_default().await.expect("client");
        let jobs: kube::Api<buildshuttle::operator::crd::BuildJob> = kube::Api::namespaced(client, &namespace);
        let name = buildshuttle::operator::crd::job_name("e2eapp", &app_uuid, 1);
        let deadline = Instant::now() + Duration::from_secs(600);
        let status = loop {
            let j = jobs.get(&name).await.expect("BuildJob exists");
            let st = j.status.clone().unwrap_or_default();
            if st.phase.is_some_and(|p| p.is_finished()) && st.callbacks.final_ {
                break st;
            }
            assert!(Instant::now() < deadline, "the build did not finish: {st:?}");
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        assert_eq!(status.phase, Some(buildshuttle::operator::crd::Phase::Succeeded), "{status:?}");
        assert!(status.image.as_deref().is_some_and(|i| i.ends_with(":1.1")));
        assert_eq!(*got.lock().expect("lock"), ["pending", "succeeded"]);
        let _ = service.kill().await;
    });
}
