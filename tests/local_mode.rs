//! Local mode end to end: the service in-process against the real dockerd and registries
//! of `.ci/services`, with real callback and source servers on loopback.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BUILD: Duration = Duration::from_secs(120);

fn dockerfile(body: &str) -> Vec<u8> {
    format!("FROM {BASE_IMAGE}\n{}\n{body}\n", cache_buster()).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_uri_build_is_pushed_with_args_labels_callbacks_and_stored_sources() {
    let log = build_with_args_labels_callbacks_and_stored_sources(&[]).await;
    assert!(
        log.contains("Step 1/"),
        "local mode's daemon is shared: the classic builder by default:\n{log}"
    );
}

/// controller-api passes every config var of an app as a build arg: a thousand of them build
/// (one `ARG` instruction naming them all, and dockerd's request line holds their values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_build_args_build() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let sources = data_uri(&tar_gz(&[(
        "Dockerfile",
        &dockerfile("RUN echo \"last=$K999 first=$K0\""),
    )]));
    let mut b = body(&sources, &cb);
    b["build_args"] = Value::Object(
        (0..1000)
            .map(|i| (format!("K{i}"), json!(format!("value-{i}"))))
            .collect(),
    );
    let (status, _) = svc.post(&b).await;
    assert_eq!(status, 200);
    let id = b["build_uuid"].as_str().unwrap();
    let log = svc.log(&b).await;
    assert_eq!(cb.wait_final(id, BUILD).await, "succeeded", "{log}");
    let log = svc.log(&b).await;
    assert!(log.contains("last=value-999 first=value-0"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildkit_does_the_same_when_turned_on() {
    let log =
        build_with_args_labels_callbacks_and_stored_sources(&["--docker-buildkit", "1"]).await;
    assert!(built_by_buildkit(&log), "BuildKit's steps:\n{log}");
    assert!(!log.contains("Step 1/"), "{log}");
}

/// One build with build args, labels, callbacks and stored sources, on a service started with
/// `flags`; returns its log.
async fn build_with_args_labels_callbacks_and_stored_sources(flags: &[&str]) -> String {
    let mut all = vec![
        "--extra-build-args",
        r#"{"FROM_EXTRA":"extra-value","GREETING":"overridden"}"#,
    ];
    all.extend_from_slice(flags);
    let svc = Service::start(&all).await;
    let cb = Callbacks::start().await;
    // Multi-stage, CRLF, lower-case `from`: every stage sees the args (the last stage copies
    // from the first, so BuildKit runs both).
    let df = format!(
        "FROM {BASE_IMAGE} AS first\r\n{cb}\r\nRUN echo \"stage1 $GREETING $FROM_EXTRA\" > /stage1\r\nfrom {BASE_IMAGE}\r\n{cb}\r\nCOPY --from=first /stage1 /stage1\r\nRUN cat /stage1 && echo \"stage2 $GREETING badkey=$BADKEYx\" && printf '%s' \"$MULTI\" | wc -l | sed 's/^ */lines=/'\r\n",
        cb = cache_buster()
    );
    let archive = tar_gz(&[("Dockerfile", df.as_bytes())]);
    let mut b = body(&data_uri(&archive), &cb);
    b["build_number"] = json!(7);
    b["build_args"] = json!({"GREETING": "hello", "MULTI": "a\nb\nc", "BAD-KEY.x": "k"});
    let (code, resp) = svc.post(&b).await;
    assert_eq!((code.as_u16(), resp), (200, json!({"status": "ok"})));
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "log:\n{}",
        svc.log(&b).await
    );

    // Callbacks: pending then exactly one final, with the legacy body and headers.
    let calls = cb.calls_for(id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        calls[0].raw,
        r#"{"id":7,"status":"pending","building":false,"type":"buildshuttle"}"#
    );
    assert_eq!(
        calls[1].raw,
        r#"{"id":7,"status":"succeeded","building":false,"type":"buildshuttle"}"#
    );
    assert!(calls
        .iter()
        .all(|c| c.auth.as_deref() == Some("cb-secret-token")));
    assert!(calls
        .iter()
        .all(|c| c.content_type.as_deref() == Some("application/json")));

    let log = svc.log(&b).await;
    assert!(
        log.contains("stage1 hello extra-value"),
        "request wins over EXTRA_BUILD_ARGS:\n{log}"
    );
    assert!(log.contains("stage2 hello"), "{log}");
    assert!(
        log.contains("lines=2"),
        "newlines in values pass through untouched:\n{log}"
    );
    assert!(
        log.contains("badkey=k"),
        "keys are stripped to [A-Za-z0-9_]:\n{log}"
    );
    assert!(log.trim_end().ends_with("Build finished"), "{log}");
    assert!(!log.contains("cb-secret-token"));
    if !built_by_buildkit(&log) {
        // The classic builder runs each ARG instruction as a step: one per stage, naming all.
        let arg_steps: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("Step ") && l.contains(" : ARG "))
            .collect();
        assert_eq!(arg_steps.len(), 2, "{log}");
        assert!(
            arg_steps
                .iter()
                .all(|l| l.ends_with(": ARG BADKEYx FROM_EXTRA GREETING MULTI")),
            "{arg_steps:?}"
        );
    }

    // Both tags pushed, labels set.
    let repo = image_repo(&b);
    let mut tags = registry_tags(REGISTRY, &repo, None).await;
    tags.sort();
    assert_eq!(tags, vec!["1.7".to_string(), "latest".to_string()]);
    // Locally, beside the final callback: `latest` moves to the new image (the next build's
    // layer cache) and the push's `1.7` tag goes, so the daemon keeps one tag per app.
    let labels = local_labels(&format!("{REGISTRY}/{repo}:latest"), id).await;
    // The registry's image carries them, and the local `latest` is that very image (its ID is
    // the config's digest). The classic builder's labels are set in the registry, not by a
    // LABEL step.
    let (config_digest, config) = registry_config(REGISTRY, &repo, "latest", None)
        .await
        .expect("the pushed config");
    assert_eq!(config["config"]["Labels"]["build_uuid"], id, "{config}");
    let local = docker()
        .inspect_image(&format!("{REGISTRY}/{repo}:latest"))
        .await
        .unwrap();
    assert_eq!(local.id.as_deref(), Some(config_digest.as_str()));
    if !built_by_buildkit(&log) {
        assert!(!log.contains(" : LABEL "), "{log}");
        assert!(
            log.contains(&format!(
                "Labelled {REGISTRY}/{repo}:1.7 and tagged it latest"
            )),
            "{log}"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while docker()
        .inspect_image(&format!("{REGISTRY}/{repo}:1.7"))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the local 1.7 tag is removed once latest holds the image"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The final stage's ARG lines, from the image's history: one instruction naming every key
    // for the classic builder (each ARG is a step there), one per key for BuildKit (free, and a
    // pinned old frontend may take only that form).
    let history = docker()
        .image_history(&format!("{REGISTRY}/{repo}:latest"))
        .await
        .unwrap();
    let args: Vec<String> = history
        .iter()
        .filter_map(|h| {
            let at = h.created_by.find("ARG ")?;
            Some(h.created_by[at..].trim().to_string())
        })
        .collect();
    if built_by_buildkit(&log) {
        let mut sorted = args.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["ARG BADKEYx", "ARG FROM_EXTRA", "ARG GREETING", "ARG MULTI"],
            "{history:?}"
        );
    } else {
        assert_eq!(
            args,
            ["ARG BADKEYx FROM_EXTRA GREETING MULTI"],
            "{history:?}"
        );
    }
    assert_eq!(labels["app"], b["app"].as_str().unwrap());
    assert_eq!(labels["space"], "default");
    assert_eq!(labels["build_uuid"], id);
    assert_eq!(labels["app_uuid"], b["app_uuid"].as_str().unwrap());

    // The original archive, byte for byte.
    let got = svc
        .client
        .get(svc.url(&format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().to_vec(), archive);
    let head = svc
        .client
        .head(svc.url(&format!("/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    log
}

/// Serves `archive` as `name` over http and builds it from `/{route}{name}`: the build must
/// succeed, print `CONTEXT-OK` (its checks of the context passed) and say how the context
/// was made, with one of the lines in `how`.
async fn context_ok_when_served(route: &str, name: &str, archive: Vec<u8>, how: &[&str]) -> String {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let files = Files::start().await;
    files.put(name, archive);
    let b = body(&format!("http://{}/{route}{name}", files.addr), &cb);
    assert_eq!(svc.post(&b).await.0, 200);
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "log:\n{}",
        svc.log(&b).await
    );
    let log = svc.log(&b).await;
    assert!(log.contains("CONTEXT-OK"), "{log}");
    assert!(how.iter().any(|h| log.contains(h)), "{how:?} in:\n{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_zip_behind_a_redirect_with_a_top_folder_and_dockerignore() {
    let df = dockerfile("COPY . /ctx\nRUN test -f /ctx/src/keep.txt && test ! -e /ctx/secret.txt && test ! -e /ctx/logs && echo CONTEXT-OK");
    let archive = zip(&[
        ("repo-0123abc/Dockerfile", &df),
        ("repo-0123abc/.dockerignore", b"secret.txt\nlogs\n"),
        ("repo-0123abc/src/keep.txt", b"keep"),
        ("repo-0123abc/secret.txt", b"do not send"),
        ("repo-0123abc/logs/a.log", b"x"),
    ]);
    let how = "Extracted the sources for the build context (it is a zip)";
    context_ok_when_served("redirect/", "app.zip", archive, &[how]).await;
}

/// A .tar.gz goes to dockerd straight from the archive (no extracted copy): the same context
/// as an extraction would give, checked inside the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tar_gz_context_is_streamed_with_its_top_folder_dockerignore_and_links() {
    let df = dockerfile(
        "COPY . /ctx\nRUN test -f /ctx/src/keep.txt && test ! -e /ctx/secret.txt && test ! -e /ctx/logs/a.log \\\n && test -f /ctx/logs/keep.log && test -x /ctx/run.sh && test ! -x /ctx/src/keep.txt \\\n && test -L /ctx/current && test \"$(cat /ctx/current)\" = keep && echo CONTEXT-OK",
    );
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(enc);
    let files_in: [(&str, &[u8], u32); 7] = [
        ("repo-0123abc/Dockerfile", &df, 0o644),
        (
            "repo-0123abc/.dockerignore",
            b"secret.txt\nlogs\n!logs/keep.log\n",
            0o644,
        ),
        ("repo-0123abc/src/keep.txt", b"keep", 0o644),
        ("repo-0123abc/run.sh", b"#!/bin/sh\n", 0o755),
        ("repo-0123abc/secret.txt", b"do not send", 0o600),
        ("repo-0123abc/logs/a.log", b"x", 0o644),
        ("repo-0123abc/logs/keep.log", b"y", 0o644),
    ];
    for (name, data, mode) in files_in {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        tar.append_data(&mut h, name, data).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    tar.append_link(&mut h, "repo-0123abc/current", "src/keep.txt")
        .unwrap();
    let archive = tar.into_inner().unwrap().finish().unwrap();
    // Either way the archive streams: when the download outlasts CACHE_PULL_AFTER (20 ms,
    // which a loaded machine can make it do) the build starts as it arrives.
    let how = [
        "Sending the build context straight from the archive",
        "The build context went to dockerd as the sources downloaded",
    ];
    let log = context_ok_when_served("", "app.tgz", archive, &how).await;
    assert!(!log.contains("Extracted the sources"), "{log}");
}

/// 400 KB that gzip cannot shrink: its download lasts (about half a second at `/slow/`).
fn incompressible() -> Vec<u8> {
    incompressible_of(400_000)
}

fn incompressible_of(len: usize) -> Vec<u8> {
    let mut seed = 7u32;
    (0..len)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        })
        .collect()
}

/// A download that lasts feeds dockerd the context as it arrives (the classic builder),
/// with the top folder flattened and the .dockerignore applied as when it is sent after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_feeds_the_build_as_it_arrives() {
    let df = dockerfile(
        "COPY . /ctx\nRUN test -f /ctx/src/keep.txt && test ! -e /ctx/secret.txt && test -f /ctx/big.bin \\\n && test ! -e /ctx/repo-0123abc && echo CONTEXT-OK",
    );
    let big = incompressible();
    let archive = tar_gz(&[
        ("repo-0123abc/.dockerignore", b"secret.txt\n"),
        ("repo-0123abc/src/keep.txt", b"keep"),
        ("repo-0123abc/big.bin", &big),
        ("repo-0123abc/secret.txt", b"do not send"),
        ("repo-0123abc/Dockerfile", &df),
    ]);
    let how = "The build context went to dockerd as the sources downloaded";
    context_ok_when_served("slow/", "app.tgz", archive, &[how]).await;
}

/// A .dockerignore that comes after an entry it leaves out: the context already on its way
/// is dropped (dockerd builds nothing from it) and sent again, right, from the stored archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_dockerignore_sends_the_context_again() {
    let df = dockerfile(
        "COPY . /ctx\nRUN test ! -e /ctx/notes.md && test -f /ctx/big.bin && echo CONTEXT-OK",
    );
    let big = incompressible();
    let archive = tar_gz(&[
        ("notes.md", b"left out"),
        ("big.bin", &big),
        (".dockerignore", b"*.md\n"),
        ("Dockerfile", &df),
    ]);
    let how = "Sending the build context again (the .dockerignore came after notes.md, which it leaves out)";
    let log = context_ok_when_served("slow/", "app.tgz", archive, &[how]).await;
    // The dropped upload's own error is not the build's: nothing between it and the retry.
    let lines: Vec<&str> = log.lines().collect();
    let again = lines.iter().position(|l| l.starts_with(how)).unwrap();
    assert!(lines[again - 1].starts_with("Building "), "{log}");
}

/// A build stopped while its sources download (and dockerd already has part of its context)
/// ends as cancelled, and dockerd builds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_stopped_mid_download_builds_nothing() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let files = Files::start().await;
    let df = dockerfile("COPY . /ctx");
    // About 2.5 s at `/slow/`.
    let big = incompressible_of(2_000_000);
    files.put("app.tgz", tar_gz(&[("Dockerfile", &df), ("big.bin", &big)]));
    let b = body(&format!("http://{}/slow/app.tgz", files.addr), &cb);
    svc.post(&b).await;
    svc.wait_log(&b, "Fetching sources", BUILD).await;
    // Past the 20 ms and the first 256 KiB of context (about 0.35 s): the early build is on.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let path = build_path(&b);
    let resp = svc.client.delete(svc.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    failed_and_built_nothing(&svc, &cb, &b, "Cancelled", Duration::from_secs(10)).await;
}

/// A download cut short fails the build as the sources' failure, and dockerd, which had
/// part of the context, builds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_short_fails_and_builds_nothing() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let files = Files::start().await;
    let df = dockerfile("COPY . /ctx");
    let big = incompressible();
    files.put(
        "app.tgz",
        tar_gz(&[("Dockerfile", &df), ("big.bin", &big), ("more.bin", &big)]),
    );
    let b = body(&format!("http://{}/cut/app.tgz", files.addr), &cb);
    assert_eq!(svc.post(&b).await.0, 200);
    failed_and_built_nothing(&svc, &cb, &b, "Build failed (SourceFetchFailed)", BUILD).await;
}

/// The build `b` ended `failed` within `within`, its log says `why` and ran no step, and
/// dockerd, which had part of its context, has no image of it.
async fn failed_and_built_nothing(
    svc: &Service,
    cb: &Callbacks,
    b: &Value,
    why: &str,
    within: Duration,
) {
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id, within).await, "failed");
    let log = svc.log(b).await;
    assert!(log.contains(why), "{log}");
    assert!(!log.contains("Step 1/"), "{log}");
    let image = format!("{REGISTRY}/{}:1.1", image_repo(b));
    assert!(
        docker().inspect_image(&image).await.is_err(),
        "dockerd built {image} from a partial context"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_data_uri_and_rebuild_from_the_services_own_url() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let archive = tar_gz(&[("Dockerfile", &dockerfile("RUN echo FIRST"))]);
    use base64::Engine;
    let uri = format!(
        "data:application/x-gzip;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&archive)
    );
    let b1 = body(&uri, &cb);
    svc.post(&b1).await;
    let id1 = b1["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id1, BUILD).await, "succeeded");
    // controller-api rebuilds by pointing sources at GET /{build_uuid} of this service.
    let mut b2 = body(&svc.url(&format!("/{id1}")), &cb);
    b2["app"] = b1["app"].clone();
    b2["app_uuid"] = b1["app_uuid"].clone();
    b2["build_number"] = json!(2);
    svc.post(&b2).await;
    let id2 = b2["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id2, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&b2).await
    );
    let tags = registry_tags(REGISTRY, &image_repo(&b2), None).await;
    assert!(
        tags.contains(&"1.1".to_string()) && tags.contains(&"1.2".to_string()),
        "{tags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sources_are_pulled_retagged_and_pushed() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    // Credentials in the URL, against the registry that requires them.
    let src = format!("docker://{AUTH_USER}:{AUTH_PASS}@{AUTH_REGISTRY}/base/busybox:1");
    let b = body(&src, &cb);
    svc.post(&b).await;
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&b).await
    );
    let tags = registry_tags(REGISTRY, &image_repo(&b), None).await;
    assert!(
        tags.contains(&"1.1".to_string()) && tags.contains(&"latest".to_string()),
        "{tags:?}"
    );
    assert!(
        !svc.log(&b).await.contains(AUTH_PASS),
        "the URL password never reaches the log"
    );

    // docker_login / docker_password instead of URL credentials.
    let mut b2 = body(&format!("docker://{AUTH_REGISTRY}/base/busybox:1"), &cb);
    b2["docker_login"] = json!(AUTH_USER);
    b2["docker_password"] = json!(AUTH_PASS);
    svc.post(&b2).await;
    let id2 = b2["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id2, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&b2).await
    );

    // A missing image fails with the daemon's message.
    let b3 = body(&format!("docker://{REGISTRY}/base/does-not-exist:1"), &cb);
    svc.post(&b3).await;
    let id3 = b3["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id3, BUILD).await, "failed");
    let log = svc.log(&b3).await;
    assert!(
        log.contains("PullFailed") && log.contains("not found"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_auth_right_and_wrong_password() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let archive = tar_gz(&[("Dockerfile", &dockerfile("RUN echo AUTH"))]);
    let mut good = body(&data_uri(&archive), &cb);
    good["gm_registry_host"] = json!(AUTH_REGISTRY);
    good["gm_registry_auth"] = json!({"username": AUTH_USER, "password": AUTH_PASS});
    svc.post(&good).await;
    let id = good["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&good).await
    );
    let repo = image_repo(&good);
    let auth = Some((AUTH_USER, AUTH_PASS));
    let tags = registry_tags(AUTH_REGISTRY, &repo, auth).await;
    assert!(tags.contains(&"1.1".to_string()), "{tags:?}");
    // `latest` was written straight to the registry (answering its Basic challenge), as
    // the same manifest: no second push by dockerd.
    let log = svc.log(&good).await;
    let latest = manifest_digest(AUTH_REGISTRY, &repo, "latest", auth).await;
    assert!(latest.is_some(), "{log}");
    assert_eq!(
        latest,
        manifest_digest(AUTH_REGISTRY, &repo, "1.1", auth).await
    );
    // The classic builder's image gets its labels there too (no LABEL step in the build).
    assert!(
        log.contains(&format!(
            "Labelled {AUTH_REGISTRY}/{repo}:1.1 and tagged it latest in the registry as sha256:"
        )),
        "{log}"
    );
    assert!(!log.contains(" : LABEL "), "{log}");
    let (_, config) = registry_config(AUTH_REGISTRY, &repo, "latest", auth)
        .await
        .expect("config");
    assert_eq!(config["config"]["Labels"]["build_uuid"], id, "{config}");
    assert!(
        !log.contains(&format!("Pushing {AUTH_REGISTRY}/{repo}:latest")),
        "{log}"
    );

    let mut bad = body(&data_uri(&archive), &cb);
    bad["gm_registry_host"] = json!(AUTH_REGISTRY);
    bad["gm_registry_auth"] = json!({"username": AUTH_USER, "password": "wrong-password-123"});
    svc.post(&bad).await;
    let id = bad["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id, BUILD).await, "failed");
    let log = svc.log(&bad).await;
    assert!(log.contains("PushFailed"), "{log}");
    assert!(
        log.contains("unauthorized") || log.contains("authentication required"),
        "the daemon's message is in the log:\n{log}"
    );
    assert!(!log.contains("wrong-password-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_go_on_with_a_build_step_when_the_registry_api_refuses() {
    // dockerd's pushes pass; this process's manifest writes are refused, so labelling in the
    // registry fails after the first push.
    let proxy = registry_proxy(REGISTRY, |method, path, agent| {
        method == "PUT" && path.contains("/manifests/") && !agent.starts_with("docker/")
    })
    .await;
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    // One build of a new app pushed through the proxy; its body and log once it succeeded.
    let build = || async {
        let archive = tar_gz(&[("Dockerfile", &dockerfile("RUN echo FALLBACK"))]);
        let mut b = body(&data_uri(&archive), &cb);
        b["gm_registry_host"] = json!(proxy);
        svc.post(&b).await;
        let status = cb
            .wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await;
        let log = svc.log(&b).await;
        assert_eq!(status, "succeeded", "{log}");
        (b, log)
    };
    let (b, log) = build().await;
    let id = b["build_uuid"].as_str().unwrap();
    assert!(
        log.contains("Could not label the image in the registry")
            && log.contains(" : LABEL app=")
            && log.contains("Pushing"),
        "{log}"
    );
    // Both tags carry the labels (the registry behind the proxy is the open one).
    let repo = image_repo(&b);
    for tag in ["1.1", "latest"] {
        let (_, config) = registry_config(REGISTRY, &repo, tag, None)
            .await
            .expect("config");
        assert_eq!(
            config["config"]["Labels"]["build_uuid"], id,
            "{tag}: {config}"
        );
    }

    // The next build to that registry does not try again: its labels are a LABEL instruction
    // in the Dockerfile, as where the registry's API cannot be used at all.
    let (next, log) = build().await;
    let id = next["build_uuid"].as_str().unwrap();
    assert!(
        !log.contains("Could not label the image in the registry") && log.contains(" : LABEL app="),
        "{log}"
    );
    let (_, config) = registry_config(REGISTRY, &image_repo(&next), "latest", None)
        .await
        .expect("config");
    assert_eq!(config["config"]["Labels"]["build_uuid"], id, "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_inside_the_build_use_extra_registry_config() {
    // A base image that exists only in the authenticated registry, under a unique tag.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let private = format!("{AUTH_REGISTRY}/base/private:{tag}");
    let d = docker();
    d.tag_image(
        BASE_IMAGE,
        Some(bollard::query_parameters::TagImageOptions {
            repo: Some(format!("{AUTH_REGISTRY}/base/private")),
            tag: Some(tag.clone()),
        }),
    )
    .await
    .unwrap();
    let creds = bollard::auth::DockerCredentials {
        username: Some(AUTH_USER.into()),
        password: Some(AUTH_PASS.into()),
        serveraddress: Some(AUTH_REGISTRY.into()),
        ..Default::default()
    };
    use futures::StreamExt;
    let mut push = d.push_image(
        &format!("{AUTH_REGISTRY}/base/private"),
        Some(bollard::query_parameters::PushImageOptions {
            tag: Some(tag.clone()),
            ..Default::default()
        }),
        Some(creds),
    );
    while let Some(r) = push.next().await {
        r.unwrap();
    }
    d.remove_image(
        &private,
        None::<bollard::query_parameters::RemoveImageOptions>,
        None,
    )
    .await
    .unwrap();

    let extra = format!(
        r#"{{"{AUTH_REGISTRY}": {{"username": "{AUTH_USER}", "password": "{AUTH_PASS}"}}}}"#
    );
    let svc = Service::start(&["--extra-docker-registry-config", &extra]).await;
    let cb = Callbacks::start().await;
    let archive = tar_gz(&[(
        "Dockerfile",
        format!(
            "FROM {private}\n{}\nRUN echo PRIVATE-BASE\n",
            cache_buster()
        )
        .as_bytes(),
    )]);
    let b = body(&data_uri(&archive), &cb);
    svc.post(&b).await;
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(
        cb.wait_final(id, BUILD).await,
        "succeeded",
        "{}",
        svc.log(&b).await
    );
    assert!(!svc.log(&b).await.contains(AUTH_PASS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_with_a_reason_in_the_log() {
    failures_reported(&[], "returned a non-zero code").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_with_a_reason_by_buildkit_too() {
    failures_reported(&["--docker-buildkit", "true"], "exit code: 1").await;
}

/// Each way a build can fail, on a service started with `flags`; `non_zero` is how the builder
/// reports a `RUN` step that failed.
async fn failures_reported(flags: &[&str], non_zero: &str) {
    let mut all = vec!["--sources-connect-timeout-seconds", "3"];
    all.extend_from_slice(flags);
    let svc = Service::start(&all).await;
    let cb = Callbacks::start().await;
    let files = Files::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            data_uri(&tar_gz(&[(
                "Dockerfile",
                &dockerfile("RUN echo about-to-fail && false"),
            )])),
            non_zero,
        ),
        (
            data_uri(&tar_gz(&[(
                "Dockerfile",
                b"FROM 127.0.0.1:5000/nope/missing:1\n",
            )])),
            "not found",
        ),
        (
            data_uri(&tar_gz(&[("README.md", b"no dockerfile")])),
            "no Dockerfile",
        ),
        (
            data_uri(&tar_gz(&[("Dockerfile", b"FROM busybox\nNOTACOMMAND x\n")])),
            "unknown instruction",
        ),
        (data_uri(b"this is not an archive at all"), "not a .tar.gz"),
        (format!("http://{closed}/src.tgz"), "could not connect"),
        (format!("http://{}/missing.tgz", files.addr), "404"),
    ];
    let mut bodies = Vec::new();
    for (src, _) in &cases {
        let b = body(src, &cb);
        assert_eq!(svc.post(&b).await.0, 200);
        bodies.push(b);
    }
    for (b, (_, expect)) in bodies.iter().zip(&cases) {
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(cb.wait_final(id, BUILD).await, "failed");
        let log = svc.log(b).await;
        assert!(log.contains(expect), "expected {expect:?} in:\n{log}");
        assert!(log.contains("Build failed ("), "{log}");
    }
}

/// Every line written to the journal while it runs: each segment is opened as soon as it
/// appears and read as it grows (an open segment stays readable after compaction removes it).
struct JournalTail {
    lines: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl JournalTail {
    fn start(data: &std::path::Path) -> Self {
        use std::io::Read;
        let (lines, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (out, done, dir) = (lines.clone(), stop.clone(), data.join("state"));
        std::thread::spawn(move || {
            let mut open: Vec<(std::path::PathBuf, std::fs::File, Vec<u8>)> = Vec::new();
            while !done.load(Ordering::SeqCst) {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = e.path();
                    let journal = e.file_name().to_string_lossy().starts_with("journal-");
                    if journal && !open.iter().any(|(p, _, _)| *p == path) {
                        if let Ok(f) = std::fs::File::open(&path) {
                            open.push((path, f, Vec::new()));
                        }
                    }
                }
                for (_, f, buf) in &mut open {
                    let _ = f.read_to_end(buf);
                    while let Some(n) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=n).collect();
                        if let Ok(v) = serde_json::from_slice(&line) {
                            out.lock().unwrap().push(v);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self { lines, stop }
    }

    /// The phases recorded for build `id`, in order.
    fn phases(&self, id: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|v| v["spec"]["build_uuid"] == id)
            .map(|v| v["phase"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for JournalTail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_marks_a_build_running_only_once_it_has_run_a_while() {
    let svc = Service::start(&[]).await;
    let tail = JournalTail::start(svc.data.path());
    let cb = Callbacks::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Sources that fail at once: only the acceptance and the outcome are written.
    let quick = body(&format!("http://{closed}/gone.tgz"), &cb);
    let slow = body(&sleeper("marked", 1), &cb);
    for b in [&quick, &slow] {
        assert_eq!(svc.post(b).await.0, 200);
    }
    for b in [&quick, &slow] {
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(
            cb.wait_final(id, BUILD).await,
            if b == &quick { "failed" } else { "succeeded" }
        );
    }
    let id = |b: &Value| b["build_uuid"].as_str().unwrap().to_string();
    let quick_phases = tail.phases(&id(&quick));
    assert_eq!(quick_phases.first().map(String::as_str), Some("queued"));
    assert!(
        !quick_phases.iter().any(|p| p == "running"),
        "{quick_phases:?}"
    );
    assert!(
        quick_phases.iter().any(|p| p == "finished"),
        "{quick_phases:?}"
    );
    let slow_phases = tail.phases(&id(&slow));
    let at = |p: &str| slow_phases.iter().position(|x| x == p);
    assert!(
        at("queued") < at("running") && at("running") < at("finished") && at("queued").is_some(),
        "{slow_phases:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_a_running_build_and_stop_all_of_an_app() {
    let svc = Service::start(&["--maximum-parallel-builds", "1"]).await;
    let cb = Callbacks::start().await;
    let b = body(&sleeper("stopme", 301), &cb);
    svc.post(&b).await;
    svc.wait_log(&b, "stopme-start", BUILD).await;
    wait_running_steps_with("sleep 301", 1, Duration::from_secs(5)).await;
    let path = build_path(&b);
    let resp = svc.client.delete(svc.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id, Duration::from_secs(10)).await, "failed");
    wait_running_steps_with("sleep 301", 0, Duration::from_secs(15)).await;
    assert!(svc.log(&b).await.contains("Cancelled"));

    // Stop-all: one running, one queued behind it (same app).
    let b1 = body(&sleeper("all1", 302), &cb);
    let mut b2 = body(&sleeper("all2", 302), &cb);
    b2["app"] = b1["app"].clone();
    b2["app_uuid"] = b1["app_uuid"].clone();
    b2["build_number"] = json!(2);
    svc.post(&b1).await;
    svc.post(&b2).await;
    svc.wait_log(&b1, "all1-start", BUILD).await;
    // Queued: known, nothing written yet (200, empty; 404 is for unknown builds).
    let queued = svc
        .client
        .get(svc.url(&logs_path(&b2)))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 200);
    assert_eq!(queued.text().await.unwrap(), "");
    let path = format!(
        "/{}-{}",
        b1["app"].as_str().unwrap(),
        b1["app_uuid"].as_str().unwrap()
    );
    assert_eq!(
        svc.client
            .delete(svc.url(&path))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for b in [&b1, &b2] {
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), Duration::from_secs(10))
                .await,
            "failed"
        );
    }
    assert!(
        !svc.log(&b2).await.contains("all2-start"),
        "the queued build never ran"
    );
    wait_running_steps_with("sleep 302", 0, Duration::from_secs(15)).await;
    // Exactly one final callback each.
    for b in [&b, &b1, &b2] {
        let finals = cb
            .calls_for(b["build_uuid"].as_str().unwrap())
            .iter()
            .filter(|c| c.body["status"] != "pending")
            .count();
        assert_eq!(finals, 1);
    }
}

/// A new build with a number in use replaces the old one, as the legacy shuttle did
/// (controller-api numbers builds by count, so a number comes back after a build is deleted):
/// the running one is stopped (`failed`), and the new one runs once it has ended, so the log
/// and the tags of that number are the new build's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_build_with_a_number_in_use_replaces_the_running_one() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let old = body(&sleeper("old", 303), &cb);
    svc.post(&old).await;
    svc.wait_log(&old, "old-start", BUILD).await;
    let mut new = body(&sleeper("new", 1), &cb);
    for field in ["app", "app_uuid", "build_number"] {
        new[field] = old[field].clone();
    }
    svc.post(&new).await;
    let (old_id, new_id) = (
        old["build_uuid"].as_str().unwrap(),
        new["build_uuid"].as_str().unwrap(),
    );
    assert_eq!(
        cb.wait_final(old_id, Duration::from_secs(10)).await,
        "failed"
    );
    assert_eq!(cb.wait_final(new_id, BUILD).await, "succeeded");
    wait_running_steps_with("sleep 303", 0, Duration::from_secs(15)).await;
    let log = svc.log(&new).await;
    assert!(
        log.contains("new-end") && !log.contains("old-start") && !log.contains("replaced by"),
        "the new build's log alone: {log}"
    );
    for id in [old_id, new_id] {
        let statuses: Vec<_> = cb
            .calls_for(id)
            .iter()
            .map(|c| c.body["status"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(
            statuses.len(),
            2,
            "pending and one final for {id}: {statuses:?}"
        );
    }
}

/// A build that replaces one still ending waits for it without a slot, and not for ever:
/// here the old build's end is its log's delivery to a Kafka broker that is not there
/// (KAFKA_DELIVERY_TIMEOUT_MS, 90 s). Meanwhile another build takes the only slot, a stop
/// ends the new build's wait at once, and TIMEOUT_IN_MS counts the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_waiting_for_the_one_it_replaces_holds_no_slot_and_can_be_stopped() {
    let svc = Service::start(&[
        "--maximum-parallel-builds",
        "1",
        "--kafka-delivery-timeout-ms",
        "90000",
        "--timeout-in-ms",
        "20000",
    ])
    .await;
    let cb = Callbacks::start().await;
    let mut old = body(&sleeper("old", 303), &cb);
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    old["kafka_hosts"] = json!(nobody.local_addr().unwrap().to_string());
    drop(nobody);
    svc.post(&old).await;
    svc.wait_log(&old, "old-start", BUILD).await;
    let same_number = |sources: &str| {
        let mut b = body(sources, &cb);
        for field in ["app", "app_uuid", "build_number"] {
            b[field] = old[field].clone();
        }
        b
    };
    let id = |b: &Value| b["build_uuid"].as_str().unwrap().to_string();
    let new = same_number(&sleeper("new", 1));
    svc.post(&new).await;
    assert_eq!(
        cb.wait_final(&id(&old), Duration::from_secs(15)).await,
        "failed"
    );
    // The old build's log is still on its way to Kafka: the new one waits, the slot does not.
    let other = body(&sleeper("other", 0), &cb);
    svc.post(&other).await;
    assert_eq!(
        cb.wait_final(&id(&other), Duration::from_secs(40)).await,
        "succeeded",
        "another build runs while the new one waits: {}",
        svc.log(&other).await
    );
    let stop = svc.client.delete(svc.url(&build_path(&new))).send().await;
    assert_eq!(stop.unwrap().status(), 200);
    assert_eq!(
        cb.wait_final(&id(&new), Duration::from_secs(5)).await,
        "failed",
        "a stop ends the wait at once"
    );
    let newer = same_number(&sleeper("newer", 1));
    let posted = std::time::Instant::now();
    svc.post(&newer).await;
    assert_eq!(
        cb.wait_final(&id(&newer), Duration::from_secs(35)).await,
        "failed",
        "TIMEOUT_IN_MS counts the wait"
    );
    assert!(posted.elapsed() >= Duration::from_secs(15), "it did wait");
    // Neither started: the number's log is still the old build's.
    let log = svc.log(&old).await;
    assert!(
        log.contains("old-start")
            && log.contains("replaced by")
            && !log.contains("new-start")
            && !log.contains("before it started"),
        "{log}"
    );
}

/// An old build of that number still queued is not looked for (a POST never scans the
/// queue): it runs first, and the new one after it, so the new one's log is the one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_build_with_a_number_used_again_runs_before_the_new_one() {
    let svc = Service::start(&["--maximum-parallel-builds", "2"]).await;
    let cb = Callbacks::start().await;
    let old = body(&sleeper("old", 3), &cb);
    let mut new = body(&sleeper("new", 1), &cb);
    for field in ["app", "app_uuid", "build_number"] {
        new[field] = old[field].clone();
    }
    // Both slots busy, so the old one waits in the queue when the new one comes.
    let blockers = [body(&sleeper("b1", 4), &cb), body(&sleeper("b2", 4), &cb)];
    for b in &blockers {
        svc.post(b).await;
        svc.wait_log(b, "start", BUILD).await;
    }
    svc.post(&old).await;
    svc.post(&new).await;
    for b in [&old, &new] {
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(cb.wait_final(id, BUILD).await, "succeeded");
    }
    let log = svc.log(&new).await;
    assert!(
        log.contains("new-end") && !log.contains("old-start"),
        "the new build ran last: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_past_timeout_in_ms_fails_and_its_container_stops() {
    let svc = Service::start(&["--timeout-in-ms", "4000"]).await;
    let cb = Callbacks::start().await;
    let b = body(&sleeper("slow", 303), &cb);
    svc.post(&b).await;
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(cb.wait_final(id, Duration::from_secs(30)).await, "failed");
    let log = svc.log(&b).await;
    assert!(
        log.contains("Timeout") && log.contains("TIMEOUT_IN_MS"),
        "{log}"
    );
    wait_running_steps_with("sleep 303", 0, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_runs_at_most_the_limit_first_come_first_served() {
    let svc = Service::start(&["--maximum-parallel-builds", "2"]).await;
    let cb = Callbacks::start().await;
    let mut bodies = Vec::new();
    for i in 0..5 {
        let b = body(&sleeper(&format!("q{i}"), 2), &cb);
        svc.post(&b).await;
        bodies.push(b);
    }
    // Sample the running gauge while the queue drains.
    let mut max_running = 0;
    let start = std::time::Instant::now();
    loop {
        let m = svc
            .client
            .get(svc.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let running: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("buildshuttle_running_builds "))
            .and_then(|v| v.trim().parse().ok())
            .expect("running gauge");
        max_running = max_running.max(running);
        let done = bodies
            .iter()
            .all(|b| cb.calls_for(b["build_uuid"].as_str().unwrap()).len() == 2);
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "queue did not drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        max_running, 2,
        "never more than MAXIMUM_PARALLEL_BUILDS at once"
    );
    // Builds start in submission order (when each took its slot, from the state journal;
    // finishing order would also depend on how fast each build happened to run).
    let started = started_at(svc.data.path(), &bodies);
    for j in 2..bodies.len() {
        for i in 0..j {
            assert!(
                started[i] <= started[j],
                "build {i} started after build {j}: {started:?}"
            );
        }
    }
}

/// When each build took its slot (`started_at` of its records in `DATA_DIR/state`).
fn started_at(
    data: &std::path::Path,
    bodies: &[Value],
) -> Vec<chrono::DateTime<chrono::FixedOffset>> {
    let mut found = vec![String::new(); bodies.len()];
    for entry in std::fs::read_dir(data.join("state")).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Ok(rec) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some(at) = rec["started_at"].as_str() else {
                continue;
            };
            for (i, b) in bodies.iter().enumerate() {
                if rec["spec"]["build_uuid"] == b["build_uuid"] && found[i].is_empty() {
                    found[i] = at.to_string();
                }
            }
        }
    }
    assert!(
        found.iter().all(|s| !s.is_empty()),
        "every build started: {found:?}"
    );
    found
        .iter()
        .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_readable_while_the_build_runs() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let b = body(&sleeper("live", 6), &cb);
    svc.post(&b).await;
    let log = svc.wait_log(&b, "live-start", BUILD).await;
    let id = b["build_uuid"].as_str().unwrap();
    assert!(!log.contains("live-end"));
    assert!(
        cb.calls_for(id)
            .iter()
            .all(|c| c.body["status"] == "pending"),
        "read before the build ended"
    );
    assert_eq!(cb.wait_final(id, BUILD).await, "succeeded");
    let resp = svc
        .client
        .get(svc.url(&logs_path(&b)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; charset=utf-8",
        "the contract's text/plain"
    );
    assert!(resp.text().await.unwrap().contains("live-end"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_over_plain_tcp_and_mutual_tls() {
    let state = std::env::var("BUILDSHUTTLE_TEST_STATE")
        .unwrap_or_else(|_| "/tmp/buildshuttle-test".into());
    let read = |f: &str| {
        std::fs::read_to_string(format!("{state}/tls/{f}")).expect("TLS files from .ci/services")
    };
    let tls = json!({"protocol": "https", "host": "127.0.0.1", "port": 2376, "ca": read("ca.pem"), "cert": read("client.pem"), "key": read("client-key.pem")}).to_string();
    for settings in [
        r#"{"host":"http://127.0.0.1","port":"2375"}"#.to_string(),
        tls,
    ] {
        let svc = Service::start(&["--docker-build-settings", &settings]).await;
        let cb = Callbacks::start().await;
        let b = body(
            &data_uri(&tar_gz(&[(
                "Dockerfile",
                &dockerfile("RUN echo REMOTE-DOCKER"),
            )])),
            &cb,
        );
        svc.post(&b).await;
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(
            cb.wait_final(id, BUILD).await,
            "succeeded",
            "{}",
            svc.log(&b).await
        );
        assert!(svc.log(&b).await.contains("REMOTE-DOCKER"));
    }
}

/// What dockerd's classic builder answers when an image it was reading while looking for a
/// cached step was deleted meanwhile (`getLocalCachedImage` in moby's image cache). On a
/// shared daemon another build's tidy-up deletes images; CI once lost a build to it.
const LOST_IMAGE: &str = concat!(
    r#"{"stream":"Step 1/2 : FROM 127.0.0.1:5000/base/busybox:1\n"}"#,
    "\n",
    r#"{"errorDetail":{"message":"unable to find image \"sha256:b14d00932f82fdb7f0582e71d4475cb85ba8c046cff7ece0083838d4684d8825\""},"error":"unable to find image \"sha256:b14d00932f82fdb7f0582e71d4475cb85ba8c046cff7ece0083838d4684d8825\""}"#,
    "\n"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_loses_a_cache_candidate_to_another_builds_tidy_up_is_built_again() {
    // dockerd over TCP through a proxy that answers some builds with the race's error: the
    // build of `twice` twice (then it goes through), the build of `always` every time.
    let (twice, always) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let front = proxy(
        "127.0.0.1:2375",
        {
            let answered = answered.clone();
            move |method, path, _| {
                let build = method == "POST" && path.contains("/build?");
                let lost = build
                    && (path.contains(&always.to_string())
                        || (path.contains(&twice.to_string())
                            && answered.fetch_add(1, Ordering::SeqCst) < 2));
                lost.then_some(Reply::AfterBody(200, LOST_IMAGE))
            }
        },
        |_, _| None,
    )
    .await;
    let (host, port) = front.rsplit_once(':').unwrap();
    let settings = json!({"host": format!("http://{host}"), "port": port}).to_string();
    let svc = Service::start(&["--docker-build-settings", &settings]).await;
    let cb = Callbacks::start().await;
    let archive = tar_gz(&[("Dockerfile", &dockerfile("RUN echo BUILT-AGAIN"))]);
    let again = "dockerd lost an image while looking for cached steps";

    let mut b = body(&data_uri(&archive), &cb);
    b["app_uuid"] = json!(twice.to_string());
    svc.post(&b).await;
    let id = b["build_uuid"].as_str().unwrap();
    let status = cb.wait_final(id, BUILD).await;
    let log = svc.log(&b).await;
    assert_eq!(status, "succeeded", "{log}");
    assert_eq!(log.matches(again).count(), 2, "{log}");
    assert!(log.contains("BUILT-AGAIN"), "{log}");
    assert_eq!(answered.load(Ordering::SeqCst), 3);

    // Three in a row is not a race: the build fails with dockerd's own words.
    let mut b = body(&data_uri(&archive), &cb);
    b["app_uuid"] = json!(always.to_string());
    svc.post(&b).await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    let log = svc.log(&b).await;
    assert_eq!(log.matches(again).count(), 2, "{log}");
    assert!(
        log.contains("Build failed (BuildFailed): the build failed: unable to find image"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_builds_without_the_layer_cache() {
    let archive = tar_gz(&[("Dockerfile", &dockerfile("RUN echo cache-probe-5d1e"))]);
    let cb = Callbacks::start().await;
    let svc = Service::start(&[]).await;
    for _ in 0..2 {
        let b = body(&data_uri(&archive), &cb);
        svc.post(&b).await;
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
                .await,
            "succeeded"
        );
    }
    let cached = body(&data_uri(&archive), &cb);
    svc.post(&cached).await;
    cb.wait_final(cached["build_uuid"].as_str().unwrap(), BUILD)
        .await;
    assert!(
        used_cache(&svc.log(&cached).await),
        "the cache is used by default"
    );
    let nc = Service::start(&["--no-cache", "true"]).await;
    let b = body(&data_uri(&archive), &cb);
    nc.post(&b).await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded"
    );
    assert!(!used_cache(&nc.log(&b).await), "{}", nc.log(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_legacy_answers() {
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let post_raw = |body: &'static str| {
        let c = svc.client.clone();
        let url = svc.url("/");
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        post_raw("{not json").await,
        (400, r#"{"status":"Bad Request - malformed JSON."}"#.into())
    );
    assert_eq!(
        post_raw("{}").await,
        (400, r#"{"status":"Bad Request - missing fields."}"#.into())
    );
    let mut b = body("data:base64,AAAA", &cb);
    b["build_uuid"] = json!("not-a-uuid");
    let (code, v) = svc.post(&b).await;
    assert_eq!(
        (code.as_u16(), v),
        (
            400,
            json!({"status": "Bad Request - build uuid is invalid."})
        )
    );
    b.as_object_mut().unwrap().remove("gm_registry_repo");
    assert_eq!(
        svc.post(&b).await.1,
        json!({"status": "Bad Request - missing fields."})
    );

    let get = |p: String| {
        let c = svc.client.clone();
        let url = svc.url(&p);
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("/octhc".into()).await,
        (200, "overall_status=good".into())
    );
    assert_eq!(get("/not-a-uuid".into()).await.0, 400);
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(get(format!("/{unknown}")).await.0, 404);
    assert_eq!(
        svc.client
            .head(svc.url(&format!("/{unknown}")))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let del = svc
        .client
        .delete(svc.url(&format!("/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (del.status().as_u16(), del.text().await.unwrap()),
        (200, r#"{"status":"ok"}"#.into())
    );
    assert_eq!(get(format!("/myapp-{unknown}/3/logs")).await.0, 404);
    // Keys no build can have: unknown builds, as with the old shuttle.
    assert_eq!(
        get("/myapp-../../etc/3/logs".into()).await.0,
        404,
        "no way out of the store"
    );
    assert_eq!(get(format!("/myapp-{unknown}/0/logs")).await.0, 404);
    assert_eq!(get(format!("/my-app-{unknown}/3/logs")).await.0, 404);
    // Every stop is answered 200 (controller-api stops a build not started yet as number 0),
    // and every `DELETE /{id}`, as the old shuttle answered them.
    for path in [
        format!("/myapp-{unknown}/0"),
        format!("/my-app-{unknown}/3"),
        format!("/myapp-{unknown}/x"),
        "/not-a-uuid".to_string(),
    ] {
        let r = svc.client.delete(svc.url(&path)).send().await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.text().await.unwrap()),
            (200, r#"{"status":"ok"}"#.into()),
            "{path}"
        );
    }
}

/// More builds queued than the executor keeps in memory: the rest wait in
/// `DATA_DIR/state/queue.spill`, and every one still runs, in order, with one pending and one
/// final callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_longer_than_the_memory_window_runs_in_order_from_the_scratch_file() {
    let svc = Service::start(&["--maximum-parallel-builds", "1"]).await;
    let cb = Callbacks::start().await;
    // Holds the only slot while the queue fills.
    let blocker = body(&sleeper("hold", 300), &cb);
    svc.post(&blocker).await;
    svc.wait_log(&blocker, "hold-start", BUILD).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}/gone.tgz", closed.local_addr().unwrap());
    drop(closed);
    let mut bodies = Vec::new();
    for _ in 0..2300 {
        let b = body(&gone, &cb);
        assert_eq!(svc.post(&b).await.0, 200);
        bodies.push(b);
    }
    let spill = svc.data.path().join("state").join("queue.spill");
    assert!(
        std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0) > 0,
        "the builds past the memory window are not in the scratch file"
    );
    let stop = build_path(&blocker);
    let resp = svc.client.delete(svc.url(&stop)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    for b in &bodies {
        let id = b["build_uuid"].as_str().unwrap();
        assert_eq!(cb.wait_final(id, BUILD).await, "failed");
    }
    for b in &bodies {
        let calls = cb.calls_for(b["build_uuid"].as_str().unwrap());
        let statuses: Vec<&str> = calls
            .iter()
            .map(|c| c.body["status"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(statuses, ["pending", "failed"]);
    }
    let started = started_at(svc.data.path(), &bodies);
    assert!(
        started.windows(2).all(|w| w[0] <= w[1]),
        "builds did not start in submission order"
    );
    // Nothing is left in the scratch file once the queue is empty.
    let start = std::time::Instant::now();
    while std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0) > 0 {
        assert!(
            start.elapsed() < BUILD,
            "the scratch file was never emptied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
