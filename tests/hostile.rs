//! Hostile input: one case per input class. Crafted archives are built here; a trap
//! listener fails a test if a denied address is ever contacted. Loopback only: denied
//! networks are loopback aliases (127.0.0.2) in these tests.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BUILD: Duration = Duration::from_secs(120);

async fn status_of(svc: &Service, b: &Value) -> (u16, Value) {
    let (c, v) = svc.post(b).await;
    (c.as_u16(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_field_is_a_400_naming_it() {
    let svc = Service::start(&["--max-request-bytes", "200000"]).await;
    let cb = Callbacks::start().await;
    let base = body("data:base64,AAAA", &cb);
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("app", json!("")), "missing fields"),
        (with("app", json!("a".repeat(64))), "app must be"),
        (with("app", json!("my-app")), "app must be"),
        (with("app", json!("../../x")), "app must be"),
        (with("app_uuid", json!("not-a-uuid")), "app uuid"),
        (
            with(
                "build_uuid",
                json!("{6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11}"),
            ),
            "build uuid is invalid",
        ),
        (with("build_number", json!(0)), "build number"),
        (with("build_number", json!(-3)), "build number"),
        (with("build_number", json!("12a")), "build number"),
        (with("build_number", json!(1.5)), "build number"),
        (
            with("sources", json!("file:///etc/passwd")),
            "sources must be",
        ),
        (
            with("sources", json!("ftp://127.0.0.1/x.tgz")),
            "sources must be",
        ),
        (with("sources", json!("docker://UPPER/Case:tag")), "docker"),
        (
            with("sources", json!("docker://host/repo:tag;rm -rf")),
            "docker",
        ),
        (
            with(
                "build_args",
                Value::Object(
                    (0..50)
                        .map(|i| (format!("K{i}"), json!("x".repeat(1000))))
                        .collect(),
                ),
            ),
            "build args are too large",
        ),
    ];
    for (b, expect) in cases {
        let (code, v) = status_of(&svc, &b).await;
        let msg = v["status"].as_str().unwrap_or_default().to_string();
        assert_eq!(code, 400, "{expect}: {v}");
        assert!(
            msg.starts_with("Bad Request - ") && msg.contains(expect),
            "{expect}: {msg}"
        );
    }
    // Any number of build args within the size (controller-api sends every config var).
    let many = with(
        "build_args",
        Value::Object((0..1000).map(|i| (format!("K{i}"), json!("v"))).collect()),
    );
    assert_eq!(status_of(&svc, &many).await.0, 200);
    // String build numbers are accepted as controller-api sends them.
    let ok = with("build_number", json!("42"));
    assert_eq!(status_of(&svc, &ok).await.0, 200);

    // Over MAX_REQUEST_BYTES: 413 with the legacy shape.
    let big = with(
        "sources",
        json!(format!("data:base64,{}", "A".repeat(300_000))),
    );
    let (code, v) = status_of(&svc, &big).await;
    assert_eq!(code, 413, "{v}");
    assert!(v["status"].as_str().unwrap().contains("MAX_REQUEST_BYTES"));
    // Its body left unread, the connection closes: the answer says so, or a keep-alive
    // client sends its next request into the closing connection (a broken pipe).
    let r = svc
        .client
        .post(svc.url("/"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );

    // Route parameters: no way into storage keys.
    for path in ["/..%2F..%2Fetc%2Fpasswd", "/a%00b", "/%2E%2E%2Fx"] {
        let r = svc.client.get(svc.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    // A log key no build can have names an unknown build (404, as the old shuttle).
    for path in [
        "/app-..%2F..%2Fx/1/logs",
        "/app-6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11/1%2F..%2F2/logs",
    ] {
        let r = svc.client.get(svc.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

/// A tar.gz built entry by entry, so hostile names and types can be written.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        // Write the name bytes directly: set_path refuses `..` and absolute paths.
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_gnu_mut().unwrap().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_fail_naming_the_entry_and_write_nothing_outside() {
    use tar::EntryType::*;
    let svc = Service::start(&[]).await;
    let cb = Callbacks::start().await;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let escape = format!("buildshuttle-escape-{nonce}");
    let df: &[u8] = b"FROM test/busybox:latest\n";
    let deep = format!("../../../../../../../../tmp/{escape}");
    let abs = format!("/tmp/{escape}");
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                (&deep, Regular, b"x", None),
            ]),
            deep.clone(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                (&abs, Regular, b"x", None),
            ]),
            abs.clone(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("C:/windows/x", Regular, b"x", None),
            ]),
            "C:/windows/x".into(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("link", Symlink, b"", Some("../../../../tmp")),
            ]),
            "link".into(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("abs-link", Symlink, b"", Some("/etc")),
            ]),
            "abs-link".into(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("hard", Link, b"", Some("/etc/passwd")),
            ]),
            "hard".into(),
        ),
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("hard2", Link, b"", Some("../../etc/passwd")),
            ]),
            "hard2".into(),
        ),
        (
            raw_tar(&[("Dockerfile", Regular, df, None), ("dev", Char, b"", None)]),
            "dev".into(),
        ),
        (
            raw_tar(&[("Dockerfile", Regular, df, None), ("blk", Block, b"", None)]),
            "blk".into(),
        ),
        (
            raw_tar(&[("Dockerfile", Regular, df, None), ("fifo", Fifo, b"", None)]),
            "fifo".into(),
        ),
        // A link to a folder inside, then a file written "through" it.
        (
            raw_tar(&[
                ("Dockerfile", Regular, df, None),
                ("sub", Directory, b"", None),
                ("via", Symlink, b"", Some("sub")),
                ("via/f", Regular, b"x", None),
            ]),
            "via/f".into(),
        ),
        (
            zip(&[("Dockerfile", df), (deep.as_str(), b"x")]),
            deep.clone(),
        ),
    ];
    let mut bodies = Vec::new();
    for (archive, _) in &cases {
        let b = body(&data_uri(archive), &cb);
        assert_eq!(svc.post(&b).await.0, 200);
        bodies.push(b);
    }
    for (b, (_, entry)) in bodies.iter().zip(&cases) {
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
                .await,
            "failed"
        );
        let log = svc.log(b).await;
        assert!(
            log.contains("InvalidSources") && log.contains(&format!("{entry:?}")),
            "{entry}: {log}"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/tmp/{escape}")).exists(),
        "a file escaped the build folder"
    );
    let mut found = Vec::new();
    for entry in walk(svc.data.path()) {
        if entry.contains(&escape) {
            found.push(entry);
        }
    }
    assert!(found.is_empty(), "{found:?}");

    // A link that stays inside is fine.
    let good = raw_tar(&[
        (
            "Dockerfile",
            Regular,
            format!(
                "FROM {BASE_IMAGE}\n{}\nCOPY . /ctx\nRUN test -L /ctx/link && echo LINK-OK-$((6*7))\n",
                cache_buster()
            )
            .as_bytes(),
            None,
        ),
        ("dir", Directory, b"", None),
        ("dir/file", Regular, b"x", None),
        ("link", Symlink, b"", Some("dir/file")),
    ]);
    let b = body(&data_uri(&good), &cb);
    svc.post(&b).await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "succeeded",
        "{}",
        svc.log(&b).await
    );
    assert!(svc.log(&b).await.contains("LINK-OK-42"));
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_and_entry_limits_fail_early_naming_the_limit() {
    let svc = Service::start(&[
        "--max-source-bytes",
        "50000",
        "--max-context-bytes",
        "1000000",
        "--max-archive-entries",
        "20",
    ])
    .await;
    let cb = Callbacks::start().await;
    let files = Files::start().await;
    let df = format!("FROM {BASE_IMAGE}\n");
    // Too big to download (incompressible bytes).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let big = tar_gz(&[("Dockerfile", df.as_bytes()), ("noise", &noise)]);
    assert!(big.len() > 50_000);
    let url = files.put("big.tgz", big);
    // Small archive, huge expansion (a "zip bomb" of zeros).
    let zeros = vec![0u8; 5_000_000];
    let bomb = tar_gz(&[("Dockerfile", df.as_bytes()), ("zeros", &zeros)]);
    assert!(bomb.len() < 50_000);
    // Too many entries.
    let names: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
    let mut many: Vec<(&str, &[u8])> = vec![("Dockerfile", df.as_bytes())];
    many.extend(names.iter().map(|n| (n.as_str(), &b"x"[..])));
    let many = tar_gz(&many);
    for (src, limit) in [
        (url, "MAX_SOURCE_BYTES"),
        (data_uri(&bomb), "MAX_CONTEXT_BYTES"),
        (data_uri(&many), "MAX_ARCHIVE_ENTRIES"),
    ] {
        let b = body(&src, &cb);
        svc.post(&b).await;
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), BUILD)
                .await,
            "failed"
        );
        let log = svc.log(&b).await;
        assert!(log.contains(limit), "{limit}: {log}");
    }
    // Disk use stays bounded: nothing is left in the build folders.
    let work = svc.data.path().join("work");
    assert!(walk(&work).is_empty(), "{:?}", walk(&work));
}

/// Accepts connections on `addr` and counts them; the test fails if any arrive.
async fn trap(addr: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind trap");
    let local = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (local, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_networks_are_never_contacted_on_any_hop() {
    let svc = Service::start(&["--sources-deny-networks", "127.0.0.2/32,::1/128"]).await;
    let cb = Callbacks::start().await;
    let (trap_addr, hits) = trap("127.0.0.2:0").await;

    // A literal denied address: refused at once.
    let b = body(&format!("http://{trap_addr}/src.tgz"), &cb);
    let (code, v) = svc.post(&b).await;
    assert_eq!(code.as_u16(), 400, "{v}");
    assert!(v["status"].as_str().unwrap().contains("denied network"));
    let b = body("http://[::ffff:127.0.0.2]:1/src.tgz", &cb);
    assert_eq!(
        svc.post(&b).await.0.as_u16(),
        400,
        "IPv4-mapped IPv6 is the same address"
    );

    // A redirect hop to a denied address, from an allowed server on 127.0.0.3.
    let redirector = axum::Router::new()
        .route(
            "/hop",
            axum::routing::get(move || async move {
                axum::response::Redirect::temporary(&format!("http://{trap_addr}/src.tgz"))
            }),
        )
        .route(
            "/loop",
            axum::routing::get(|| async { axum::response::Redirect::temporary("/loop") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let raddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, redirector).await;
    });
    let hop = body(&format!("http://{raddr}/hop"), &cb);
    svc.post(&hop).await;
    assert_eq!(
        cb.wait_final(hop["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    let log = svc.log(&hop).await;
    assert!(log.contains("SOURCES_DENY_NETWORKS"), "{log}");

    let looping = body(&format!("http://{raddr}/loop"), &cb);
    svc.post(&looping).await;
    assert_eq!(
        cb.wait_final(looping["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    assert!(
        svc.log(&looping).await.contains("redirects"),
        "{}",
        svc.log(&looping).await
    );

    // A name that resolves only to denied addresses (denied: 127.0.0.1 and ::1 here).
    let svc2 = Service::start(&["--sources-deny-networks", "127.0.0.1/32,::1/128"]).await;
    let (trap2, hits2) = trap("127.0.0.1:0").await;
    let named = body(&format!("http://localhost:{}/src.tgz", trap2.port()), &cb);
    svc2.post(&named).await;
    assert_eq!(
        cb.wait_final(named["build_uuid"].as_str().unwrap(), BUILD)
            .await,
        "failed"
    );
    assert!(
        svc2.log(&named).await.contains("SOURCES_DENY_NETWORKS"),
        "{}",
        svc2.log(&named).await
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the denied address was contacted"
    );
    assert_eq!(
        hits2.load(Ordering::SeqCst),
        0,
        "the denied address was contacted"
    );
}
