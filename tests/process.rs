//! The real binary: start-up errors, SIGKILL mid-build and restart, SIGTERM drain.

mod common;

use common::bin::*;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// `serve` run to its end with only `env` (and PATH, PORT=0, a fresh DATA_DIR).
fn serve_output(env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("DATA_DIR", tempfile::tempdir().unwrap().path())
        .envs(env.iter().copied())
        .output()
        .expect("run binary")
}

fn run_serve(env: &[(&str, &str)]) -> (i32, String) {
    let out = serve_output(env);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_is_one_line_naming_the_variable_and_exit_2() {
    for (var, value) in [
        ("EXTRA_BUILD_ARGS", "not json"),
        ("EXTRA_BUILD_ARGS", "[1,2]"),
        ("MAXIMUM_PARALLEL_BUILDS", "0"),
        ("MAXIMUM_PARALLEL_BUILDS", "many"),
        ("MAX_QUEUED_BUILDS", "-1"),
        ("TIMEOUT_IN_MS", "-5"),
        ("DOCKER_BUILDKIT", "maybe"),
        (
            "DOCKER_BUILD_SETTINGS",
            "{\"socketPath\": \"/nonexistent/docker.sock\"}",
        ),
        (
            "DOCKER_BUILD_SETTINGS",
            "{\"host\": \"http://127.0.0.1\", \"port\": \"1\"}",
        ),
        ("DOCKER_BUILD_SETTINGS", "nonsense"),
        (
            "EXTRA_DOCKER_REGISTRY_CONFIG",
            "{\"h\": {\"username\": \"u\", \"password\": 1}, \"secret-x\": 1}",
        ),
    ] {
        let (code, stderr) = run_serve(&[(var, value)]);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(code, 2, "{var}={value}: {stderr}");
        assert_eq!(lines.len(), 1, "{var}={value}: one line, got {stderr}");
        assert!(lines[0].contains(var), "{var}={value}: {stderr}");
        assert!(!stderr.contains("panicked"));
    }
    // Local mode's queue limit is refused in Kubernetes mode rather than silently ignored.
    let (code, stderr) = run_serve(&[
        ("USE_KUBERNETES", "true"),
        ("S3_BUCKET", "b"),
        ("MAX_QUEUED_BUILDS", "10"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("MAX_QUEUED_BUILDS") && stderr.contains("local mode only"),
        "{stderr}"
    );
}

/// Through a proxy the deny list cannot see the hosts that are resolved: the service says so
/// at start (and only when there is a list to weaken).
#[test]
fn a_proxy_in_the_environment_is_named_in_a_warning_about_the_deny_list() {
    let output = |env: &[(&str, &str)]| {
        // Stops right after the start-up checks.
        let settings = (
            "DOCKER_BUILD_SETTINGS",
            "{\"socketPath\": \"/nonexistent/docker.sock\"}",
        );
        let out = serve_output(&[&[settings], env].concat());
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let warned =
        |text: &str| text.contains("SOURCES_DENY_NETWORKS can only refuse literal addresses");
    let proxied = output(&[("HTTPS_PROXY", "http://127.0.0.1:1")]);
    assert!(
        warned(&proxied) && proxied.contains("HTTPS_PROXY"),
        "{proxied}"
    );
    assert!(!warned(&output(&[])));
    assert!(!warned(&output(&[
        ("HTTPS_PROXY", "http://127.0.0.1:1"),
        ("SOURCES_DENY_NETWORKS", "")
    ])));
}

#[test]
fn help_and_version() {
    for flag in ["--help", "--version"] {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
        assert!(!out.stdout.is_empty());
    }
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "PORT",
        "DATA_DIR",
        "MAXIMUM_PARALLEL_BUILDS",
        "TIMEOUT_IN_MS",
        "DOCKER_BUILD_SETTINGS",
        "EXTRA_BUILD_ARGS",
    ] {
        assert!(
            help.contains(&format!("[env: {var}")),
            "serve --help lists {var}"
        );
    }
}

/// A source URL whose server accepts connections (the kernel's backlog) and never answers:
/// a build fetching from it holds its slot. Keep the listener while it should.
fn hanging_source() -> (std::net::TcpListener, String) {
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/never.tgz", hang.local_addr().unwrap());
    (hang, url)
}

fn finals(cb: &Callbacks, b: &Value) -> usize {
    cb.calls_for(b["build_uuid"].as_str().unwrap())
        .iter()
        .filter(|c| c.body["status"] != "pending")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_build_then_restart_reports_interrupted_and_runs_the_queue() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let port = free_port();
    let p = spawn(data.path(), port, &[("MAXIMUM_PARALLEL_BUILDS", "1")]);
    let running = body(&sleeper("killed", 304), &cb);
    let mut queued = body(&sleeper("queued", 1), &cb);
    queued["build_number"] = json!(2);
    p.post(&running).await;
    p.post(&queued).await;
    p.wait_log(&running, "killed-start").await;
    p.signal("-KILL");
    drop(p);

    let p = spawn(data.path(), port, &[("MAXIMUM_PARALLEL_BUILDS", "1")]);
    let rid = running["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(rid, Duration::from_secs(30)).await, "failed");
    assert_eq!(
        cb.wait_final(
            queued["build_uuid"].as_str().unwrap(),
            Duration::from_secs(120)
        )
        .await,
        "succeeded"
    );
    let log = p.log(&running).await;
    assert!(log.contains("Interrupted"), "{log}");
    let src = reqwest::get(p.url(&format!("/{rid}"))).await.unwrap();
    assert_eq!(src.status(), 200, "sources survive the restart");
    assert!(p.log(&queued).await.contains("queued-end"));

    // A second restart sends nothing again.
    drop(p);
    let _p = spawn(data.path(), port, &[("MAXIMUM_PARALLEL_BUILDS", "1")]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(finals(&cb, &running), 1, "no duplicate final callback");
    assert_eq!(finals(&cb, &queued), 1);
    wait_running_steps_with("sleep 304", 0, Duration::from_secs(20)).await;
}

/// A callback receiver that accepts connections and never answers: its URL, and how many
/// connections it took.
fn hanging_receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let receiver = format!("http://{}/cb", hanging.local_addr().unwrap());
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hanging.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (receiver, connections)
}

/// A service with one build slot, taken by a build whose sources never come, so every
/// later build stays queued. Returns the service, the hanging source (keep it) and its URL.
async fn one_slot_taken(
    data: &std::path::Path,
    cb: &Callbacks,
) -> (Proc, std::net::TcpListener, String) {
    let p = spawn(data, free_port(), &[("MAXIMUM_PARALLEL_BUILDS", "1")]);
    let (hang, hang_url) = hanging_source();
    let blocker = body(&hang_url, cb);
    p.post(&blocker).await;
    p.wait_log(&blocker, "Fetching sources").await;
    (p, hang, hang_url)
}

/// A callback receiver that accepts connections and never answers, while builds queue up:
/// their pending callbacks go a bounded number at a time, not one connection (and file
/// descriptor) per queued build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_callbacks_to_a_hanging_receiver_use_a_bounded_number_of_connections() {
    use std::sync::atomic::Ordering;
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let (receiver, connections) = hanging_receiver();
    let (p, _hang, hang_url) = one_slot_taken(data.path(), &cb).await;
    for _ in 0..120 {
        let mut b = body(&hang_url, &cb);
        b["callback"] = json!(receiver);
        p.post(&b).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = connections.load(Ordering::SeqCst);
    assert!((1..=40).contains(&n), "{n} connections to the receiver");
}

/// A memory figure of a process (`VmRSS:` resident, `VmHWM:` peak), in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A queued build owes a pending callback (controller-api always gives a callback URL), and
/// owing it costs its id in a queue, not a task holding a delivery in wait (~1.3 KB each):
/// 20,000 queued builds behind a receiver that never answers stay within a few hundred
/// bytes each, as the README's memory figures say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_builds_owing_a_pending_callback_cost_no_task_each() {
    use futures::StreamExt;
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let (receiver, _) = hanging_receiver();
    let (p, _hang, hang_url) = one_slot_taken(data.path(), &cb).await;
    let client = reqwest::Client::new();
    let post_many = |n: usize| {
        let (client, url, receiver, hang_url) = (
            client.clone(),
            p.url("/"),
            receiver.clone(),
            hang_url.clone(),
        );
        let cb = &cb;
        async move {
            let bodies: Vec<Value> = (0..n)
                .map(|_| {
                    let mut b = body(&hang_url, cb);
                    b["callback"] = json!(receiver);
                    b
                })
                .collect();
            futures::stream::iter(bodies)
                .for_each_concurrent(16, |b| {
                    let (client, url) = (client.clone(), url.clone());
                    async move {
                        let r = client.post(url).json(&b).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                    }
                })
                .await;
        }
    };
    // Past the queue's first 2,048 (whose journal lines stay in memory) before measuring.
    post_many(3_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memory(p.child.id(), "VmRSS:");
    const N: u64 = 20_000;
    post_many(N as usize).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_build = memory(p.child.id(), "VmRSS:").saturating_sub(before) / N;
    println!("{per_build} bytes of resident memory per queued build owing a pending callback");
    assert!(per_build < 600, "{per_build} bytes per queued build");
}

/// A full disk when a build ends: its outcome cannot be written, so its final callback
/// waits (sent, it would be sent again after a restart that reruns the build); once there
/// is room, the outcome is written and the callback goes, once. The disk is "full" through
/// the process's file size limit (`prlimit`), which fails writes as ENOSPC would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_the_final_callback_until_the_outcome_is_on_disk() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let port = free_port();
    let p = spawn(data.path(), port, &[]);
    let b = body(&sleeper("full", 3), &cb);
    p.post(&b).await;
    p.wait_log(&b, "full-start").await;
    // No file of the process may grow any more: the largest journal segment's size.
    let biggest = std::fs::read_dir(data.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("journal-"))
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap();
    let pid = p.child.id().to_string();
    let limit = |v: &str| {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--fsize={v}")])
            .status()
            .unwrap()
            .success();
        assert!(ok, "prlimit --fsize={v}");
    };
    limit(&format!("{biggest}:"));
    // The build ends 3 s after its start; give it time to try to write its outcome.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        finals(&cb, &b),
        0,
        "no final callback before the outcome is on disk"
    );
    let health = || async {
        reqwest::get(p.url("/octhc"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(health().await, 503, "the health check says so");
    limit("unlimited:");
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, Duration::from_secs(40)).await,
        "succeeded"
    );
    assert_eq!(health().await, 200);
    // On disk: a restart neither runs it again nor sends another final callback.
    p.signal("-KILL");
    drop(p);
    let _p = spawn(data.path(), port, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(finals(&cb, &b), 1);
}

/// A filesystem of its own (an ext4 image, loop-mounted) that the test can freeze as a disk
/// that stops answering, as a lost network volume does: with `fsfreeze`, every write waits
/// until it is thawed. Needs root, as `.ci/run` has. Unmounted on drop.
struct FreezableDisk {
    _image: tempfile::TempDir,
    mount: std::path::PathBuf,
}

impl FreezableDisk {
    fn new() -> Self {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("disk.img");
        let mount = image.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            let out = Command::new(cmd).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd} {args:?} (a loop-mounted filesystem needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::File::create(&file)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), file.as_os_str()],
        );
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                file.as_os_str(),
                mount.as_os_str(),
            ],
        );
        Self {
            _image: image,
            mount,
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.mount
    }

    fn freeze(&self) {
        assert!(fsfreeze("--freeze", &self.mount), "fsfreeze --freeze");
    }

    /// Thaws the disk when dropped (declared after the service it holds: a process blocked
    /// on a frozen disk cannot be killed and reaped until it is thawed).
    fn thaw_on_drop(&self) -> Thaw {
        Thaw(self.mount.clone())
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        fsfreeze("--unfreeze", &self.mount);
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// `fsfreeze {flag} {mount}`; whether it succeeded (an unfreeze of a disk not frozen fails).
fn fsfreeze(flag: &str, mount: &std::path::Path) -> bool {
    Command::new("fsfreeze")
        .arg(flag)
        .arg(mount)
        .status()
        .is_ok_and(|s| s.success())
}

struct Thaw(std::path::PathBuf);

impl Thaw {
    fn now(&self) {
        assert!(fsfreeze("--unfreeze", &self.0), "fsfreeze --unfreeze");
    }
}

impl Drop for Thaw {
    fn drop(&mut self) {
        // Not frozen any more is fine.
        fsfreeze("--unfreeze", &self.0);
    }
}

/// A disk that stops answering (frozen): a write of the build state waits in the kernel for
/// ever, so a `POST /` then was held as long, and `/octhc` said all was well. Now, once one
/// write has waited 30 s, `/octhc` fails naming it and new builds are refused at once; the
/// build whose write was waiting is accepted when the disk answers again, and runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_stops_answering_fails_the_health_check_and_refuses_builds_at_once() {
    let disk = FreezableDisk::new();
    let cb = Callbacks::start().await;
    let p = spawn(&disk.path().join("data"), free_port(), &[]);
    let thaw = disk.thaw_on_drop();
    let http = reqwest::Client::new();
    let post = |b: Value| {
        let (http, url) = (http.clone(), p.url("/"));
        async move {
            let r = http.post(url).json(&b).send().await.unwrap();
            r.status().as_u16()
        }
    };
    let health = || async {
        let r = reqwest::get(p.url("/octhc")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    // Sources that fail at once: no dockerd needed.
    let gone = format!("http://127.0.0.1:{}/gone.tgz", free_port());
    let warm = body(&gone, &cb);
    assert_eq!(post(warm.clone()).await, 200);
    let id = |b: &Value| b["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(
        cb.wait_final(&id(&warm), Duration::from_secs(60)).await,
        "failed"
    );
    assert_eq!(health().await.0, 200);

    disk.freeze();
    let frozen_at = Instant::now();
    let held = body(&gone, &cb);
    let held_post = tokio::spawn(post(held.clone()));
    let (code, why) = loop {
        let (code, why) = health().await;
        if code != 200 {
            break (code, why);
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(45),
            "/octhc still passes {:?} after the disk froze",
            frozen_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 503);
    assert!(why.contains("waiting") && why.contains("DATA_DIR"), "{why}");
    assert!(frozen_at.elapsed() >= Duration::from_secs(29), "too eager");
    assert!(!held_post.is_finished(), "the waiting POST is still held");
    let refused = body(&gone, &cb);
    let asked = Instant::now();
    assert_eq!(post(refused.clone()).await, 503);
    assert!(asked.elapsed() < Duration::from_secs(2), "refused at once");

    thaw.now();
    let held_code = tokio::time::timeout(Duration::from_secs(20), held_post)
        .await
        .expect("the held POST is answered once the disk answers")
        .unwrap();
    assert_eq!(held_code, 200);
    assert_eq!(
        cb.wait_final(&id(&held), Duration::from_secs(60)).await,
        "failed"
    );
    let start = Instant::now();
    while health().await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/octhc passes again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(finals(&cb, &held), 1);
    assert!(
        cb.calls_for(&id(&refused)).is_empty(),
        "the refused build never ran"
    );
}

/// SIGTERM with `SHUTDOWN_DELAY_SECONDS`: the process goes on answering, with `/octhc` failing,
/// so a Service's endpoints drop the replica before its port closes; a second signal ends
/// the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_serving_with_failing_readiness_for_the_shutdown_delay() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let mut p = spawn(
        data.path(),
        free_port(),
        &[("SHUTDOWN_DELAY_SECONDS", "60")],
    );
    let get = |path: &str| {
        let url = p.url(path);
        async move { reqwest::get(url).await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(get("/octhc").await.ok(), Some(200));
    p.signal("-TERM");
    let t = Instant::now();
    while get("/octhc").await.ok() != Some(503) {
        assert!(t.elapsed() < Duration::from_secs(5), "/octhc never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still serving, for as long as the delay lasts.
    for _ in 0..5 {
        assert_eq!(
            get("/metrics").await.ok(),
            Some(200),
            "served during the delay"
        );
        assert_eq!(get("/octhc").await.ok(), Some(503));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(p.child.try_wait().unwrap().is_none(), "still running");
    p.signal("-TERM");
    let status = p
        .wait_exit(
            Duration::from_secs(20),
            "a second SIGTERM did not end the 60 s delay",
        )
        .await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_builds_within_the_grace_period() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let mut p = spawn(
        data.path(),
        free_port(),
        &[
            ("MAXIMUM_PARALLEL_BUILDS", "2"),
            ("SHUTDOWN_GRACE_SECONDS", "8"),
        ],
    );
    let short = body(&sleeper("short", 3), &cb);
    let long = body(&sleeper("long", 305), &cb);
    p.post(&short).await;
    p.post(&long).await;
    p.wait_log(&short, "short-start").await;
    p.wait_log(&long, "long-start").await;
    // Someone follows the long build's log: that response lasts as long as the build, and
    // must not keep the builds from draining.
    let follow = reqwest::get(p.url(&format!("{}?follow=true", logs_path(&long))))
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let followed = tokio::spawn(async move { follow.text().await.unwrap_or_default() });
    let t = Instant::now();
    p.signal("-TERM");
    let status = p
        .wait_exit(Duration::from_secs(40), "serve did not exit after SIGTERM")
        .await;
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "it waited for the running builds"
    );
    assert_eq!(
        cb.wait_final(
            short["build_uuid"].as_str().unwrap(),
            Duration::from_secs(1)
        )
        .await,
        "succeeded"
    );
    assert_eq!(
        cb.wait_final(long["build_uuid"].as_str().unwrap(), Duration::from_secs(1))
            .await,
        "failed"
    );
    let log = std::fs::read_to_string(data.path().join("store").join(format!(
        "{}-{}-1.logs",
        long["app"].as_str().unwrap(),
        long["app_uuid"].as_str().unwrap()
    )))
    .unwrap();
    assert!(log.contains("interrupted"), "{log}");
    let followed = followed.await.unwrap();
    assert!(followed.contains("long-start"), "{followed}");
}

/// A burst of POSTs, SIGKILL while it is still arriving, restart: every build that got its
/// `200` is there and gets exactly one final callback (the journal's group commit acks a
/// POST only after its batch is fsynced). A build whose sources never answer holds the only
/// slot, so no final callback is in flight at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_post_burst_loses_no_accepted_build() {
    use futures::StreamExt;
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let port = free_port();
    let (_hang, hang_url) = hanging_source();
    let closed = format!("http://127.0.0.1:{}/gone.tgz", free_port());
    let env = [("MAXIMUM_PARALLEL_BUILDS", "1")];
    let p = spawn(data.path(), port, &env);
    let blocker = body(&hang_url, &cb);
    p.post(&blocker).await;
    p.wait_log(&blocker, "Fetching sources").await;
    // Its "running" line is written (not synced) 20 ms into the build: until then a restart
    // runs it again (its hanging source would then hold it past this test's wait) instead of
    // ending it as interrupted.
    let bid = blocker["build_uuid"].as_str().unwrap().to_string();
    let recorded_running = || {
        std::fs::read_dir(data.path().join("state"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| std::fs::read_to_string(f.path()).ok())
            .any(|text| {
                text.lines()
                    .any(|l| l.contains(&bid) && l.contains(r#""phase":"running""#))
            })
    };
    let start = std::time::Instant::now();
    while !recorded_running() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never recorded running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let n = 400;
    let bodies: Vec<Value> = (0..n).map(|_| body(&closed, &cb)).collect();
    let client = reqwest::Client::new();
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let burst = {
        let accepted = accepted.clone();
        let url = p.url("/");
        let bodies = bodies.clone();
        tokio::spawn(async move {
            futures::stream::iter(bodies)
                .for_each_concurrent(32, |b| {
                    let (client, url, accepted) = (client.clone(), url.clone(), accepted.clone());
                    async move {
                        if let Ok(r) = client.post(&url).json(&b).send().await {
                            if r.status() == 200 {
                                accepted.lock().unwrap().push(b);
                            }
                        }
                    }
                })
                .await
        })
    };
    // Kill mid-burst, right after some 200s went out.
    while accepted.lock().unwrap().len() < n / 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    p.signal("-KILL");
    drop(p);
    burst.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= n / 3 && accepted.len() < n,
        "killed mid-burst: {}",
        accepted.len()
    );

    let p = spawn(data.path(), port, &env);
    assert_eq!(cb.wait_final(&bid, Duration::from_secs(30)).await, "failed");
    for b in &accepted {
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(cb.wait_final(id, Duration::from_secs(120)).await, "failed");
    }
    // A repeated POST of an accepted build starts nothing, and a restart sends nothing again.
    p.post(&accepted[0]).await;
    drop(p); // SIGKILL again (Proc's drop), maybe with callbacks of un-acknowledged builds in flight
             // Anything the receiver got before this came from a killed process.
    let restarted_at = std::time::Instant::now();
    let _p = spawn(data.path(), port, &env);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(finals(&cb, &blocker), 1, "no duplicate final callback");
    // Exactly one final callback per build, with one exception no receiver-side protocol
    // can avoid: a callback the killed process delivered but had not yet recorded is sent
    // again (at least once beats never). So a second final is allowed only when the first
    // one came from a killed process.
    for b in &bodies {
        let id = b["build_uuid"].as_str().unwrap();
        let finals: Vec<_> = cb
            .calls_for(id)
            .into_iter()
            .filter(|c| c.body["status"] != "pending")
            .collect();
        let accepted_here = accepted.iter().any(|a| a["build_uuid"] == b["build_uuid"]);
        assert!(
            !accepted_here || !finals.is_empty(),
            "accepted build {id} lost"
        );
        match finals.as_slice() {
            [] | [_] => {}
            [first, _] => assert!(
                first.at <= restarted_at,
                "{id}: a second final callback, the first one sent after the restart"
            ),
            more => panic!("{id}: {} final callbacks", more.len()),
        }
    }
}

/// Clients that stall (half a request line, a body that stops) or keep idle connections
/// open cannot use up the service's file descriptors: each is closed after
/// HTTP_IDLE_TIMEOUT_SECONDS, at most three quarters of the open-file limit are served at
/// once, and a build posted meanwhile runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_closed_and_cannot_starve_builds_of_file_descriptors() {
    use std::io::{Read, Write};
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let port = free_port();
    let p = common::bin::spawn_with_nofile(
        data.path(),
        port,
        &[("HTTP_IDLE_TIMEOUT_SECONDS", "2")],
        256,
    );
    // More stalled connections than the process has descriptors: half a request line
    // each, then a body that stops after 10 of 1,000 bytes.
    let mut stalled: Vec<std::net::TcpStream> = (0..400)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let half: &[u8] = if i % 2 == 0 {
                b"GET /octhc HT"
            } else {
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"app\": \"a"
            };
            s.write_all(half).unwrap();
            s
        })
        .collect();
    // A build posted now gets in once the stalled ones are closed, and has the descriptors
    // it needs (its log, the source, dockerd, the registry).
    let b = body(
        &data_uri(&common::tar_gz(&[(
            "Dockerfile",
            format!("FROM test/busybox:latest\n{}\n", common::cache_buster()).as_bytes(),
        )])),
        &cb,
    );
    let post = tokio::time::timeout(Duration::from_secs(30), async {
        reqwest::Client::new()
            .post(p.url("/"))
            .json(&b)
            .send()
            .await
    })
    .await
    .expect("a POST behind 400 stalled clients is answered")
    .unwrap();
    assert_eq!(post.status(), 200);
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, Duration::from_secs(60)).await,
        "succeeded"
    );
    // Every stalled connection was closed by the service (read gives EOF or a reset).
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a stalled connection is still open after 10 s: {e}"),
            }
        }
    }
    assert!(
        open_sockets(p.child.id()) < 64,
        "{} sockets still open",
        open_sockets(p.child.id())
    );
}

/// What `POST /` bodies may cost: a body announcing more than MAX_REQUEST_BYTES is refused
/// before it is read; a body of many small JSON values is not parsed into a tree 16–32 times
/// its size; and bodies arriving at once share one MAX_REQUEST_BYTES, so the memory the chart
/// gives for one upload of the largest size holds for any number at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_cost_at_most_one_largest_upload_at_a_time() {
    use std::io::{Read, Write};
    require_services();
    const MAX: usize = 32 << 20;
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let p = spawn(
        data.path(),
        free_port(),
        &[
            ("MAX_REQUEST_BYTES", &MAX.to_string()),
            ("MAXIMUM_PARALLEL_BUILDS", "1"),
        ],
    );
    let pid = p.child.id();
    // 1 GiB announced, 10 bytes sent: the 413 comes at once.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{\"app\":\"a").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 64];
    let n = s
        .read(&mut head)
        .expect("an answer before the body is sent");
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let base = memory(pid, "VmHWM:");
    // Many small values, within the limit: refused as a bad body, never a tree of values.
    let mut zeros = b"{\"x\":[".to_vec();
    zeros.extend(std::iter::repeat_n(&b"0,"[..], (MAX - 64) / 2).flatten());
    zeros.extend_from_slice(b"0]}");
    let r = reqwest::Client::new()
        .post(p.url("/"))
        .header("content-type", "application/json")
        .body(zeros)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after_zeros = memory(pid, "VmHWM:");
    // Four `data:` bodies of almost MAX each, at once.
    let payload = "A".repeat(MAX - 4096);
    let posts = (0..4).map(|_| {
        let mut b = body("data:base64,", &cb);
        b["sources"] = json!(format!("data:base64,{payload}"));
        let url = p.url("/");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&b)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let codes = futures::future::join_all(posts).await;
    assert!(codes.iter().all(|c| *c == 200 || *c == 400), "{codes:?}");
    let after_uploads = memory(pid, "VmHWM:");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "peak memory: {:.0} MiB at start, {:.0} MiB after the body of zeros, {:.0} MiB after four uploads at once",
        mib(base),
        mib(after_zeros),
        mib(after_uploads)
    );
    // The chart's rule: 4 x MAX_REQUEST_BYTES for bodies (tests/manifests.rs).
    assert!(
        after_zeros - base < 2 * MAX as u64,
        "a body of small values raised the peak by {:.0} MiB",
        mib(after_zeros - base)
    );
    assert!(
        after_uploads - base < 4 * MAX as u64,
        "four uploads at once raised the peak by {:.0} MiB",
        mib(after_uploads - base)
    );
}

/// Open sockets of a process (its connections to dockerd, the API's, …).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildkit_sessions_end_with_their_builds() {
    // dockerd never closes a BuildKit session: a build that left its session open would hold
    // a connection (and a task) for the life of the service.
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let p = spawn(data.path(), free_port(), &[("DOCKER_BUILDKIT", "1")]);
    let mut after = Vec::new();
    for n in 1..=4 {
        let df = format!(
            "FROM {BASE_IMAGE}\n{}\nRUN echo session-{n}\n",
            cache_buster()
        );
        let mut b = body(&data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())])), &cb);
        b["build_number"] = json!(n);
        p.post(&b).await;
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(
            cb.wait_final(id, Duration::from_secs(120)).await,
            "succeeded",
            "{}",
            p.log(&b).await
        );
        assert!(built_by_buildkit(&p.log(&b).await), "built with BuildKit");
        tokio::time::sleep(Duration::from_millis(300)).await;
        after.push(open_sockets(p.child.id()));
    }
    assert!(
        after[3] <= after[0],
        "sockets after each build: {after:?} (a session per build left open)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_keeps_nothing_of_the_refused_build() {
    require_services();
    let data = tempfile::tempdir().unwrap();
    let cb = Callbacks::start().await;
    let port = free_port();
    let (hang, hang_url) = hanging_source();
    let env = [("MAXIMUM_PARALLEL_BUILDS", "1"), ("MAX_QUEUED_BUILDS", "2")];
    let p = spawn(data.path(), port, &env);
    let running = body(&hang_url, &cb);
    p.post(&running).await;
    p.wait_log(&running, "Fetching sources").await;
    let queued: Vec<Value> = (0..2).map(|_| body(&hang_url, &cb)).collect();
    for b in &queued {
        p.post(b).await;
    }

    let refused = body(&hang_url, &cb);
    let client = reqwest::Client::new();
    let r = client.post(p.url("/")).json(&refused).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "30");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["status"],
        "Service Unavailable - the build queue is full; try again later."
    );
    // A build already queued is still acknowledged: a retried POST must not look refused.
    p.post(&queued[0]).await;
    let metrics = reqwest::get(p.url("/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("buildshuttle_builds_refused_queue_full_total 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rid = refused["build_uuid"].as_str().unwrap();
    assert!(
        cb.calls_for(rid).is_empty(),
        "a refused build sends no callback"
    );
    assert_eq!(p.log(&refused).await, "", "a refused build has no log");
    let sources = reqwest::get(p.url(&format!("/{rid}"))).await.unwrap();
    assert_eq!(sources.status(), 404, "a refused build stores nothing");

    // Stopping the running build frees its slot; the oldest queued one starts and the
    // queue has room again.
    let key = build_path(&running);
    let stop = client.delete(p.url(&key)).send().await.unwrap();
    assert_eq!(stop.status(), 200);
    p.wait_log(&queued[0], "Fetching sources").await;
    p.post(&refused).await;
    assert_eq!(
        cb.wait_final(
            running["build_uuid"].as_str().unwrap(),
            Duration::from_secs(30)
        )
        .await,
        "failed"
    );
    let start = Instant::now();
    while cb.calls_for(rid).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the accepted build's pending callback never came"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(hang);
}
