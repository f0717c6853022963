//! Kubernetes mode as a process: without shared storage, a cluster or with a bad setting it
//! refuses to start (one line naming the setting, exit 2); `crd` prints the committed CRD.
//! The end-to-end runs on a real cluster (what `e2e_build_on_a_real_cluster` here used to
//! do, one build) are now every scenario of `kube_e2e.rs` and `kube_faults.rs` as
//! `real_cluster::…`, `#[ignore]`d (README.md, Kubernetes mode, Tests).

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
