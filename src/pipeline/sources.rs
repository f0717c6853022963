//! Fetching sources: `http(s)://` archives (redirects followed, bounded size and time),
//! `data:` URIs (legacy `data:base64,…` and standard `data:<mime>;base64,…`), and parsing of
//! `docker://[user:pass@]host/repo:tag` references. Downloads stream to a file, and at the
//! same time to the context's extraction when asked.

use crate::config::Limits;
use crate::secret::{redact_url, Secret};
use base64::Engine;
use futures::StreamExt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("sources must be an http(s)://, data: or docker:// URI (got scheme {0:?})")]
    UnsupportedScheme(String),
    #[error("the data: URI is not base64 (expected data:base64,… or data:<type>;base64,…)")]
    DataNotBase64,
    #[error("the data: URI's base64 is invalid: {0}")]
    BadBase64(String),
    #[error("the docker:// reference {0:?} is not a valid image reference (docker://[user:pass@]host/repo:tag)")]
    BadDockerRef(String),
    #[error("the sources URL is invalid: {0}")]
    BadUrl(String),
    #[error("downloading the sources from {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("the source server {url} answered {status}")]
    HttpStatus { url: String, status: String },
    #[error("the sources are larger than MAX_SOURCE_BYTES ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("writing the sources to disk failed: {0}")]
    Disk(#[from] std::io::Error),
}

/// A parsed `sources` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Http(reqwest::Url),
    /// The still-encoded base64 payload of a data: URI.
    Data(String),
    Docker(DockerSource),
}

/// `docker://[user:pass@]host/repo:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSource {
    /// `host/repo:tag` (or `@sha256:…`), as dockerd expects it.
    pub image: String,
    /// The registry host part, for credentials.
    pub registry: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

pub fn parse(uri: &str) -> Result<Source, SourceError> {
    let scheme = uri
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        "http" | "https" => reqwest::Url::parse(uri)
            .map(Source::Http)
            .map_err(|e| SourceError::BadUrl(e.to_string())),
        "data" => parse_data(uri).map(|b64| Source::Data(b64.to_string())),
        "docker" => parse_docker(uri).map(Source::Docker),
        _ => Err(SourceError::UnsupportedScheme(scheme)),
    }
}

/// The base64 payload of a `data:` URI, borrowed: a large payload is not copied.
pub fn data_payload(uri: &str) -> Option<&str> {
    uri.get(..5).filter(|s| s.eq_ignore_ascii_case("data:"))?;
    parse_data(uri).ok()
}

fn parse_data(uri: &str) -> Result<&str, SourceError> {
    let rest = &uri[5..];
    let (meta, payload) = rest.split_once(',').ok_or(SourceError::DataNotBase64)?;
    // Legacy: "data:base64,…"; standard: "data:application/zip;base64,…" (parameters allowed).
    if meta
        .split(';')
        .any(|p| p.trim().eq_ignore_ascii_case("base64"))
    {
        Ok(payload)
    } else {
        Err(SourceError::DataNotBase64)
    }
}

fn parse_docker(uri: &str) -> Result<DockerSource, SourceError> {
    // `parse` saw the scheme, so the first 7 bytes are ASCII; what follows may not be.
    let Some(rest) = uri
        .get("docker:".len()..)
        .and_then(|r| r.strip_prefix("//"))
    else {
        return Err(SourceError::BadDockerRef("docker:…".into()));
    };
    let (userinfo, image) = split_userinfo(rest);
    let bad = || SourceError::BadDockerRef(crate::secret::redact(uri, &[userinfo.unwrap_or("")]));
    if !is_image_reference(image) {
        return Err(bad());
    }
    let (username, password) = match userinfo {
        None => (None, None),
        Some(ui) => {
            let (u, p) = ui.split_once(':').ok_or_else(bad)?;
            (
                Some(percent_decode(u)),
                Some(Secret::new(percent_decode(p))),
            )
        }
    };
    let registry = image.split('/').next().unwrap_or_default().to_string();
    Ok(DockerSource {
        image: image.to_string(),
        registry,
        username,
        password,
    })
}

/// `user:pass@image` → (`user:pass`, `image`), at the last '@' before the image's digest
/// (`image@sha256:…`), if any: an '@' followed by a digest belongs to the image.
pub(crate) fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    let body_end = match rest.rsplit_once('@') {
        Some((before, after)) if after.starts_with("sha256:") => before.len(),
        _ => rest.len(),
    };
    match rest[..body_end].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A docker image reference: `host[:port]/path[:tag][@sha256:hex]`, lower-case path
/// components, as in the distribution reference grammar (simplified, anchored).
pub fn is_image_reference(r: &str) -> bool {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(concat!(
            r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?",
            r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
            r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
        ))
        .expect("static regex")
    });
    r.len() <= 512 && re.is_match(r)
}

/// A channel fed the archive's bytes as they are written, and what to start once the archive
/// file exists (the channel's reader): sources that fail before their first byte start
/// nothing.
pub struct Tee {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    on_start: Option<Box<dyn FnOnce() + Send>>,
}

impl Tee {
    pub fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Self {
        Self { tx, on_start: None }
    }

    /// Runs `start` when the archive file is created (at most once).
    pub fn on_start(self, start: impl FnOnce() + Send + 'static) -> Self {
        Self {
            on_start: Some(Box::new(start)),
            ..self
        }
    }
}

/// Where fetched bytes go: a file, and optionally (`tee`) a channel that feeds the context's
/// extraction at the same time. The channel is dropped (and no longer fed) once its reader
/// has stopped.
pub struct ArchiveWriter {
    file: tokio::fs::File,
    tee: Option<Tee>,
}

impl ArchiveWriter {
    pub async fn create(dest: &Path, mut tee: Option<Tee>) -> std::io::Result<Self> {
        // The build's folder is made here, once there is something to keep: sources that
        // fail before their first byte cost the disk nothing.
        if let Some(folder) = dest.parent() {
            tokio::fs::create_dir_all(folder).await?;
        }
        let file = tokio::fs::File::create(dest).await?;
        if let Some(start) = tee.as_mut().and_then(|t| t.on_start.take()) {
            start();
        }
        Ok(Self { file, tee })
    }

    pub async fn write(&mut self, chunk: bytes::Bytes) -> std::io::Result<()> {
        self.file.write_all(&chunk).await?;
        if let Some(tee) = &self.tee {
            if tee.tx.send(chunk).await.is_err() {
                self.tee = None;
            }
        }
        Ok(())
    }

    /// Flushes the file; dropping the writer ends the tee's data.
    pub async fn finish(mut self) -> std::io::Result<()> {
        self.file.flush().await
    }
}

/// Decodes a data: payload into `dest`, in chunks, enforcing the size limit.
pub async fn write_data(b64: &str, dest: &Path, limits: &Limits) -> Result<u64, SourceError> {
    write_data_tee(b64, dest, limits, None).await
}

/// `write_data`, also feeding `tee`.
pub async fn write_data_tee(
    b64: &str,
    dest: &Path,
    limits: &Limits,
    tee: Option<Tee>,
) -> Result<u64, SourceError> {
    let decoded_len = (b64.len() as u64 / 4) * 3;
    if decoded_len > limits.max_source_bytes.saturating_add(3) {
        return Err(SourceError::TooLarge {
            limit: limits.max_source_bytes,
        });
    }
    let mut file = ArchiveWriter::create(dest, tee).await?;
    let engine = base64::engine::general_purpose::STANDARD;
    let trimmed = b64.trim_end();
    let mut written = 0u64;
    // 64 KiB of base64 at a time (a multiple of 4, so padding only ends the last chunk).
    for chunk in trimmed.as_bytes().chunks(DATA_CHUNK) {
        let bytes = engine
            .decode(chunk)
            .map_err(|e| SourceError::BadBase64(e.to_string()))?;
        written += bytes.len() as u64;
        if written > limits.max_source_bytes {
            return Err(SourceError::TooLarge {
                limit: limits.max_source_bytes,
            });
        }
        file.write(bytes.into()).await?;
    }
    file.finish().await?;
    if written > limits.max_source_bytes {
        return Err(SourceError::TooLarge {
            limit: limits.max_source_bytes,
        });
    }
    Ok(written)
}

/// What a build keeps as its `sources` (local mode's state, a BuildJob's credentials
/// Secret) for a `data:` URI whose payload is too large for MAX_SOURCE_BYTES (refused for
/// its length before any decoding): the URI may be hundreds of MiB, so it keeps this, which
/// `Pipeline::run` (and the worker) fail as the URI itself fails.
pub const SOURCES_TOO_LARGE: &str = "data:application/x-buildshuttle-sources-too-large;base64,";

/// The longest `data:` URI a credentials Secret holds, and so the worker's environment: far
/// below the API server's 1 MiB for a Secret's data and Linux's 128 KiB for one environment
/// string (MAX_ARG_STRLEN), past which the Secret is refused or the worker cannot start.
pub const STAND_IN_MAX: usize = 64 * 1024 + 64;

/// The base64 characters `sources::write_data` decodes at a time, each run on its own: a
/// chunk fails (or not) the same way whatever precedes it.
pub const DATA_CHUNK: usize = 64 * 1024;

/// What a build keeps as `sources` for a `data:` URI that could not be decoded (`error`)
/// when it was accepted, instead of a URI that may be hundreds of MiB (in local mode's state,
/// or a BuildJob's Secret and so the worker's environment): one at most STAND_IN_MAX long
/// that the pipeline fails the same way (the same reason, message and log lines as the whole
/// URI). The URI itself when short enough; else, for invalid base64, the chunk whose
/// decoding failed; else (a payload too large for MAX_SOURCE_BYTES, refused for its length)
/// `SOURCES_TOO_LARGE`.
pub fn stand_in(uri: &str, b64: &str, error: &SourceError) -> String {
    if uri.len() <= STAND_IN_MAX {
        return uri.to_string();
    }
    if matches!(error, SourceError::BadBase64(_)) {
        use base64::Engine;
        let payload = b64.trim_end();
        let engine = base64::engine::general_purpose::STANDARD;
        let mut start = 0;
        while start < payload.len() {
            let mut end = (start + DATA_CHUNK).min(payload.len());
            if engine.decode(&payload.as_bytes()[start..end]).is_err() {
                // Whole characters (the chunk before decoded: it is ASCII, `start` is one).
                while !payload.is_char_boundary(end) {
                    end += 1;
                }
                return format!("data:base64,{}", &payload[start..end]);
            }
            start = end;
        }
    }
    SOURCES_TOO_LARGE.to_string()
}

/// Networks sources may never be fetched from (SOURCES_DENY_NETWORKS).
#[derive(Debug, Clone, Default)]
pub struct DenyList(pub Vec<ipnet::IpNet>);

impl DenyList {
    pub fn denies(&self, ip: IpAddr) -> bool {
        // ::ffff:169.254.169.254 is 169.254.169.254.
        let ip = ip.to_canonical();
        // A connection to 0.0.0.0 or :: reaches this host, as loopback does.
        let reached = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            _ => ip,
        };
        self.0
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&reached))
    }

    /// Whether the URL names a denied address literally (no DNS involved).
    pub fn denies_url(&self, url: &reqwest::Url) -> bool {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.denies(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.denies(IpAddr::V6(ip)),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0} is in SOURCES_DENY_NETWORKS")]
struct Denied(String);

/// Resolves names for source downloads, dropping denied addresses. reqwest connects to
/// exactly the addresses returned here, so a name cannot re-resolve to a denied address
/// between the check and the connection.
struct GuardedResolver {
    deny: Arc<DenyList>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let deny = self.deny.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed: Vec<SocketAddr> = addrs.filter(|a| !deny.denies(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(Denied(format!("every address of {host}")))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Says, once at start, that `SOURCES_DENY_NETWORKS` checks only literal addresses when a
/// proxy is set in the environment: the HTTP client then sends every download through the
/// proxy, which (not this process) resolves and connects to the source's host.
pub fn warn_if_proxied(deny: &DenyList) {
    const VARS: [&str; 6] = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ];
    let set = VARS
        .into_iter()
        .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if let (Some(var), false) = (set, deny.0.is_empty()) {
        tracing::warn!(
            proxy_variable = var,
            "source downloads go through the proxy {var} names: SOURCES_DENY_NETWORKS can only \
             refuse literal addresses, so the proxy itself must refuse those networks"
        );
    }
}

/// Most redirects a source download follows.
pub const MAX_REDIRECTS: usize = 10;

/// An HTTP client for source downloads: bounded connect/read/total time, at most
/// `MAX_REDIRECTS` redirects, and no connection to a denied network on any hop.
pub fn http_client(
    connect_timeout: Duration,
    total_timeout: Duration,
    deny: DenyList,
) -> reqwest::Client {
    let deny = Arc::new(deny);
    let redirect_deny = deny.clone();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if redirect_deny.denies_url(attempt.url()) {
            let host = attempt.url().host_str().unwrap_or_default().to_string();
            return attempt.error(Denied(format!("redirect target {host}")));
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(Duration::from_secs(60))
        .timeout(total_timeout)
        .redirect(policy)
        .dns_resolver(Arc::new(GuardedResolver { deny }))
        .build()
        .unwrap_or_default()
}

/// Downloads `url` into `dest` (and `tee`), streaming, failing on a 4xx/5xx or past the
/// size limit.
pub async fn download(
    client: &reqwest::Client,
    deny: &DenyList,
    url: &reqwest::Url,
    dest: &Path,
    limits: &Limits,
    tee: Option<Tee>,
) -> Result<u64, SourceError> {
    let shown = redact_url(url.as_str());
    if deny.denies_url(url) {
        return Err(SourceError::Download {
            url: shown,
            reason: "its address is in SOURCES_DENY_NETWORKS".into(),
        });
    }
    let download_err = |e: reqwest::Error| SourceError::Download {
        url: shown.clone(),
        reason: describe(e),
    };
    let resp = client.get(url.clone()).send().await.map_err(download_err)?;
    if let Some(remote) = resp.remote_addr() {
        tracing::debug!(%remote, "downloading sources");
    }
    if !resp.status().is_success() {
        return Err(SourceError::HttpStatus {
            url: shown,
            status: resp.status().to_string(),
        });
    }
    if resp
        .content_length()
        .is_some_and(|l| l > limits.max_source_bytes)
    {
        return Err(SourceError::TooLarge {
            limit: limits.max_source_bytes,
        });
    }
    let mut file = ArchiveWriter::create(dest, tee).await?;
    let mut body = resp.bytes_stream();
    let mut written = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(download_err)?;
        written += chunk.len() as u64;
        if written > limits.max_source_bytes {
            return Err(SourceError::TooLarge {
                limit: limits.max_source_bytes,
            });
        }
        file.write(chunk).await?;
    }
    file.finish().await?;
    Ok(written)
}

fn describe(e: reqwest::Error) -> String {
    let denied = {
        let mut cause: Option<&dyn std::error::Error> = Some(&e);
        let mut found = None;
        while let Some(c) = cause {
            if let Some(d) = c.downcast_ref::<Denied>() {
                found = Some(d.to_string());
            }
            cause = c.source();
        }
        found
    };
    if let Some(d) = denied {
        return format!("refused: {d}");
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "too many redirects"
    } else {
        return e.without_url().to_string();
    };
    // The innermost cause says why (refused, DNS, TLS) without repeating the URL.
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{kind}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_archive_file_brings_its_build_folder() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("work").join("b1").join("sources");
        let mut w = ArchiveWriter::create(&dest, None).await.unwrap();
        w.write(bytes::Bytes::from_static(b"abc")).await.unwrap();
        w.finish().await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
    }

    #[tokio::test]
    async fn the_tee_starts_its_reader_with_the_archive_file_and_not_before() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_source_bytes: 1 << 20,
            max_context_bytes: 1 << 20,
            max_archive_entries: 100,
        };
        let started = Arc::new(AtomicUsize::new(0));
        let tee = |rx_to: &mut Vec<tokio::sync::mpsc::Receiver<bytes::Bytes>>| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            rx_to.push(rx);
            let started = started.clone();
            Tee::new(tx).on_start(move || {
                started.fetch_add(1, Ordering::SeqCst);
            })
        };
        let mut readers = Vec::new();
        // Nothing listens there: the download fails before its first byte.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = reqwest::Url::parse(&format!("http://{closed}/gone.tgz")).unwrap();
        let client = http_client(
            Duration::from_secs(5),
            Duration::from_secs(5),
            DenyList::default(),
        );
        let dest = dir.path().join("b1").join("sources");
        let t = tee(&mut readers);
        assert!(
            download(&client, &DenyList::default(), &url, &dest, &limits, Some(t))
                .await
                .is_err()
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            0,
            "no reader for a failed connect"
        );
        assert!(!dest.exists());
        // The archive file exists: its reader starts, once, and gets the bytes.
        let t = tee(&mut readers);
        assert_eq!(
            write_data_tee("QUJD", &dest, &limits, Some(t))
                .await
                .unwrap(),
            3
        );
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert_eq!(
            readers[1].recv().await.unwrap(),
            bytes::Bytes::from_static(b"ABC")
        );
    }

    #[test]
    fn parses_each_scheme() {
        assert!(matches!(
            parse("https://example.com/a.tgz").unwrap(),
            Source::Http(_)
        ));
        assert_eq!(
            parse("data:base64,QUJD").unwrap(),
            Source::Data("QUJD".into())
        );
        assert_eq!(
            parse("data:application/zip;base64,QUJD").unwrap(),
            Source::Data("QUJD".into())
        );
        assert!(matches!(
            parse("data:text/plain,hello"),
            Err(SourceError::DataNotBase64)
        ));
        assert!(matches!(parse("ftp://x/y"), Err(SourceError::UnsupportedScheme(s)) if s == "ftp"));
        assert!(matches!(
            parse("/etc/passwd"),
            Err(SourceError::UnsupportedScheme(_))
        ));
    }

    #[test]
    fn docker_refs_with_and_without_credentials() {
        let Source::Docker(d) = parse("docker://bob:p%40ss@reg.example:5000/team/app:1.2").unwrap()
        else {
            panic!()
        };
        assert_eq!(d.image, "reg.example:5000/team/app:1.2");
        assert_eq!(d.registry, "reg.example:5000");
        assert_eq!(d.username.as_deref(), Some("bob"));
        assert_eq!(d.password.unwrap().expose(), "p@ss");
        let Source::Docker(d) = parse("docker://127.0.0.1:5000/base/busybox:1").unwrap() else {
            panic!()
        };
        assert!(d.username.is_none());
        let digest = format!("docker://h/r@sha256:{}", "a".repeat(64));
        assert!(parse(&digest).is_ok());
        // Credentials and a digest together.
        let both = format!("docker://bob:hunter22@h/r@sha256:{}", "a".repeat(64));
        let Source::Docker(d) = parse(&both).unwrap() else {
            panic!()
        };
        assert_eq!(d.image, format!("h/r@sha256:{}", "a".repeat(64)));
        assert_eq!(d.password.unwrap().expose(), "hunter22");
        let e = parse(&format!(
            "docker://bob:hunter22@H/R@sha256:{}",
            "a".repeat(64)
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter22"), "{e}");
        for bad in [
            "docker://",
            "docker://Host/UPPER:tag",
            "docker://h/r:tag with space",
            "docker://u:p@",
            "docker:aé",
            "DOCKER:é//x",
            "docker:",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse("docker://bob:hunter22@/BAD").unwrap_err().to_string();
        assert!(!e.contains("hunter22"), "{e}");
    }

    #[test]
    fn deny_list_matches_canonical_addresses() {
        let deny = DenyList(vec![
            "169.254.0.0/16".parse().unwrap(),
            "fd00:ec2::254/128".parse().unwrap(),
        ]);
        assert!(deny.denies("169.254.169.254".parse().unwrap()));
        assert!(deny.denies("::ffff:169.254.169.254".parse().unwrap()));
        assert!(deny.denies("fd00:ec2::254".parse().unwrap()));
        assert!(!deny.denies("127.0.0.1".parse().unwrap()));
        // The unspecified addresses reach this host: denied with loopback.
        let loopback = DenyList(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        for ip in ["0.0.0.0", "::", "::ffff:0.0.0.0", "127.0.0.2", "::1"] {
            assert!(loopback.denies(ip.parse().unwrap()), "{ip}");
        }
        assert!(loopback.denies_url(&"http://0.0.0.0:2375/".parse().unwrap()));
        assert!(!loopback.denies("10.0.0.1".parse().unwrap()));
        assert!(!deny.denies("0.0.0.0".parse().unwrap()));
        assert!(deny.denies_url(&"http://169.254.169.254/latest".parse().unwrap()));
        assert!(deny.denies_url(&"http://[::ffff:a9fe:a9fe]/".parse().unwrap()));
        assert!(!deny.denies_url(&"http://metadata.example/".parse().unwrap()));
    }

    #[tokio::test]
    async fn data_is_decoded_in_chunks_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&payload);
        let limits = Limits {
            max_source_bytes: 1 << 20,
            max_context_bytes: 1 << 20,
            max_archive_entries: 10,
        };
        let dest = dir.path().join("a");
        assert_eq!(write_data(&b64, &dest, &limits).await.unwrap(), 200_000);
        assert_eq!(std::fs::read(&dest).unwrap(), payload);
        let small = Limits {
            max_source_bytes: 1000,
            ..limits
        };
        assert!(matches!(
            write_data(&b64, &dest, &small).await,
            Err(SourceError::TooLarge { .. })
        ));
        assert!(matches!(
            write_data("!!!!", &dest, &limits).await,
            Err(SourceError::BadBase64(_))
        ));
    }
}
