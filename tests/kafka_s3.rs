//! Kafka log delivery and S3 storage, end to end: real builds on the test dockerd and
//! registry, librdkafka's mock cluster as the broker (read back with a real consumer), and
//! s3s-fs on 127.0.0.1:9100 (started by `.ci/services`) as the bucket.

mod common;

use common::kafka::consume_build;
use common::{
    body, build_path, cache_buster, data_uri, logs_path, require_s3, s3_flags_at, tar_gz,
    Callbacks, Service, S3_ACCESS, S3_BUCKET, S3_ENDPOINT, S3_SECRET,
};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BUILD_WITHIN: Duration = Duration::from_secs(120);

fn s3_flags() -> Vec<&'static str> {
    s3_flags_at(S3_ENDPOINT)
}

/// Sources whose build prints a few known lines, then a cache-busting step.
fn archive(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let dockerfile = format!(
        "FROM test/busybox:latest\n{}\nRUN echo kafka-line-one && echo 'kafka \"quoted\" line'\nCOPY . /app\n",
        cache_buster()
    );
    let mut entries: Vec<(&str, &[u8])> = vec![("Dockerfile", dockerfile.as_bytes())];
    entries.extend_from_slice(extra);
    tar_gz(&entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_gets_every_log_line_in_order_ending_with_build_finished() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "buildlogs-test";
    // Several partitions, so in-order delivery depends on the per-build key.
    cluster.create_topic(topic, 3, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    assert!(
        bootstrap.starts_with("127.0.0.1:") || bootstrap.starts_with("localhost:"),
        "{bootstrap}"
    );

    let svc = Service::start(&["--kafka-topic", topic]).await;
    let cbs = Callbacks::start().await;
    let mut b = body(&data_uri(&archive(&[])), &cbs);
    b["build_number"] = 7.into();
    b["space"] = "perf".into();
    b["kafka_hosts"] = bootstrap.clone().into();
    let id = b["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&b).await.0, 200);
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "succeeded");

    let app = b["app"].as_str().unwrap().to_string();
    let key = format!("{app}-{}-7", b["app_uuid"].as_str().unwrap());
    let msgs = tokio::task::spawn_blocking({
        let (bootstrap, key) = (bootstrap.clone(), key.clone());
        move || consume_build(bootstrap, topic.to_string(), key)
    })
    .await
    .unwrap();

    // The stored log is the reference: Kafka must carry exactly its lines, in its order.
    let stored = svc.log(&b).await;
    let lines: Vec<&str> = stored.lines().collect();
    assert_eq!(lines.last(), Some(&"Build finished"));
    assert!(
        stored.contains("kafka-line-one") && stored.contains("kafka \"quoted\" line"),
        "{stored}"
    );
    assert_eq!(
        msgs.len(),
        lines.len(),
        "messages: {msgs:#?}\nlog:\n{stored}"
    );
    let metadata = format!("{app}-perf");
    for ((k, value), line) in msgs.iter().zip(&lines) {
        assert_eq!(k, &key);
        // Field by field, and the raw bytes in the legacy field order.
        let v: Value = serde_json::from_str(value).unwrap();
        assert_eq!(v["metadata"], metadata.as_str());
        assert_eq!(v["build"], 7);
        assert_eq!(v["job"], "7");
        assert_eq!(v["message"], *line);
        assert_eq!(v.as_object().unwrap().len(), 4);
        let expected = format!(
            r#"{{"metadata":{},"build":7,"job":"7","message":{}}}"#,
            serde_json::to_string(&metadata).unwrap(),
            serde_json::to_string(line).unwrap()
        );
        assert_eq!(value, &expected);
    }
}

/// Collects the service's tracing output (this test binary runs each test in its own process).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_neither_fails_nor_stalls_the_build() {
    let captured = Captured::default();
    let writer = captured.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init();

    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let svc = Service::start(&["--kafka-delivery-timeout-ms", "2000"]).await;
    let cbs = Callbacks::start().await;
    let mut b = body(&data_uri(&archive(&[])), &cbs);
    b["kafka_hosts"] = format!("127.0.0.1:{port}").into();
    let id = b["build_uuid"].as_str().unwrap().to_string();
    let started = Instant::now();
    assert_eq!(svc.post(&b).await.0, 200);
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "succeeded");
    let took = started.elapsed();
    // A build here takes a few seconds; the dead broker may add at most the 2 s wait.
    assert!(took < Duration::from_secs(60), "build took {took:?}");

    let log = svc.log(&b).await;
    assert!(
        log.contains("kafka-line-one") && log.contains("Successfully built"),
        "{log}"
    );
    assert!(log.ends_with("Build finished\n"), "{log}");

    let key = format!(
        "{}-{}-1",
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap()
    );
    // Kafka delivery runs beside the final callback (never before it), so its warning may
    // come after the callback: wait for it, then make sure no second one follows.
    let waited = Instant::now();
    let warned = |out: &str| {
        out.lines()
            .filter(|l| l.contains("WARN") && l.contains("not delivered to Kafka"))
            .count()
    };
    while warned(&String::from_utf8_lossy(&captured.0.lock().unwrap())) == 0
        && waited.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("not delivered to Kafka"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning per build expected:\n{out}");
    let lines = log.lines().count();
    assert!(
        warnings[0].contains(&key) && warnings[0].contains(&format!("undelivered={lines}")),
        "warning should name the build and count all {lines} lines: {}",
        warnings[0]
    );
}

/// The object as s3s-fs keeps it on disk, to check the bytes really went to the bucket.
fn s3_config() -> buildshuttle::config::S3Config {
    buildshuttle::config::S3Config {
        bucket: S3_BUCKET.into(),
        keys: Some((
            buildshuttle::secret::Secret::new(S3_ACCESS),
            buildshuttle::secret::Secret::new(S3_SECRET),
        )),
        region: Some("us-east-1".into()),
        endpoint: Some(S3_ENDPOINT.into()),
        attempt_timeout: Duration::from_secs(120),
    }
}

fn s3_file(key: &str) -> std::path::PathBuf {
    let state = std::env::var("BUILDSHUTTLE_TEST_STATE")
        .unwrap_or_else(|_| "/tmp/buildshuttle-test".into());
    std::path::Path::new(&state)
        .join("s3")
        .join(S3_BUCKET)
        .join(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_keeps_sources_and_logs_byte_for_byte() {
    let svc = Service::start(&s3_flags()).await;
    let cbs = Callbacks::start().await;
    // Incompressible filler, so the archive is not trivially small.
    let filler: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sources = archive(&[("filler.bin", &filler)]);
    let b = body(&data_uri(&sources), &cbs);
    let id = b["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&b).await.0, 200);
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "succeeded");

    let resp = svc
        .client
        .get(svc.url(&format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), sources.as_slice());
    assert_eq!(std::fs::read(s3_file(&id)).unwrap(), sources);
    let head = svc
        .client
        .head(svc.url(&format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let unknown = uuid::Uuid::new_v4();
    let missing = svc
        .client
        .get(svc.url(&format!("/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let missing = svc
        .client
        .head(svc.url(&format!("/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // The finished log left the local spool and is served from the bucket.
    let key = format!(
        "{}-{}-1.logs",
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap()
    );
    let spool = svc.data.path().join("logs").join(&key);
    let start = Instant::now();
    while spool.exists() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!spool.exists(), "spooled log not removed after upload");
    let log = svc.log(&b).await;
    assert!(
        log.contains("kafka-line-one") && log.ends_with("Build finished\n"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(s3_file(&key)).unwrap(), log);
    // Follow mode on a finished build returns the whole stored log and ends.
    let followed = svc
        .client
        .get(svc.url(&format!("{}?follow=true", logs_path(&b))))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(followed, log);
}

/// What S3 answers a request its policy denies.
const ACCESS_DENIED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";

/// The bucket as keys without `s3:ListBucket` see it (AWS's documented answers): HeadBucket
/// and listing are denied, and a missing object is 403 `AccessDenied`, not 404.
async fn s3_without_listing() -> String {
    let bucket = format!("/{S3_BUCKET}");
    common::proxy(
        "127.0.0.1:9100",
        move |method, path, _| {
            let (at, query) = path.split_once('?').unwrap_or((path, ""));
            let the_bucket = at.trim_end_matches('/') == bucket;
            let head_bucket = method == "HEAD" && the_bucket;
            let list = method == "GET" && the_bucket && !query.contains("uploads");
            if head_bucket {
                Some(common::Reply::Status(403, ""))
            } else if list {
                Some(common::Reply::Status(403, ACCESS_DENIED))
            } else {
                None
            }
        },
        |method, status| {
            (status == 404 && matches!(method, "GET" | "HEAD")).then_some((403, ACCESS_DENIED))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_list_the_bucket_start_and_read_a_missing_object_as_missing() {
    require_s3();
    let endpoint = format!("http://{}", s3_without_listing().await);
    let flags = s3_flags_at(&endpoint);
    // Wrong keys are still told apart: the probe's 403 says SignatureDoesNotMatch.
    let mut wrong = flags.clone();
    let at = wrong.iter().position(|f| *f == S3_SECRET).unwrap();
    wrong[at] = "wrong-secret-value";
    let e = start_error(&wrong).await;
    assert!(e.starts_with("S3_ACCESS_KEY:"), "{e}");

    let svc = Service::start(&flags).await;
    let unknown = uuid::Uuid::new_v4();
    let get = svc
        .client
        .get(svc.url(&format!("/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 404);
    let head = svc
        .client
        .head(svc.url(&format!("/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    let no_log = format!("/app-{}/1/logs", uuid::Uuid::new_v4());
    let log = svc.client.get(svc.url(&no_log)).send().await.unwrap();
    assert_eq!(log.status(), 404);

    // Objects that exist are written and read through the same keys.
    let cbs = Callbacks::start().await;
    let sources = archive(&[]);
    let b = body(&data_uri(&sources), &cbs);
    let id = b["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&b).await.0, 200);
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "succeeded");
    let got = svc
        .client
        .get(svc.url(&format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), sources.as_slice());
    let key = format!(
        "{}-{}-1.logs",
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap()
    );
    let start = Instant::now();
    while !s3_file(&key).exists() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(svc.log(&b).await.ends_with("Build finished\n"));
}

/// S3 (s3s-fs behind a proxy) that sends a stored log's headers and its first 64 KiB, then
/// nothing more: the real binary cuts `GET …/logs` short (the SDK's stalled-stream
/// protection: 5 s without a byte) instead of holding the request for ever, names the object
/// and the cause in its log, and keeps serving (another log through the same S3 comes whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_s3_body_stalls_is_cut_short_and_the_object_named() {
    use buildshuttle::storage::{S3Storage, Storage};
    use futures::StreamExt;
    require_s3();
    const SENT: usize = 64 * 1024;
    let app_uuid = uuid::Uuid::new_v4();
    let stalled = format!("stall-{app_uuid}-1.logs");
    let whole = format!("stall-{app_uuid}-2.logs");
    // 1 MiB of log lines, put straight into the bucket as a finished build's log.
    let log: String = (0..16_384)
        .map(|i| format!("Step {i:>10} : RUN echo a line of a long build log, 64 bytes\n"))
        .collect();
    assert_eq!(log.len(), 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log");
    std::fs::write(&file, &log).unwrap();
    let store = S3Storage::new(&s3_config()).await;
    for key in [&stalled, &whole] {
        store.put_file(key, &file).await.unwrap();
    }
    let object = format!("/{S3_BUCKET}/{stalled}");
    let front = common::proxy(
        "127.0.0.1:9100",
        move |method, path, _| {
            (method == "GET" && path.starts_with(&object))
                .then_some(common::Reply::StallAfter(SENT))
        },
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    let err_path = dir.path().join("stderr");
    let shuttle = common::bin::spawn_with_output(
        &dir.path().join("data"),
        common::bin::free_port(),
        &[
            ("S3_BUCKET", S3_BUCKET),
            ("S3_ENDPOINT", &endpoint),
            ("S3_ACCESS_KEY", S3_ACCESS),
            ("S3_SECRET_KEY", S3_SECRET),
            ("S3_REGION", "us-east-1"),
        ],
        std::process::Stdio::null(),
        std::process::Stdio::from(std::fs::File::create(&err_path).unwrap()),
    );

    let started = Instant::now();
    let resp = reqwest::get(shuttle.url(&format!("/stall-{app_uuid}/1/logs")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(log.len() as u64));
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk?);
        }
        Ok::<_, reqwest::Error>(())
    })
    .await
    .expect("the response ends within 15 s instead of hanging");
    let took = started.elapsed();
    assert!(end.is_err(), "cut short, not ended as if whole");
    assert_eq!(got.len(), SENT);
    assert!(log.as_bytes().starts_with(&got));
    assert!(took >= Duration::from_secs(4), "{took:?}");
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        err.contains(&format!("S3 stopped sending the object {stalled} part-way"))
            && err.contains("minimum throughput"),
        "{err}"
    );

    // The service goes on: another log through the same S3 comes whole.
    let other = reqwest::get(shuttle.url(&format!("/stall-{app_uuid}/2/logs")))
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(other.text().await.unwrap(), log);
    let health = reqwest::get(shuttle.url("/octhc")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_fetches_sources_from_the_services_own_url() {
    let svc = Service::start(&s3_flags()).await;
    let cbs = Callbacks::start().await;
    let sources = archive(&[("app.txt", b"rebuild me")]);
    let first = body(&data_uri(&sources), &cbs);
    let first_id = first["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&first).await.0, 200);
    assert_eq!(cbs.wait_final(&first_id, BUILD_WITHIN).await, "succeeded");

    // What controller-api does for a rebuild: sources = this service's GET /{build_uuid}.
    let mut second = body(&svc.url(&format!("/{first_id}")), &cbs);
    second["app"] = first["app"].clone();
    second["app_uuid"] = first["app_uuid"].clone();
    second["build_number"] = 2.into();
    let second_id = second["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&second).await.0, 200);
    assert_eq!(cbs.wait_final(&second_id, BUILD_WITHIN).await, "succeeded");
    let log = svc.log(&second).await;
    assert!(log.contains("kafka-line-one"), "{log}");
    let again = svc
        .client
        .get(svc.url(&format!("/{second_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.bytes().await.unwrap().as_ref(), sources.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_a_running_builds_log_from_the_spool_then_ends() {
    let svc = Service::start(&s3_flags()).await;
    let cbs = Callbacks::start().await;
    let dockerfile = format!(
        // Arithmetic, so the printed markers differ from the echoed `Step` line.
        "FROM test/busybox:latest\n{}\nRUN echo early-$((40+2)) && sleep 4 && echo late-$((40+2))\n",
        cache_buster()
    );
    let b = body(
        &data_uri(&tar_gz(&[("Dockerfile", dockerfile.as_bytes())])),
        &cbs,
    );
    let id = b["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&b).await.0, 200);
    svc.wait_log(&b, "Build ", Duration::from_secs(30)).await;

    let mut resp = svc
        .client
        .get(svc.url(&format!("{}?follow=true", logs_path(&b))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    let mut early_seen_while_running = false;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("early-42") && !text.contains("late-42") && cbs.calls_for(&id).len() < 2 {
            early_seen_while_running = true;
        }
    }
    assert!(
        early_seen_while_running,
        "follow did not show lines before the build ended:\n{text}"
    );
    assert!(text.ends_with("Build finished\n"), "{text}");
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "succeeded");
    assert_eq!(text, svc.log(&b).await);
}

async fn start_error(extra: &[&str]) -> String {
    use clap::Parser;
    let data = tempfile::tempdir().unwrap();
    let mut argv = vec![
        "buildshuttle",
        "serve",
        "--port",
        "0",
        "--listen-address",
        "127.0.0.1",
    ];
    let dir = data.path().display().to_string();
    argv.extend(["--data-dir", dir.as_str()]);
    argv.extend(extra);
    let cli = buildshuttle::config::Cli::try_parse_from(argv).unwrap();
    // More subcommands are coming (worker, crd); keep the else.
    #[allow(irrefutable_let_patterns)]
    let buildshuttle::config::Command::Serve(args) = cli.command
    else {
        panic!("not serve")
    };
    let cfg = args.validate().unwrap();
    match buildshuttle::serve::start(cfg).await {
        Ok(_) => panic!("started with {extra:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unusable_s3_is_a_start_error_naming_the_variable() {
    require_s3();
    let base = |bucket: &'static str, endpoint: String, secret: &'static str| {
        vec![
            "--s3-bucket".to_string(),
            bucket.into(),
            "--s3-endpoint".into(),
            endpoint,
            "--s3-access-key".into(),
            S3_ACCESS.into(),
            "--s3-secret-key".into(),
            secret.into(),
        ]
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        start_error(&refs).await
    };

    let e = run(base(S3_BUCKET, S3_ENDPOINT.into(), "wrong-secret-value")).await;
    assert!(e.starts_with("S3_ACCESS_KEY:"), "{e}");
    assert!(
        !e.contains("wrong-secret-value") && !e.contains('\n'),
        "{e}"
    );

    let e = run(base("no-such-bucket-here", S3_ENDPOINT.into(), S3_SECRET)).await;
    assert!(
        e.starts_with("S3_BUCKET:") && e.contains("no-such-bucket-here"),
        "{e}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = run(base(
        S3_BUCKET,
        format!("http://127.0.0.1:{port}"),
        S3_SECRET,
    ))
    .await;
    assert!(
        e.starts_with("S3_ENDPOINT:") && e.contains(&port.to_string()),
        "{e}"
    );

    // A server that accepts connections and never answers: bounded by S3_TIMEOUT_SECONDS
    // per attempt, not a start that hangs.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hanging.local_addr().unwrap().port();
    let mut args = base(S3_BUCKET, format!("http://127.0.0.1:{port}"), S3_SECRET);
    args.extend(["--s3-timeout-seconds".to_string(), "1".to_string()]);
    let e = tokio::time::timeout(Duration::from_secs(60), run(args))
        .await
        .expect("the start ends");
    assert!(e.starts_with("S3_ENDPOINT:"), "{e}");
    drop(hanging);
}

#[test]
fn the_binary_exits_2_with_one_line_on_wrong_s3_credentials() {
    require_s3();
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_buildshuttle"))
        .arg("serve")
        .env("PORT", "0")
        .env("LISTEN_ADDRESS", "127.0.0.1")
        .env("DATA_DIR", data.path())
        .env("S3_BUCKET", S3_BUCKET)
        .env("S3_ENDPOINT", S3_ENDPOINT)
        .env("S3_ACCESS_KEY", S3_ACCESS)
        .env("S3_SECRET_KEY", "definitely-wrong-secret")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("buildshuttle: S3_ACCESS_KEY:"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("definitely-wrong-secret"), "{stderr}");
}

#[tokio::test]
async fn large_objects_go_up_in_parts_and_come_back_intact() {
    use buildshuttle::storage::{S3Storage, Storage, PART_SIZE};
    require_s3();
    let store = S3Storage::new(&s3_config()).await;
    store.check().await.unwrap();
    // Two full parts and a short one.
    let len = 2 * PART_SIZE as usize + 123_457;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    let key = format!("multipart-{}", uuid::Uuid::new_v4());
    store.put_file(&key, &path).await.unwrap();
    assert!(store.exists(&key).await.unwrap());
    let obj = store.get(&key).await.unwrap().unwrap();
    assert_eq!(obj.len, Some(len as u64));
    let got = collect(obj.body).await;
    assert!(got == data, "downloaded bytes differ");
    // Resuming reads only the rest, wherever it starts, and nothing past the end.
    for offset in [
        1,
        PART_SIZE + 7,
        len as u64 - 1,
        len as u64,
        len as u64 + 10,
    ] {
        let obj = store.get_from(&key, offset).await.unwrap().unwrap();
        let rest = collect(obj.body).await;
        let start = (offset as usize).min(len);
        assert_eq!(rest.len(), len - start, "from {offset}");
        assert!(rest == data[start..], "bytes from {offset} differ");
    }
    assert!(store.get_from("multipart-nope", 5).await.unwrap().is_none());
    assert!(store.get("multipart-nope").await.unwrap().is_none());
    assert!(!store.exists("multipart-nope").await.unwrap());
    let _ = std::fs::remove_file(s3_file(&key));
    // An empty object (a build that logged nothing) has nothing past any offset.
    let empty_key = format!("empty-{}", uuid::Uuid::new_v4());
    std::fs::write(&path, b"").unwrap();
    store.put_file(&empty_key, &path).await.unwrap();
    for offset in [0, 3] {
        let obj = store.get_from(&empty_key, offset).await.unwrap().unwrap();
        assert!(collect(obj.body).await.is_empty(), "from {offset}");
    }
    let _ = std::fs::remove_file(s3_file(&empty_key));
}

/// A multipart upload given up half way (a stopped build drops its store task) is aborted:
/// its parts would otherwise stay in the bucket, billed, for ever.
#[tokio::test]
async fn an_upload_given_up_half_way_is_aborted() {
    use base64::Engine;
    use buildshuttle::storage::{S3Storage, Storage, PART_SIZE};
    require_s3();
    let store = S3Storage::new(&s3_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    std::fs::write(&path, vec![7u8; 6 * PART_SIZE as usize]).unwrap();
    let key = format!("given-up-{}", uuid::Uuid::new_v4());
    // s3s-fs keeps an open upload's metadata beside the bucket until it is completed or aborted.
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let marker = format!(".bucket-{}.object-{}.upload-", b64(S3_BUCKET), b64(&key));
    let root = s3_file("x")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let names = || -> Vec<String> {
        std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let upload_id = || -> Option<String> {
        names().iter().find_map(|n| {
            let id = n.strip_prefix(&marker)?.strip_suffix(".metadata.json")?;
            Some(id.to_string())
        })
    };
    // Its metadata and its parts (stored under the upload's id).
    let open_uploads = |id: &str| {
        let part = format!(".upload_id-{id}.part-");
        names()
            .iter()
            .filter(|n| n.starts_with(&marker) || n.starts_with(&part))
            .count()
    };
    let upload = {
        let (store, key, path) = (store.clone(), key.clone(), path.clone());
        tokio::spawn(async move { store.put_file(&key, &path).await })
    };
    // Given up once parts are going up (the client has the upload's id by then; a stop in
    // the moment between the server's answer and its arrival leaves the upload to the
    // bucket's lifecycle rule, see the README).
    let t = std::time::Instant::now();
    let id = loop {
        if let Some(id) = upload_id().filter(|id| open_uploads(id) > 1) {
            break id;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the upload never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    upload.abort();
    assert!(
        upload.await.unwrap_err().is_cancelled(),
        "given up before it ended"
    );
    let t = std::time::Instant::now();
    while open_uploads(&id) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the upload was left open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.get(&key).await.unwrap().is_none());
}

async fn collect(
    mut body: futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
) -> Vec<u8> {
    use futures::StreamExt;
    let mut got = Vec::new();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_a_build_stopped_while_queued_has_its_log_in_the_bucket_and_on_kafka() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = "buildlogs-stopped";
    cluster.create_topic(topic, 1, 1).expect("topic");
    let mut flags = s3_flags();
    flags.extend(["--maximum-parallel-builds", "1", "--kafka-topic", topic]);
    let svc = Service::start(&flags).await;
    let cbs = Callbacks::start().await;
    let slow = format!(
        "FROM test/busybox:latest\n{}\nRUN sleep 5\n",
        cache_buster()
    );
    let first = body(&data_uri(&tar_gz(&[("Dockerfile", slow.as_bytes())])), &cbs);
    assert_eq!(svc.post(&first).await.0, 200);
    svc.wait_log(&first, "Building ", Duration::from_secs(30))
        .await;

    let mut queued = body(&data_uri(&archive(&[])), &cbs);
    queued["kafka_hosts"] = cluster.bootstrap_servers().into();
    let id = queued["build_uuid"].as_str().unwrap().to_string();
    assert_eq!(svc.post(&queued).await.0, 200);
    let stop = build_path(&queued);
    let resp = svc.client.delete(svc.url(&stop)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(cbs.wait_final(&id, BUILD_WITHIN).await, "failed");

    let key = format!(
        "{}-{}-1.logs",
        queued["app"].as_str().unwrap(),
        queued["app_uuid"].as_str().unwrap()
    );
    let in_bucket = std::fs::read_to_string(s3_file(&key)).unwrap_or_default();
    assert!(
        in_bucket.contains("before it started"),
        "bucket copy: {in_bucket:?}"
    );
    assert!(
        !svc.data.path().join("logs").join(&key).exists(),
        "spool file left behind"
    );
    assert_eq!(svc.log(&queued).await, in_bucket);

    // The log consumers hear why, and that it is over.
    let msgs = tokio::task::spawn_blocking({
        let (bootstrap, key) = (
            cluster.bootstrap_servers(),
            key.trim_end_matches(".logs").to_string(),
        );
        move || consume_build(bootstrap, topic.to_string(), key)
    })
    .await
    .unwrap();
    let lines: Vec<String> = msgs
        .iter()
        .map(|(_, v)| {
            serde_json::from_str::<Value>(v).unwrap()["message"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("before it started"), "{lines:?}");
    assert_eq!(lines[1], "Build finished");
    let first_id = first["build_uuid"].as_str().unwrap();
    assert_eq!(cbs.wait_final(first_id, BUILD_WITHIN).await, "succeeded");
}

/// Local mode with S3 refusing log writes (`503 SlowDown`) as builds end: each log is served
/// from the spool meanwhile, and stored once S3 takes writes again, by this process in the
/// background, or by the next one when this one was killed first. Before, such a log stayed
/// on this host for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_s3_refused_are_stored_later_and_after_a_restart() {
    require_s3();
    const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    let refusing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refuse = refusing.clone();
    let front = common::proxy(
        "127.0.0.1:9100",
        move |method, path, _| {
            (refuse.load(std::sync::atomic::Ordering::SeqCst)
                && method == "PUT"
                && path.contains(".logs"))
            .then_some(common::Reply::Status(503, SLOW_DOWN))
        },
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    let env = [
        ("S3_BUCKET", S3_BUCKET),
        ("S3_ENDPOINT", endpoint.as_str()),
        ("S3_ACCESS_KEY", S3_ACCESS),
        ("S3_SECRET_KEY", S3_SECRET),
        ("S3_REGION", "us-east-1"),
    ];
    let data = tempfile::tempdir().unwrap();
    let cbs = Callbacks::start().await;
    let log_key = |b: &Value| {
        format!(
            "{}-{}-{}.logs",
            b["app"].as_str().unwrap(),
            b["app_uuid"].as_str().unwrap(),
            b["build_number"]
        )
    };
    // Sources nobody serves: each build fails at once, and its log is handed to S3.
    let failing = || body("http://127.0.0.1:9/nothing-here.tgz", &cbs);
    let stored_within = |key: String, within: Duration| async move {
        let started = Instant::now();
        loop {
            let stored = std::fs::read_to_string(s3_file(&key)).unwrap_or_default();
            if stored.ends_with("Build finished\n") {
                return stored;
            }
            assert!(started.elapsed() < within, "{key} never reached the bucket");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // The build's own tries (the S3 client's) are over once the service says so.
    let stderr = data.path().join("stderr");
    let given_up = |key: String| {
        let stderr = stderr.clone();
        async move {
            let started = Instant::now();
            loop {
                let said = std::fs::read_to_string(&stderr).unwrap_or_default();
                if said
                    .lines()
                    .any(|l| l.contains(&key) && l.contains("stays in the local spool"))
                {
                    return;
                }
                assert!(started.elapsed() < BUILD_WITHIN, "{said}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // 1. Stored later by the process that ran the build.
    let shuttle = common::bin::spawn_with_output(
        data.path(),
        common::bin::free_port(),
        &env,
        std::process::Stdio::null(),
        std::process::Stdio::from(std::fs::File::create(&stderr).unwrap()),
    );
    let first = failing();
    shuttle.post(&first).await;
    let id = first["build_uuid"].as_str().unwrap();
    assert_eq!(cbs.wait_final(id, BUILD_WITHIN).await, "failed");
    let key = log_key(&first);
    given_up(key.clone()).await;
    let spooled = data.path().join("logs").join(&key);
    assert!(!s3_file(&key).exists(), "S3 refused it");
    assert!(spooled.exists(), "kept in the spool");
    let served = shuttle.log(&first).await;
    assert!(served.ends_with("Build finished\n"), "{served:?}");
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let stored = stored_within(key.clone(), Duration::from_secs(60)).await;
    assert_eq!(stored, served);
    for _ in 0..50 {
        if !spooled.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!spooled.exists(), "the spool file goes once stored");
    assert_eq!(shuttle.log(&first).await, served, "now served from S3");

    // 2. The process is killed before S3 takes the log: the next one stores it.
    refusing.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut second = failing();
    second["build_number"] = 2.into();
    shuttle.post(&second).await;
    let id = second["build_uuid"].as_str().unwrap();
    assert_eq!(cbs.wait_final(id, BUILD_WITHIN).await, "failed");
    let key = log_key(&second);
    given_up(key.clone()).await;
    shuttle.signal("-KILL");
    drop(shuttle);
    assert!(!s3_file(&key).exists(), "S3 refused it");
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    let again = common::bin::spawn(data.path(), common::bin::free_port(), &env);
    // At once, not after the first pause of a retry.
    let stored = stored_within(key.clone(), Duration::from_secs(4)).await;
    assert!(stored.contains("nothing-here"), "{stored}");
    assert_eq!(again.log(&second).await, stored);
}
