//! `buildshuttle worker` as a real process against the test set-up's dockerd and registry
//! (`bash .ci/services`): the image is pushed to 127.0.0.1:5000, the outcome JSON is
//! written to the termination log, the log is stored, the exit code says how it went.

use buildshuttle::build::{BuildSpec, FailureReason, Outcome};
use buildshuttle::operator::crd::{BuildJobSpec, SourceKind, SourceRef};
use buildshuttle::secret::Secret;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn targz(files: &[(&str, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, body.as_bytes())
            .expect("tar entry");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

fn spec(app: &str) -> BuildSpec {
    BuildSpec {
        build_uuid: uuid::Uuid::new_v4(),
        app: app.into(),
        space: "default".into(),
        app_uuid: uuid::Uuid::new_v4().to_string(),
        build_number: 3,
        sources: Secret::new("unused"),
        sources_stored: false,
        sha: None,
        branch: None,
        repo: None,
        org: None,
        callback: None,
        callback_auth: None,
        kafka_hosts: None,
        gm_registry_host: "127.0.0.1:5000".into(),
        gm_registry_repo: "akkeris".into(),
        gm_registry_auth: None,
        build_args: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
        docker_registry: None,
        docker_login: None,
        docker_password: None,
    }
}

struct Run {
    code: Option<i32>,
    outcome: Outcome,
    stdout: String,
    termination: String,
}

/// `buildshuttle worker` for `job`, with only the environment a worker pod gives it (the
/// host's dockerd; `extra_env` last, so it wins); its termination log is
/// `dir/termination-log`.
/// The BuildJob of `b` whose sources are stored under its source key.
fn stored_job(b: &BuildSpec) -> BuildJobSpec {
    BuildJobSpec::from_build(
        b,
        SourceRef {
            kind: SourceKind::Stored,
            display: "stored".into(),
            storage_key: Some(b.source_key()),
        },
    )
}

fn worker_command(
    dir: &Path,
    job: &BuildJobSpec,
    sources: Option<&str>,
    extra_env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildshuttle"));
    cmd.arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "BUILD_JOB_SPEC",
            serde_json::to_string(job).expect("spec json"),
        )
        .env("DATA_DIR", dir.join("data"))
        .env("TERMINATION_LOG_PATH", dir.join("termination-log"))
        .env(
            "DOCKER_BUILD_SETTINGS",
            r#"{"socketPath":"/var/run/docker.sock"}"#,
        )
        .env("DOCKER_WAIT_SECONDS", "20")
        .env("TIMEOUT_IN_MS", "300000");
    if let Some(s) = sources {
        cmd.env("WORKER_SOURCES", s);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd
}

fn run_worker(
    dir: &Path,
    job: &BuildJobSpec,
    sources: Option<&str>,
    extra_env: &[(&str, &str)],
) -> Run {
    let term = dir.join("termination-log");
    let out = worker_command(dir, job, sources, extra_env)
        .output()
        .expect("the worker runs");
    let text = std::fs::read_to_string(&term).expect("termination log written");
    Run {
        code: out.status.code(),
        outcome: serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("termination log is not an outcome ({e}): {text}")),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        termination: text,
    }
}

/// The outcome is written as soon as it is known, before the log's delivery (here to a
/// Kafka broker that accepts connections and never answers), which a deadline or a drain
/// may cut short: a SIGTERM then ends the worker at once, the outcome already in place.
#[test]
fn the_outcome_is_written_before_the_log_is_delivered_and_a_sigterm_then_ends_the_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = std::net::TcpListener::bind("127.0.0.1:0").expect("broker");
    let mut b = spec("wkrk");
    b.kafka_hosts = Some(broker.local_addr().expect("addr").to_string());
    let archive = targz(&[("Dockerfile", "FROM test/busybox:latest\nRUN true\n")]);
    store(dir.path(), &b.source_key(), &archive);
    let job = stored_job(&b);
    let term = dir.path().join("termination-log");
    let mut child = worker_command(
        dir.path(),
        &job,
        None,
        &[("KAFKA_DELIVERY_TIMEOUT_MS", "120000")],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("the worker runs");
    let start = std::time::Instant::now();
    let written = loop {
        if let Ok(text) = std::fs::read_to_string(&term) {
            if !text.is_empty() {
                break text;
            }
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the worker ended before writing its outcome"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no outcome while the log is being delivered"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let outcome: Outcome = serde_json::from_str(&written).expect("an outcome");
    assert!(matches!(outcome, Outcome::Succeeded { .. }), "{written}");
    // The stored log is said to be stored while Kafka's delivery goes on: a SIGKILL now
    // must not have the controller copy the pod's log over it.
    let stored = r#""logStored":true"#;
    while !std::fs::read_to_string(&term).is_ok_and(|t| t.contains(stored)) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the log's storing is not told before its delivery ends: {:?}",
            std::fs::read_to_string(&term)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "still delivering the log"
    );
    let sent = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = exit_within(
        &mut child,
        sent,
        std::time::Duration::from_secs(10),
        "SIGTERM did not end the wait for the log's delivery",
    );
    assert_eq!(status.code(), Some(0));
    let last = std::fs::read_to_string(&term).unwrap_or_default();
    assert!(last.contains(stored), "{last}");
    drop(broker);
}

/// TIMEOUT_IN_MS counts from the worker's start, the wait for dockerd included: the pod's
/// deadline is TIMEOUT_IN_MS plus a margin for the pod's own start, and must not come first.
#[test]
fn the_wait_for_dockerd_counts_against_timeout_in_ms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkrwait");
    let job = BuildJobSpec::from_build(
        &b,
        SourceRef {
            kind: SourceKind::Http,
            display: "http://127.0.0.1:9/a.tgz".into(),
            storage_key: None,
        },
    );
    let socket = dir.path().join("no-dockerd-here.sock");
    let settings = format!(r#"{{"socketPath":"{}"}}"#, socket.display());
    let started = std::time::Instant::now();
    let run = run_worker(
        dir.path(),
        &job,
        Some("http://127.0.0.1:9/a.tgz"),
        &[
            ("DOCKER_BUILD_SETTINGS", settings.as_str()),
            ("DOCKER_WAIT_SECONDS", "60"),
            ("TIMEOUT_IN_MS", "2000"),
        ],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "waited {:?} for a dockerd that never came",
        started.elapsed()
    );
    assert_eq!(run.code, Some(1));
    assert!(
        matches!(
            run.outcome,
            Outcome::Failed {
                reason: FailureReason::DockerUnavailable,
                ..
            }
        ),
        "{:?}",
        run.outcome
    );
}

/// The worker's exit status, failing with `what` unless it exits within `within` of `since`.
fn exit_within(
    child: &mut std::process::Child,
    since: std::time::Instant,
    within: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(since.elapsed() < within, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Puts an archive where local storage (DATA_DIR/store) keeps `{build_uuid}`.
fn store(dir: &Path, key: &str, bytes: &[u8]) {
    let store = dir.join("data").join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    std::fs::write(store.join(key), bytes).expect("stored archive");
}

#[test]
fn worker_builds_stored_sources_pushes_and_writes_its_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkr");
    let marker = uuid::Uuid::new_v4();
    let archive = targz(&[(
        "Dockerfile",
        &format!("FROM test/busybox:latest\nRUN echo \"built $GREETING {marker}\"\n"),
    )]);
    store(dir.path(), &b.source_key(), &archive);
    let job = stored_job(&b);
    // The values of build args are not in the BuildJob: they come from the credentials
    // Secret, as WORKER_BUILD_ARGS.
    assert_eq!(job.build_args.get("GREETING").map(String::as_str), Some(""));
    let run = run_worker(
        dir.path(),
        &job,
        None,
        &[("WORKER_BUILD_ARGS", r#"{"GREETING":"hello"}"#)],
    );
    let Outcome::Succeeded { image, digest } = &run.outcome else {
        panic!("expected success, got {:?}\n{}", run.outcome, run.stdout);
    };
    assert_eq!(run.code, Some(0));
    assert_eq!(image, &b.image());
    assert!(
        digest.as_deref().is_some_and(|d| d.starts_with("sha256:")),
        "{digest:?}"
    );
    // Build output on stdout (the pod log), prefixed so the API can tell it from anything else.
    assert!(
        run.stdout.contains(&format!("built hello {marker}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.lines().all(|l| l.starts_with("[wkr-3] ")),
        "{}",
        run.stdout
    );
    // The log is stored, ending with the legacy last line.
    let log = std::fs::read_to_string(dir.path().join("data/store").join(b.log_key()))
        .expect("stored log");
    assert_eq!(log.lines().last(), Some("Build finished"));
    // Timings: the summary line just before it, and beside the outcome in the termination
    // message, for the controller.
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines[lines.len() - 2].starts_with("Timings: fetch "),
        "{log}"
    );
    let term = buildshuttle::worker::parse_termination_message(&run.termination)
        .unwrap_or_else(|| panic!("{}", run.termination));
    let timings = term.timings.expect("timings in the termination message");
    for stage in [
        timings.fetch,
        timings.context,
        timings.build,
        timings.push,
        timings.total,
    ] {
        assert!(stage.is_some(), "{timings:?}");
    }
    // Both tags are in the registry.
    for tag in ["1.3", "latest"] {
        let url = format!(
            "http://127.0.0.1:5000/v2/akkeris/{}/manifests/{tag}",
            b.app_key()
        );
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg("Accept: application/vnd.docker.distribution.manifest.v2+json")
            .arg(&url)
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{url}");
    }
    // A host worker's classic build is labelled in the registry: its outcome's digest is the
    // labelled manifest under `latest`, and the daemon's local `latest` is that very image.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo = format!("akkeris/{}", b.app_key());
    let registry = "127.0.0.1:5000";
    assert_eq!(
        rt.block_on(common::manifest_digest(registry, &repo, "latest", None)),
        digest.clone()
    );
    let (config_digest, config) = rt
        .block_on(common::registry_config(registry, &repo, "latest", None))
        .expect("config");
    assert_eq!(
        config["config"]["Labels"]["build_uuid"],
        b.build_uuid.to_string()
    );
    let local = rt
        .block_on(common::docker().inspect_image(&format!("{}:latest", b.image_repository())))
        .expect("the local latest");
    assert_eq!(local.id, Some(config_digest));
}

#[test]
fn a_failing_build_exits_1_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkrfail");
    store(
        dir.path(),
        &b.source_key(),
        &targz(&[("Dockerfile", "FROM test/busybox:latest\nRUN exit 3\n")]),
    );
    let job = stored_job(&b);
    let run = run_worker(dir.path(), &job, None, &[]);
    assert_eq!(run.code, Some(1));
    assert!(
        matches!(
            run.outcome,
            Outcome::Failed {
                reason: FailureReason::BuildFailed,
                ..
            }
        ),
        "{:?}",
        run.outcome
    );
}

#[test]
fn an_unreachable_dockerd_and_missing_sources_are_reported_not_crashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkrdown");
    let http = BuildJobSpec::from_build(
        &b,
        SourceRef {
            kind: SourceKind::Http,
            display: "http://127.0.0.1:9/a.tgz".into(),
            storage_key: None,
        },
    );
    let run = run_worker(dir.path(), &http, None, &[]);
    assert_eq!(run.code, Some(1));
    assert!(
        matches!(
            run.outcome,
            Outcome::Failed {
                reason: FailureReason::InvalidSources,
                ..
            }
        ),
        "{:?}",
        run.outcome
    );

    let run = run_worker(
        dir.path(),
        &http,
        Some("http://127.0.0.1:9/a.tgz"),
        &[
            (
                "DOCKER_BUILD_SETTINGS",
                r#"{"host":"http://127.0.0.1","port":"1"}"#,
            ),
            ("DOCKER_WAIT_SECONDS", "2"),
        ],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        matches!(
            run.outcome,
            Outcome::Failed {
                reason: FailureReason::DockerUnavailable,
                ..
            }
        ),
        "{:?}",
        run.outcome
    );
}

mod common;

/// In Kubernetes mode storage is S3 and logs also go to Kafka: the worker reads its stored
/// sources from the bucket and leaves its log there and on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reads_s3_sources_and_writes_its_log_to_s3_and_kafka() {
    use clap::Parser;
    const S3: [(&str, &str); 5] = [
        ("S3_BUCKET", "buildshuttle-test"),
        ("S3_ENDPOINT", "http://127.0.0.1:9100"),
        ("S3_ACCESS_KEY", "buildshuttle-test"),
        ("S3_SECRET_KEY", "buildshuttle-test-secret"),
        ("S3_REGION", "us-east-1"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    // Put the archive into the bucket through the service's own storage code.
    let mut argv = vec!["buildshuttle".to_string(), "serve".to_string()];
    for (k, v) in S3 {
        argv.push(format!("--{}", k.to_ascii_lowercase().replace('_', "-")));
        argv.push(v.to_string());
    }
    argv.extend([
        "--data-dir".into(),
        dir.path().join("svc").display().to_string(),
    ]);
    let cli = buildshuttle::config::Cli::try_parse_from(argv).expect("flags");
    let buildshuttle::config::Command::Serve(args) = cli.command else {
        panic!("serve")
    };
    let cfg = args.build.validate().expect("config");
    let storage = buildshuttle::storage::open(&cfg)
        .await
        .expect("s3s-fs from .ci/services on 127.0.0.1:9100");

    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("alamobuildlogs", 1, 1).expect("topic");
    let mut b = spec("wkrs3");
    b.kafka_hosts = Some(cluster.bootstrap_servers());
    let marker = uuid::Uuid::new_v4();
    let archive = targz(&[(
        "Dockerfile",
        &format!("FROM test/busybox:latest\nRUN echo \"s3 worker {marker}\"\n"),
    )]);
    let file = dir.path().join("archive.tgz");
    std::fs::write(&file, &archive).expect("archive");
    storage.put_file(&b.source_key(), &file).await.expect("put");
    let job = stored_job(&b);
    let (d, j) = (dir.path().to_path_buf(), job.clone());
    let run = tokio::task::spawn_blocking(move || run_worker(&d, &j, None, &S3))
        .await
        .expect("worker");
    assert_eq!(run.code, Some(0), "{:?}\n{}", run.outcome, run.stdout);

    // Before it exits, the worker leaves the daemon (which may outlive the pod) the app's
    // `latest` as its only tag of the build.
    let docker = common::docker();
    assert!(
        docker.inspect_image(&b.image()).await.is_err(),
        "1.3 untagged"
    );
    let latest = docker
        .inspect_image(&format!("{}:latest", b.image_repository()))
        .await
        .expect("the app's latest image is local")
        .config
        .and_then(|c| c.labels)
        .unwrap_or_default();
    assert_eq!(latest["build_uuid"], b.build_uuid.to_string());

    // The log is in the bucket, complete.
    use futures::StreamExt;
    let obj = storage
        .get(&b.log_key())
        .await
        .expect("get")
        .expect("log in S3");
    let bytes: Vec<u8> = obj.body.map(|c| c.expect("chunk").to_vec()).concat().await;
    let log = String::from_utf8(bytes).expect("utf-8");
    assert!(log.contains(&format!("s3 worker {marker}")), "{log}");
    assert_eq!(log.lines().last(), Some("Build finished"));

    // And on Kafka, line for line.
    let key = format!("{}-{}-3", b.app, b.app_uuid);
    let bootstrap = cluster.bootstrap_servers();
    let msgs = tokio::task::spawn_blocking(move || {
        common::kafka::consume_build(bootstrap, "alamobuildlogs".into(), key)
    })
    .await
    .expect("consume");
    let messages: Vec<String> = msgs
        .iter()
        .map(|(_, v)| {
            serde_json::from_str::<serde_json::Value>(v).expect("json")["message"]
                .as_str()
                .expect("message")
                .to_string()
        })
        .collect();
    assert_eq!(messages, log.lines().collect::<Vec<_>>());
}

/// S3 refusing writes (`503 SlowDown`) for 20 s, longer than the client's own five attempts,
/// as the worker ends: its log is stored once S3 takes writes again. The worker's spool goes
/// with its pod, so before, such a log was lost (only the end the controller writes stayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_s3_refuses_for_a_while_is_stored_once_it_takes_writes_again() {
    use buildshuttle::storage::{S3Storage, Storage};
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    common::require_s3();
    const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    let refusing_until = Arc::new(Mutex::new(None::<Instant>));
    let until = refusing_until.clone();
    let front = common::proxy(
        "127.0.0.1:9100",
        move |method, path, _| {
            let refusing = until.lock().unwrap().is_some_and(|t| Instant::now() < t);
            (refusing && method == "PUT" && path.contains(".logs"))
                .then_some(common::Reply::Status(503, SLOW_DOWN))
        },
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    let s3 = [
        ("S3_BUCKET", common::S3_BUCKET),
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_ACCESS_KEY", common::S3_ACCESS),
        ("S3_SECRET_KEY", common::S3_SECRET),
        ("S3_REGION", "us-east-1"),
    ];
    let s3: Vec<(String, String)> = s3
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    // Sources stored under a key nobody wrote: the build fails at once, and stores its log.
    let b = spec("wkrslow");
    let job = stored_job(&b);
    *refusing_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(20));
    let (d, j) = (dir.path().to_path_buf(), job.clone());
    let run = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = s3.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_worker(&d, &j, None, &env)
    })
    .await
    .expect("worker");
    assert_eq!(run.code, Some(1), "{:?}\n{}", run.outcome, run.stdout);
    let bucket = S3Storage::new(&buildshuttle::config::S3Config {
        bucket: common::S3_BUCKET.into(),
        keys: Some((
            Secret::new(common::S3_ACCESS),
            Secret::new(common::S3_SECRET),
        )),
        region: Some("us-east-1".into()),
        endpoint: Some(common::S3_ENDPOINT.into()),
        attempt_timeout: Duration::from_secs(120),
    })
    .await;
    let obj = bucket
        .get(&b.log_key())
        .await
        .expect("get")
        .expect("the log is in the bucket");
    let bytes: Vec<u8> = obj.body.map(|c| c.expect("chunk").to_vec()).concat().await;
    let log = String::from_utf8(bytes).expect("utf-8");
    assert_eq!(log.lines().last(), Some("Build finished"), "{log}");
}

/// The kubelet sends SIGTERM when the pod is deleted, evicted or past its deadline. While the
/// worker waits for dockerd (a dind sidecar that never comes up), it must stop at once and
/// say so in the termination log, not die silently or wait out DOCKER_WAIT_SECONDS.
#[test]
fn sigterm_while_waiting_for_dockerd_ends_the_worker_with_interrupted() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let term = dir.path().join("termination-log");
    let b = spec("wkrterm");
    let job = BuildJobSpec::from_build(
        &b,
        SourceRef {
            kind: SourceKind::Http,
            display: "http://127.0.0.1:9/a.tgz".into(),
            storage_key: None,
        },
    );
    let socket = dir.path().join("no-dockerd-here.sock");
    let settings = format!(r#"{{"socketPath":"{}"}}"#, socket.display());
    let mut child = worker_command(
        dir.path(),
        &job,
        Some("http://127.0.0.1:9/a.tgz"),
        &[
            ("DOCKER_BUILD_SETTINGS", settings.as_str()),
            ("DOCKER_WAIT_SECONDS", "300"),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .expect("the worker runs");
    // The first build line comes right before the wait for dockerd starts.
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().expect("a first line").expect("utf-8");
    assert!(first.contains("started"), "{first}");
    std::thread::sleep(Duration::from_millis(500));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    // Far below DOCKER_WAIT_SECONDS: the wait was cut short, not timed out.
    let status = exit_within(
        &mut child,
        Instant::now(),
        Duration::from_secs(60),
        "the worker ignored SIGTERM",
    );
    assert_eq!(status.code(), Some(1), "exited, not killed by the signal");
    let text = std::fs::read_to_string(&term).expect("termination log written");
    let outcome: Outcome = serde_json::from_str(&text).expect("an outcome");
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                reason: FailureReason::Interrupted,
                ..
            }
        ),
        "{outcome:?}"
    );
    // The log says it was cut, with its timings, and does not end: whether the build ends
    // here is the controller's call (a new pod runs it again, or the controller writes the
    // end), so a consumer reading up to `Build finished` misses no retry.
    let prefix = format!("[{}-{}] ", b.app, b.build_number);
    let build_lines: Vec<&str> = rest
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    assert!(
        build_lines
            .iter()
            .any(|l| l.starts_with("Build interrupted: ")),
        "the build log says why: {rest:?}"
    );
    assert!(
        build_lines
            .last()
            .is_some_and(|l| l.starts_with("Timings: ")),
        "its timings, last: {rest:?}"
    );
    assert!(
        !build_lines.contains(&"Build finished"),
        "no end of its own: {rest:?}"
    );
}

/// The worker's stdout is its pod log. A reader that keeps up, however slowly, gets every
/// line of a 10 MiB build output (the build waits for it); one that stops reading holds the
/// build up for at most 10 s, then the worker goes on, its stored log whole, and says so.
#[test]
fn the_pod_log_gets_every_line_unless_its_reader_stops() {
    use std::io::Read;
    let loud = |b: &BuildSpec, dir: &Path| {
        let df = format!(
            "FROM test/busybox:latest\nRUN echo {} && seq 1 200000 | sed 's/$/ a line of build output, fifty bytes long/'\n",
            uuid::Uuid::new_v4()
        );
        store(dir, &b.source_key(), &targz(&[("Dockerfile", &df)]));
    };
    // A slow reader: 64 KiB every 100 ms (640 KiB/s, far slower than the build prints).
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkrslowout");
    loud(&b, dir.path());
    let mut child = worker_command(dir.path(), &stored_job(&b), None, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the worker runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut got = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        let n = stdout.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(child.wait().expect("wait").success());
    let text = String::from_utf8_lossy(&got);
    for n in [1, 100_000, 200_000] {
        assert!(
            text.contains(&format!("[wkrslowout-3] {n} a line of build output")),
            "line {n} missing"
        );
    }
    assert!(text.ends_with("[wkrslowout-3] Build finished\n"));

    // A reader that never reads.
    let dir = tempfile::tempdir().expect("tempdir");
    let b = spec("wkrnoout");
    loud(&b, dir.path());
    let err = dir.path().join("stderr");
    let started = std::time::Instant::now();
    let mut child = worker_command(dir.path(), &stored_job(&b), None, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err).expect("stderr"))
        .spawn()
        .expect("the worker runs");
    let _unread = child.stdout.take();
    let status = exit_within(
        &mut child,
        started,
        std::time::Duration::from_secs(120),
        "the worker waits for a reader that has stopped",
    );
    assert!(status.success());
    let said = std::fs::read_to_string(&err).expect("stderr");
    assert!(said.contains("took no output for 10s"), "{said}");
    let log = std::fs::read_to_string(dir.path().join("data/store").join(b.log_key()))
        .expect("stored log");
    assert!(log.contains("200000 a line of build output"));
}
