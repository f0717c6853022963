//! Per-stage timings (log, /metrics, the local record, in order; never their values) and
//! warm rebuilds on an empty daemon (the previous image pulled from the registry as the
//! layer cache). The second, empty dockerd comes from `.ci/services`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const BUILD: Duration = Duration::from_secs(180);

/// The stage names of a `Timings:` line, in the order they appear.
fn stage_names(line: &str) -> Vec<String> {
    line.trim_start_matches("Timings: ")
        .split(", ")
        .map(|part| {
            let mut words = part.split(' ');
            let name = words.next().unwrap_or_default().to_string();
            assert!(
                words.next().is_some_and(|ms| ms.parse::<u64>().is_ok())
                    && words.next() == Some("ms"),
                "not `<stage> <n> ms`: {part:?} in {line:?}"
            );
            name
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_build_reports_its_stage_timings_in_the_log_metrics_and_record() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let df = format!("FROM {BASE_IMAGE}\n{}\nRUN echo timed\n", cache_buster());
    let b = body(&data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())])), &cb);
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(svc.post(&b).await.0, 200);
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&b).await
    );

    // The log: one summary line, just before `Build finished`, stages in pipeline order.
    let log = svc.log(&b).await;
    let lines: Vec<&str> = log.lines().collect();
    let summary: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("Timings: "))
        .collect();
    assert_eq!(summary.len(), 1, "{log}");
    assert_eq!(lines[lines.len() - 2], *summary[0], "{log}");
    assert_eq!(
        stage_names(summary[0]),
        ["queued", "fetch", "context", "cache", "build", "push", "total"],
        "{log}"
    );

    // The record keeps every stage, the callbacks' included (written once delivered).
    // The state is a journal of record lines (segments, snapshot, done.log): the build's
    // last line with its final callback done.
    let state = svc.data.path().join("state");
    let last_final = || -> Option<Value> {
        let mut found = None;
        for entry in std::fs::read_dir(&state).ok()?.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines() {
                let Ok(rec) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if rec["spec"]["build_uuid"] == json!(id) && rec["final_sent"] == json!(true) {
                    found = Some(rec);
                }
            }
        }
        found
    };
    let started = Instant::now();
    let timings = loop {
        if let Some(rec) = last_final() {
            break rec["timings"].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no final record for {id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for stage in [
        "queued",
        "fetch",
        "context",
        "cache",
        "build",
        "push",
        "total",
        "callback_pending",
        "callback_final",
    ] {
        assert!(timings[stage].is_u64(), "{stage} missing in {timings}");
    }

    // /metrics: one histogram, a `stage` label per stage.
    let metrics = svc
        .client
        .get(svc.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for stage in [
        "queued",
        "fetch",
        "context",
        "build",
        "push",
        "total",
        "callback_final",
    ] {
        let count = format!("buildshuttle_build_stage_duration_seconds_count{{stage=\"{stage}\"}}");
        assert!(metrics.contains(&count), "{count} missing:\n{metrics}");
    }
}

const DOCKERD2: &str = "/tmp/buildshuttle-test/dockerd2/docker.sock";

fn dockerd2() -> bollard::Docker {
    let socket = std::env::var("BUILDSHUTTLE_TEST_STATE")
        .map(|s| format!("{s}/dockerd2/docker.sock"))
        .unwrap_or_else(|_| DOCKERD2.into());
    assert!(
        std::path::Path::new(&socket).exists(),
        "the second dockerd is not running: run `bash .ci/services`"
    );
    bollard::Docker::connect_with_unix(&socket, 120, bollard::API_DEFAULT_VERSION)
        .expect("second dockerd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_on_an_empty_daemon_reuses_the_layers_of_the_pushed_latest_image() {
    let second = dockerd2();
    let settings = json!({ "socketPath": DOCKERD2 }).to_string();
    let cb = Callbacks::start().await;
    // RUN steps no daemon has seen before: only the registry's :latest can make them cached.
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let df = format!(
        "FROM {REGISTRY}/base/busybox:1\nRUN echo warm-one-{marker} > /one\nRUN echo warm-two-{marker} > /two\nCOPY app.txt /app.txt\n"
    );
    let archive = tar_gz(&[("Dockerfile", df.as_bytes()), ("app.txt", b"unchanged")]);

    // First build on the main daemon: nothing to pull yet, which is not an error.
    let first_svc = Service::start(&[]).await;
    let first = body(&data_uri(&archive), &cb);
    first_svc.post(&first).await;
    assert_eq!(
        cb.wait_final(first["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        first_svc.log(&first).await
    );
    let log = first_svc.log(&first).await;
    assert!(
        log.contains("No previous image to use as the layer cache"),
        "{log}"
    );

    // The same app, unchanged, on the same daemon: every step from the local `latest`, which
    // is the image relabelled in the registry (loaded, so no parent images of its own).
    let latest = format!("{REGISTRY}/{}:latest", image_repo(&first));
    local_labels(&latest, first["build_uuid"].as_str().unwrap()).await;
    let log = rebuild(&first_svc, &first, &archive, &cb).await;
    assert!(log.contains(&format!("{latest} is already here")), "{log}");
    for step in ["RUN echo warm-one", "RUN echo warm-two", "COPY app.txt"] {
        assert!(step_cached(&log, step), "{step} was not cached:\n{log}");
    }

    // The same app, unchanged, on the empty daemon.
    assert!(
        second.inspect_image(&latest).await.is_err(),
        "the second daemon must not have the image yet"
    );
    let svc = Service::start(&["--docker-build-settings", &settings]).await;
    let log = rebuild(&svc, &first, &archive, &cb).await;
    assert_warm_from(
        &log,
        &latest,
        &["RUN echo warm-one", "RUN echo warm-two", "COPY app.txt"],
    );

    // NO_CACHE turns the pull off.
    let nc = Service::start(&["--docker-build-settings", &settings, "--no-cache", "true"]).await;
    let mut cold = body(&data_uri(&archive), &cb);
    for key in ["app", "app_uuid"] {
        cold[key] = first[key].clone();
    }
    cold["build_number"] = json!(3);
    nc.post(&cold).await;
    assert_eq!(
        cb.wait_final(cold["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded"
    );
    let log = nc.log(&cold).await;
    assert!(!log.contains("layer cache") && !used_cache(&log), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_repository_keeps_every_apps_layer_cache_in_a_registry_of_its_own() {
    cache_repository_warms_an_empty_daemon(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildkit_rebuilds_warm_on_an_empty_daemon_from_the_inline_cache_of_a_private_registry() {
    // As in a dind pod: BuildKit, a fresh daemon, the cache image behind a password that
    // only BuildKit's session can give it.
    cache_repository_warms_an_empty_daemon(&["--docker-buildkit", "true"]).await;
}

/// A build with CACHE_REPOSITORY on the main daemon, then the same app rebuilt on the empty
/// second daemon, both with `builder` flags: every step of the rebuild comes from the cache.
async fn cache_repository_warms_an_empty_daemon(builder: &[&str]) {
    let second = dockerd2();
    let settings = json!({ "socketPath": DOCKERD2 }).to_string();
    let cb = Callbacks::start().await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    // The cache lives on the other (password-protected) registry: its credentials come from
    // EXTRA_DOCKER_REGISTRY_CONFIG, the app's from the request.
    let cache_path = format!("build-cache-{}", &marker[..12]);
    let cache = format!("{AUTH_REGISTRY}/{cache_path}");
    let extra =
        json!({ AUTH_REGISTRY: {"username": AUTH_USER, "password": AUTH_PASS} }).to_string();
    let df = format!(
        "FROM {REGISTRY}/base/busybox:1\nRUN echo cache-one-{marker} > /one\nRUN echo cache-two-{marker} > /two\nCOPY app.txt /app.txt\n"
    );
    let archive = tar_gz(&[("Dockerfile", df.as_bytes()), ("app.txt", b"unchanged")]);
    let flags = [
        &[
            "--cache-repository",
            cache.as_str(),
            "--extra-docker-registry-config",
            extra.as_str(),
        ],
        builder,
    ]
    .concat();

    let first_svc = Service::start(&flags).await;
    let first = body(&data_uri(&archive), &cb);
    first_svc.post(&first).await;
    assert_eq!(
        cb.wait_final(first["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        first_svc.log(&first).await
    );
    let app_key = format!(
        "{}-{}",
        first["app"].as_str().unwrap(),
        first["app_uuid"].as_str().unwrap()
    );
    let cached = format!("{cache}/{app_key}:latest");
    let log = first_svc.log(&first).await;
    assert!(
        log.contains("No previous image to use as the layer cache") && log.contains(&cached),
        "{log}"
    );
    assert!(!log.contains("Could not update the layer cache"), "{log}");
    // The build's image went to the cache repository too.
    let tags = registry_tags(
        AUTH_REGISTRY,
        &format!("{cache_path}/{app_key}"),
        Some((AUTH_USER, AUTH_PASS)),
    )
    .await;
    assert_eq!(tags, vec!["latest".to_string()]);

    // The same app, unchanged, on the empty daemon: its layers come from the cache repository.
    assert!(second.inspect_image(&cached).await.is_err());
    let svc = Service::start(&[&flags[..], &["--docker-build-settings", &settings]].concat()).await;
    let log = rebuild(&svc, &first, &archive, &cb).await;
    assert_warm_from(
        &log,
        &cached,
        &["RUN echo cache-one", "RUN echo cache-two", "COPY app.txt"],
    );
}

/// Build 2 of `first`'s app from the same archive on `svc`; it must succeed. Its log.
async fn rebuild(svc: &Service, first: &Value, archive: &[u8], cb: &Callbacks) -> String {
    let mut again = body(&data_uri(archive), cb);
    for key in ["app", "app_uuid"] {
        again[key] = first[key].clone();
    }
    again["build_number"] = json!(2);
    svc.post(&again).await;
    assert_eq!(
        cb.wait_final(again["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        svc.log(&again).await
    );
    svc.log(&again).await
}

/// The build used `image` as its layer cache, and each of `steps` came from it
/// (`step_cached`, either builder).
fn assert_warm_from(log: &str, image: &str, steps: &[&str]) {
    assert!(
        log.contains(&format!("Using {image} as the layer cache")),
        "{log}"
    );
    for step in steps {
        assert!(log.contains(step), "no step {step}:\n{log}");
        assert!(step_cached(log, step), "{step} was not cached:\n{log}");
    }
}
