//! Kubernetes mode as a process: without a cluster it refuses to start (one line, exit 2);
//! `crd` prints the committed CRD; and, `#[ignore]`d, an end-to-end run against a real
//! cluster (KUBECONFIG set; see README.md, Kubernetes mode).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_buildshuttle");

#[test]
fn kubernetes_mode_without_a_cluster_is_a_one_line_start_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("DATA_DIR", dir.path())
        .env("USE_KUBERNETES", "true")
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env("HOME", dir.path())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("USE_KUBERNETES"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn bad_kubernetes_settings_name_their_variable() {
    for (var, value) in [
        ("WORKER_DOCKER_MODE", "bogus"),
        ("LEASE_SECONDS", "1"),
        ("MAX_POD_RETRIES", "-1"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(BIN)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATA_DIR", dir.path())
            .env("USE_KUBERNETES", "true")
            .env(var, value)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
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

/// End to end on a real cluster. Needs KUBECONFIG, the CRD applied, the worker image
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
