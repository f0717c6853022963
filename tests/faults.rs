//! Faults: the registry down during a push, a callback receiver answering 500 or down,
//! dockerd restarted mid-build (serial: run by `.ci/run` on its own, see README).

mod common;

use common::bin::*;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILD: Duration = Duration::from_secs(120);

/// The service with `env` and `stdout`, data under `dir/data`, its stderr kept in the file
/// whose path comes back.
fn spawn_keeping_stderr(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    stdout: Stdio,
) -> (Proc, std::path::PathBuf) {
    let err_path = dir.join("stderr");
    let p = spawn_with_output(
        &dir.join("data"),
        free_port(),
        env,
        stdout,
        Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );
    (p, err_path)
}

fn finals(cb: &Callbacks, b: &Value) -> Vec<String> {
    cb.calls_for(b["build_uuid"].as_str().unwrap())
        .iter()
        .filter(|c| c.body["status"] != "pending")
        .map(|c| c.body["status"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_during_push_fails_push_failed_once() {
    // A registry of this test's own, stopped while the build runs.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("config.yml"),
        format!(
            "version: 0.1\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut registry = Command::new("docker-registry")
        .args([
            "serve",
            &dir.path().join("config.yml").display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry from .ci/services");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "registry did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let mut b = body(&sleeper("push", 3), &cb);
    b["gm_registry_host"] = json!(format!("127.0.0.1:{port}"));
    svc.post(&b).await;
    svc.wait_log(&b, "push-start", BUILD).await;
    registry.kill().unwrap();
    registry.wait().unwrap();
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    let log = svc.log(&b).await;
    assert!(log.contains("Build failed (PushFailed)"), "{log}");
    assert!(!log.contains("Successfully built and pushed"), "{log}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(finals(&cb, &b), vec!["failed"], "nothing half-reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_answering_500_are_retried_and_the_build_is_unaffected() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start_failing(3).await;
    let b = body(&sleeper("cb500", 0), &cb);
    svc.post(&b).await;
    // The build ends (its log is complete) whatever the callbacks do.
    svc.wait_log(&b, "Build finished", BUILD).await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), Duration::from_secs(30))
            .await,
        "succeeded"
    );
    let calls = cb.calls_for(b["build_uuid"].as_str().unwrap());
    let statuses: Vec<&str> = calls
        .iter()
        .map(|c| c.body["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["pending", "succeeded"],
        "pending first, one final, no duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_receiver_that_is_down_is_given_up_with_one_line() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let (p, err_path) = spawn_keeping_stderr(
        data.path(),
        &[("CALLBACK_RETRY_SECONDS", "2")],
        Stdio::null(),
    );
    let cb = Callbacks::start().await;
    let mut b = body(&sleeper("cbdown", 0), &cb);
    b["callback"] = json!(format!("http://127.0.0.1:{}/cb", free_port()));
    let t = Instant::now();
    p.post(&b).await;
    p.wait_log(&b, "Build finished").await;
    assert!(
        p.log(&b).await.contains("Successfully built and pushed"),
        "the build is unaffected"
    );
    let built_in = t.elapsed();
    // Pending gives up after ~2 s, then the final one after ~2 s more.
    let start = Instant::now();
    loop {
        let err = std::fs::read_to_string(&err_path).unwrap();
        if err.contains("final callback not delivered") {
            let lines = err
                .lines()
                .filter(|l| l.contains("callback not delivered"))
                .count();
            assert_eq!(lines, 2, "one line per callback given up:\n{err}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no give-up line:\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(built_in < Duration::from_secs(60));
}

/// SHOW_BUILD_LOGS=true with a stdout nobody reads any more (a pipe whose reader closed:
/// every write fails with EPIPE): builds run and report as usual, the service stays up, and
/// it says once per build that the output could not be printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_output_on_a_closed_stdout_fails_neither_the_build_nor_the_service() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let (mut p, err_path) =
        spawn_keeping_stderr(data.path(), &[("SHOW_BUILD_LOGS", "true")], Stdio::piped());
    drop(p.child.stdout.take());
    let cb = Callbacks::start().await;
    for marker in ["epipe1", "epipe2"] {
        let b = body(&sleeper(marker, 0), &cb);
        p.post(&b).await;
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), Duration::from_secs(60))
                .await,
            "succeeded"
        );
        assert!(p.log(&b).await.contains(&format!("{marker}-end")));
    }
    assert!(p.child.try_wait().unwrap().is_none(), "the service is up");
    let health = reqwest::get(p.url("/octhc")).await.unwrap();
    assert_eq!(health.status(), 200);
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("build output could not be printed on stdout"),
        "{err}"
    );
}

/// SHOW_BUILD_LOGS=true with a stdout that stays open and is never read (a pipe nobody
/// drains): a build printing 10 MiB, far past the pipe's 64 KiB, still ends and reports as
/// usual, its stored log whole, and the service says what stdout missed. Before, the build's
/// output, and so the build, waited on the pipe for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_output_on_a_stdout_nobody_reads_holds_up_neither_builds_nor_the_service() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let (p, err_path) =
        spawn_keeping_stderr(data.path(), &[("SHOW_BUILD_LOGS", "true")], Stdio::piped());
    // `p.child.stdout` stays open, unread.
    let cb = Callbacks::start().await;
    let df = format!(
        "FROM {BASE_IMAGE}\n{}\nRUN seq 1 200000 | sed 's/$/ a line of build output, fifty bytes long/' && echo loud-end\n",
        cache_buster()
    );
    let b = body(&data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())])), &cb);
    p.post(&b).await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded"
    );
    let log = p.log(&b).await;
    assert!(log.contains("200000 a line of build output"), "whole");
    assert!(log.contains("loud-end"));
    // A second build runs too.
    let quiet = body(&sleeper("quiet", 0), &cb);
    p.post(&quiet).await;
    assert_eq!(
        cb.wait_final(quiet["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded"
    );
    let health = reqwest::get(p.url("/octhc")).await.unwrap();
    assert_eq!(health.status(), 200);
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("build output was left out of stdout"), "{err}");
}

/// S3 that accepts uploads and never answers them (s3s-fs behind a proxy that holds every
/// PUT) refuses a `POST /` of `data:` sources with a 503 naming storage once staging passes
/// its deadline (30 s for a small archive), rather than holding the request for the S3
/// client's 5 attempts of S3_TIMEOUT_SECONDS (10 minutes by default), and keeps nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_s3_refuses_a_data_post_with_503_within_the_staging_deadline() {
    require_s3();
    let front = proxy(
        "127.0.0.1:9100",
        |method, _, _| (method == "PUT").then_some(Reply::Hang),
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    let svc = Service::start(&s3_flags_at(&endpoint)).await;
    let cb = Callbacks::start().await;
    let b = body(&sleeper("hung-s3", 0), &cb);
    let id = b["build_uuid"].as_str().unwrap();
    let started = Instant::now();
    let (code, answer) = tokio::time::timeout(Duration::from_secs(60), svc.post(&b))
        .await
        .expect("the POST is answered within a minute");
    let took = started.elapsed();
    assert_eq!(code, 503, "{answer}");
    assert_eq!(
        answer["status"],
        "Service Unavailable - storage did not take the build's sources in time; try again later."
    );
    assert!(took >= Duration::from_secs(29), "{took:?}");
    // Nothing of it is kept: unknown to the API, no callback.
    let head = svc.client.head(svc.url(&format!("/{id}"))).send().await;
    assert_eq!(head.unwrap().status(), 404);
    let log = svc.client.get(svc.url(&logs_path(&b))).send().await;
    assert_eq!(log.unwrap().status(), 404);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(cb.calls_for(id).is_empty(), "{:?}", cb.calls_for(id));
}

/// Restarts the shared dockerd, so it must not run beside other tests: `.ci/run` runs it
/// alone after the main suite (`cargo nextest run --run-ignored only -E 'test(dockerd_restart)'`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared dockerd; run alone (see .ci/run)"]
async fn dockerd_restart_mid_build_fails_the_build_and_the_next_one_works() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let b = body(&sleeper("restart", 120), &cb);
    svc.post(&b).await;
    svc.wait_log(&b, "restart-start", BUILD).await;
    let stopped = Command::new("pkill")
        .args(["-TERM", "-x", "dockerd"])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), Duration::from_secs(60))
            .await,
        "failed"
    );
    let log = svc.log(&b).await;
    assert!(log.contains("Build failed ("), "{log}");
    // The service keeps serving while dockerd is away.
    let health = reqwest::get(svc.url("/octhc")).await.unwrap();
    assert_eq!(health.status(), 200);
    // dockerd back (as .ci/services starts it), the next build works.
    let start = Instant::now();
    while std::path::Path::new("/var/run/docker.pid").exists()
        && start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = Command::new("bash")
        .args([
            concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/services"),
            "docker",
        ])
        .status()
        .unwrap();
    assert!(up.success(), "dockerd restarted");
    let next = body(&sleeper("after", 0), &cb);
    svc.post(&next).await;
    assert_eq!(
        cb.wait_final(next["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        svc.log(&next).await
    );
}
