//! Shared test harness: the service in-process (or as the real binary), a callback
//! receiver, a source server, archive makers and registry helpers. Everything listens on
//! 127.0.0.1. The real dockerd and registries come from `.ci/services`.
#![allow(dead_code)]

pub mod bin;
pub mod cluster;
pub mod kafka;

use axum::body::Bytes;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const REGISTRY: &str = "127.0.0.1:5000";
pub const AUTH_REGISTRY: &str = "127.0.0.1:5001";
pub const AUTH_USER: &str = "shuttle";
pub const AUTH_PASS: &str = "s3cret-pw";
pub const BASE_IMAGE: &str = "test/busybox:latest";

/// Fails fast with a useful message when the test services are not up.
pub fn require_services() {
    let ok = std::path::Path::new("/var/run/docker.sock").exists()
        && std::net::TcpStream::connect(REGISTRY).is_ok()
        && std::net::TcpStream::connect(AUTH_REGISTRY).is_ok();
    assert!(
        ok,
        "dockerd and the test registries are not running: run `bash .ci/services` first"
    );
}

pub async fn serve_router(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// The S3 bucket of the tests: s3s-fs as `.ci/services` starts it.
pub const S3_ENDPOINT: &str = "http://127.0.0.1:9100";
pub const S3_BUCKET: &str = "buildshuttle-test";
pub const S3_ACCESS: &str = "buildshuttle-test";
pub const S3_SECRET: &str = "buildshuttle-test-secret";

pub fn require_s3() {
    assert!(
        std::net::TcpStream::connect("127.0.0.1:9100").is_ok(),
        "s3s-fs is not running on 127.0.0.1:9100: run `bash .ci/services` first"
    );
}

/// `serve` flags for the test bucket at `endpoint` (s3s-fs, or a proxy in front of it).
pub fn s3_flags_at(endpoint: &str) -> Vec<&str> {
    require_s3();
    vec![
        "--s3-bucket",
        S3_BUCKET,
        "--s3-endpoint",
        endpoint,
        "--s3-access-key",
        S3_ACCESS,
        "--s3-secret-key",
        S3_SECRET,
        "--s3-region",
        "us-east-1",
    ]
}

/// A running buildshuttle (in-process) with its own DATA_DIR.
pub struct Service {
    pub addr: SocketAddr,
    pub data: tempfile::TempDir,
    pub client: reqwest::Client,
}

impl Service {
    /// Starts `serve` with these extra flags (e.g. `["--maximum-parallel-builds", "1"]`).
    pub async fn start(extra: &[&str]) -> Service {
        require_services();
        let data = tempfile::tempdir().expect("tempdir");
        let mut argv: Vec<String> = vec![
            "buildshuttle".into(),
            "serve".into(),
            "--listen-address".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
            "--data-dir".into(),
            data.path().display().to_string(),
            "--callback-retry-seconds".into(),
            "20".into(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let cli = buildshuttle::config::Cli::try_parse_from(argv).expect("valid flags");
        #[allow(irrefutable_let_patterns)]
        let buildshuttle::config::Command::Serve(args) = cli.command
        else {
            panic!("not serve")
        };
        let cfg = args.validate().expect("valid config");
        let started = buildshuttle::serve::start(cfg)
            .await
            .expect("service starts");
        let addr = started.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = buildshuttle::serve::serve(started).await;
        });
        Service {
            addr,
            data,
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url("/"))
            .json(body)
            .send()
            .await
            .expect("POST /");
        let code = resp.status();
        (code, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn log(&self, b: &Value) -> String {
        let path = logs_path(b);
        let resp = self
            .client
            .get(self.url(&path))
            .send()
            .await
            .expect("GET logs");
        if resp.status() != StatusCode::OK {
            return String::new();
        }
        resp.text().await.unwrap_or_default()
    }

    /// Polls the log until it contains `needle`.
    pub async fn wait_log(&self, b: &Value, needle: &str, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.log(b).await;
            if log.contains(needle) {
                return log;
            }
            assert!(
                start.elapsed() < within,
                "log never contained {needle:?}; log so far:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One received callback.
#[derive(Clone, Debug)]
pub struct Call {
    pub path: String,
    /// The URL's query, if it had one.
    pub query: Option<String>,
    pub auth: Option<String>,
    pub content_type: Option<String>,
    pub raw: String,
    pub body: Value,
    pub at: Instant,
}

/// Records callbacks; can answer 500 to the first `fail_first` requests.
#[derive(Clone)]
pub struct Callbacks {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
}

#[derive(Clone)]
struct CbState {
    calls: Arc<Mutex<Vec<Call>>>,
    fail_first: Arc<AtomicUsize>,
}

async fn record(
    State(st): State<CbState>,
    AxPath(rest): AxPath<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if st
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let raw = String::from_utf8_lossy(&body).into_owned();
    st.calls.lock().unwrap().push(Call {
        path: format!("/{rest}"),
        query,
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
        at: Instant::now(),
    });
    StatusCode::OK
}

impl Callbacks {
    pub async fn start() -> Callbacks {
        Self::start_failing(0).await
    }

    pub async fn start_failing(fail_first: usize) -> Callbacks {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let st = CbState {
            calls: calls.clone(),
            fail_first: Arc::new(AtomicUsize::new(fail_first)),
        };
        let router = Router::new().route("/{*rest}", post(record)).with_state(st);
        let addr = serve_router(router).await;
        Callbacks { addr, calls }
    }

    pub fn url(&self, build_uuid: &str) -> String {
        format!("http://{}/builds/{build_uuid}", self.addr)
    }

    pub fn calls_for(&self, build_uuid: &str) -> Vec<Call> {
        let path = format!("/builds/{build_uuid}");
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Waits for the final (succeeded/failed) callback of a build and returns its status.
    pub async fn wait_final(&self, build_uuid: &str, within: Duration) -> String {
        let start = Instant::now();
        loop {
            let calls = self.calls_for(build_uuid);
            if let Some(c) = calls.iter().find(|c| c.body["status"] != "pending") {
                return c.body["status"].as_str().unwrap_or_default().to_string();
            }
            assert!(
                start.elapsed() < within,
                "no final callback for {build_uuid} within {within:?}; got {calls:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

type FileMap = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// Serves files at `/{name}`, redirects `/redirect/{name}` → `/{name}`, anything else 404.
/// `/slow/{name}` sends the file 16 KiB every 20 ms; `/cut/{name}` sends half of it that way
/// and then breaks the connection.
pub struct Files {
    pub addr: SocketAddr,
    files: FileMap,
}

async fn file(State(files): State<FileMap>, AxPath(name): AxPath<String>) -> Response {
    match files.lock().unwrap().get(&name) {
        Some(b) => b.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The file in 16 KiB pieces, 20 ms apart; `cut`: only the first half, then an error.
fn trickle(files: &FileMap, name: &str, cut: bool) -> Response {
    use futures::StreamExt;
    let Some(bytes) = files.lock().unwrap().get(name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let end = if cut { bytes.len() / 2 } else { bytes.len() };
    let pieces: Vec<Bytes> = bytes[..end]
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let body = futures::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>))
        .then(|piece| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            piece
        })
        .chain(futures::stream::iter(
            cut.then(|| Err(std::io::Error::other("cut"))),
        ));
    axum::body::Body::from_stream(body).into_response()
}

impl Files {
    pub async fn start() -> Files {
        let files = Arc::new(Mutex::new(HashMap::new()));
        let router = Router::new()
            .route(
                "/redirect/{name}",
                get(|AxPath(name): AxPath<String>| async move {
                    Redirect::temporary(&format!("/{name}"))
                }),
            )
            .route(
                "/slow/{name}",
                get(
                    |State(f): State<FileMap>, AxPath(name): AxPath<String>| async move {
                        trickle(&f, &name, false)
                    },
                ),
            )
            .route(
                "/cut/{name}",
                get(
                    |State(f): State<FileMap>, AxPath(name): AxPath<String>| async move {
                        trickle(&f, &name, true)
                    },
                ),
            )
            .route("/{name}", get(file))
            .with_state(files.clone());
        let addr = serve_router(router).await;
        Files { addr, files }
    }

    pub fn put(&self, name: &str, bytes: Vec<u8>) -> String {
        self.files.lock().unwrap().insert(name.to_string(), bytes);
        format!("http://{}/{name}", self.addr)
    }
}

/// Whether the build step whose log line contains `step` came from the layer cache: the
/// classic builder's ` ---> Using cache` within the next two lines, or BuildKit's `#N CACHED`
/// for the step's `#N`.
pub fn step_cached(log: &str, step: &str) -> bool {
    let lines: Vec<&str> = log.lines().collect();
    lines.iter().enumerate().any(|(at, line)| {
        if !line.contains(step) {
            return false;
        }
        if let Some(n) = line.strip_prefix('#').and_then(|l| l.split(' ').next()) {
            return lines.contains(&format!("#{n} CACHED").as_str());
        }
        lines[at + 1..]
            .iter()
            .take(2)
            .any(|l| l.contains("Using cache"))
    })
}

/// Whether any `RUN` or `COPY` step of the build came from the layer cache.
pub fn used_cache(log: &str) -> bool {
    step_cached(log, "RUN ") || step_cached(log, "COPY ")
}

/// Whether BuildKit built it: its steps end in `#N DONE …` lines (the classic builder's in
/// `Step N/M : …`).
pub fn built_by_buildkit(log: &str) -> bool {
    log.lines()
        .any(|l| l.starts_with('#') && l.contains(" DONE "))
}

/// A Dockerfile step unique to this call: everything after it misses dockerd's layer
/// cache, so the build's output really appears in the log on every run.
pub fn cache_buster() -> String {
    format!("RUN echo run-{}", uuid::Uuid::new_v4().simple())
}

/// A build (as a data: URI) that prints `{marker}-start`, sleeps, then prints
/// `{marker}-end`. The shell computes the markers, so the echoed Dockerfile step never
/// contains them; the cache buster makes the step run every time.
pub fn sleeper(marker: &str, secs: u32) -> String {
    let df = format!(
        "FROM {BASE_IMAGE}\n{}\nRUN echo {marker}-$(echo start) && sleep {secs} && echo {marker}-$(echo end)\n",
        cache_buster()
    );
    data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())]))
}

pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(enc);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("tar entry");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

pub fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .expect("zip entry");
        w.write_all(data).expect("zip write");
    }
    w.finish().expect("zip").into_inner()
}

pub fn data_uri(bytes: &[u8]) -> String {
    use base64::Engine;
    format!(
        "data:base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A controller-api style body with fresh uuids.
pub fn body(sources: &str, callbacks: &Callbacks) -> Value {
    let build_uuid = uuid::Uuid::new_v4().to_string();
    json!({
        "sha": "0123abc", "app": format!("app{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        "space": "default", "branch": "master", "repo": "https://example.invalid/repo", "org": "test",
        "callback": callbacks.url(&build_uuid), "callback_auth": "cb-secret-token",
        "build_uuid": build_uuid, "app_uuid": uuid::Uuid::new_v4().to_string(), "build_number": 1,
        "sources": sources, "gm_registry_host": REGISTRY, "gm_registry_repo": "akkeris",
    })
}

/// The API path of the build `b` posts: `/{app}-{app_uuid}/{build_number}` (DELETE stops it;
/// `/logs` after it is its log).
pub fn build_path(b: &Value) -> String {
    format!(
        "/{}-{}/{}",
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap(),
        b["build_number"]
    )
}

/// The API path of the build `b`'s log.
pub fn logs_path(b: &Value) -> String {
    format!("{}/logs", build_path(b))
}

pub fn image_repo(b: &Value) -> String {
    format!(
        "{}/{}-{}",
        b["gm_registry_repo"].as_str().unwrap(),
        b["app"].as_str().unwrap(),
        b["app_uuid"].as_str().unwrap()
    )
}

/// Tags of `repo` in a registry (basic auth when given).
pub async fn registry_tags(registry: &str, repo: &str, auth: Option<(&str, &str)>) -> Vec<String> {
    tags_list(&format!("http://{registry}/v2/{repo}/tags/list"), auth).await
}

/// The digest a registry gives `repo:tag`'s manifest (`None` when it has none).
pub async fn manifest_digest(
    registry: &str,
    repo: &str,
    tag: &str,
    auth: Option<(&str, &str)>,
) -> Option<String> {
    let mut req = reqwest::Client::new()
        .head(format!("http://{registry}/v2/{repo}/manifests/{tag}"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        );
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.ok()?;
    resp.status().is_success().then_some(())?;
    resp.headers()
        .get("docker-content-digest")?
        .to_str()
        .ok()
        .map(String::from)
}

/// The labels of the local image `image` once it is the build `build_uuid`'s (waits for it).
pub async fn local_labels(
    image: &str,
    build_uuid: &str,
) -> std::collections::HashMap<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let labels = docker()
            .inspect_image(image)
            .await
            .ok()
            .and_then(|i| i.config?.labels)
            .unwrap_or_default();
        if labels.get("build_uuid").map(String::as_str) == Some(build_uuid) {
            return labels;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{image} never became the build {build_uuid}'s image: {labels:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reverse proxy on loopback in front of the registry `upstream` that answers `500` to the
/// requests `refuse` picks (method, path, User-Agent) and forwards every other one, streamed
/// both ways. Its address, a registry host dockerd treats as insecure like any on loopback.
pub async fn registry_proxy(
    upstream: &'static str,
    refuse: fn(&str, &str, &str) -> bool,
) -> String {
    proxy(
        upstream,
        move |method, path, agent| {
            refuse(method, path, agent).then_some(Reply::Status(500, "refused by the test's proxy"))
        },
        |_, _| None,
    )
    .await
}

/// What a test's `proxy` answers in place of the upstream.
pub enum Reply {
    /// This status and body.
    Status(u16, &'static str),
    /// This status and body once the request's body has been read to its end (as dockerd
    /// answers a build: after the context).
    AfterBody(u16, &'static str),
    /// Nothing, ever, as a hung server (the connection stays open).
    Hang,
    /// The upstream's status and headers and the first this many bytes of its body, then
    /// nothing more, ever: a server that stalls mid-body.
    StallAfter(usize),
}

/// A reverse proxy on loopback in front of `upstream`: `answer` (method, path with query,
/// User-Agent) may answer a request itself, or hang; `rewrite` (method, upstream's
/// status) may replace an upstream answer; everything else is forwarded, streamed both ways
/// and headers unchanged (so signatures over the Host header still verify). Its address.
pub async fn proxy(
    upstream: &'static str,
    answer: impl Fn(&str, &str, &str) -> Option<Reply> + Clone + Send + Sync + 'static,
    rewrite: fn(&str, u16) -> Option<(u16, &'static str)>,
) -> String {
    use axum::body::Body;
    use axum::http::{Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let reply = |status: u16, body: &'static str| {
        Response::builder()
            .status(status)
            .body(Body::from(body))
            .expect("response")
    };
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let (client, answer) = (client.clone(), answer.clone());
        async move {
            let agent = req
                .headers()
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let method = req.method().as_str().to_string();
            let stall_after = match answer(&method, &path, &agent) {
                Some(Reply::Status(status, body)) => return reply(status, body),
                Some(Reply::AfterBody(status, body)) => {
                    let _ = axum::body::to_bytes(req.into_body(), usize::MAX).await;
                    return reply(status, body);
                }
                Some(Reply::Hang) => return std::future::pending().await,
                Some(Reply::StallAfter(n)) => Some(n),
                None => None,
            };
            let mut out = client.request(req.method().clone(), format!("http://{upstream}{path}"));
            // The Host header stays the proxy's: the registry builds its Location URLs from it.
            for (k, v) in req.headers() {
                out = out.header(k, v);
            }
            let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
            let Ok(resp) = out.body(body).send().await else {
                return reply(502, "");
            };
            if let Some((status, body)) = rewrite(&method, resp.status().as_u16()) {
                return reply(status, body);
            }
            let mut back = Response::builder().status(resp.status().as_u16());
            for (k, v) in resp.headers() {
                back = back.header(k, v);
            }
            let body = match stall_after {
                None => Body::from_stream(resp.bytes_stream()),
                Some(n) => Body::from_stream(first_bytes(resp.bytes_stream(), n)),
            };
            back.body(body).expect("response")
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The first `n` bytes of `body`, then a stream that never yields (nor ends).
fn first_bytes<E: Send + 'static>(
    body: impl futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    n: usize,
) -> impl futures::Stream<Item = Result<Bytes, E>> + Send + 'static {
    use futures::StreamExt;
    futures::stream::unfold((body.boxed(), n), |(mut body, left)| async move {
        if left == 0 {
            return None;
        }
        let mut chunk = match body.next().await? {
            Ok(chunk) => chunk,
            Err(e) => return Some((Err(e), (body, 0))),
        };
        chunk.truncate(left);
        let left = left - chunk.len();
        Some((Ok(chunk), (body, left)))
    })
    .chain(futures::stream::pending())
}

/// The image config `repo:tag` names in `registry` (as JSON) and its digest, which is the
/// image's ID wherever it is loaded or pulled.
pub async fn registry_config(
    registry: &str,
    repo: &str,
    tag: &str,
    auth: Option<(&str, &str)>,
) -> Option<(String, serde_json::Value)> {
    let json = |url: String| async move {
        let req = reqwest::Client::new().get(url).header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        );
        let req = match auth {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        };
        req.send()
            .await
            .ok()?
            .json::<serde_json::Value>()
            .await
            .ok()
    };
    let manifest = json(format!("http://{registry}/v2/{repo}/manifests/{tag}")).await?;
    let digest = manifest["config"]["digest"].as_str()?.to_string();
    let config = json(format!("http://{registry}/v2/{repo}/blobs/{digest}")).await?;
    Some((digest, config))
}

/// The tags a registry's `tags/list` at `url` answers (none when it cannot be read).
pub async fn tags_list(url: &str, auth: Option<(&str, &str)>) -> Vec<String> {
    let mut req = reqwest::Client::new().get(url);
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let Ok(resp) = req.send().await else {
        return vec![];
    };
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    v["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_unix_defaults().expect("docker socket")
}

/// How many processes of this host run exactly the command `needle` (e.g. `sleep 301`): a
/// build step's process, wherever it runs (a classic builder's container or a BuildKit step;
/// both are processes of this host, in namespaces of their own).
pub async fn running_steps_with(needle: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmd| {
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
            args.join(&b' ') == needle.as_bytes()
        })
        .count()
}

/// Waits until `running_steps_with(needle)` is `want`, or panics after `within`.
/// A step's shell prints its marker before it forks the command after it, so a
/// log line can be seen a moment before that process exists.
pub async fn wait_running_steps_with(needle: &str, want: usize, within: Duration) {
    let start = std::time::Instant::now();
    loop {
        let now = running_steps_with(needle).await;
        if now == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{now} processes run {needle:?}, expected {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A callback receiver that takes `delay` to answer each POST (a slow controller-api).
pub struct SlowReceiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<String>>>,
}

impl SlowReceiver {
    pub async fn start(delay: Duration) -> SlowReceiver {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let router = Router::new().route(
            "/cb",
            post(move |axum::Json(v): axum::Json<Value>| {
                let g = g.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    g.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(v["status"].as_str().unwrap_or("").to_string());
                    "ok"
                }
            }),
        );
        let addr = serve_router(router).await;
        SlowReceiver { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    /// Statuses answered so far, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
