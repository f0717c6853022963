//! Works on images already pushed, through the registry's HTTP API (the OCI distribution
//! spec), where dockerd would be slower:
//! - `add_tag`: a second tag for a manifest (GET it by digest, PUT the same bytes under the
//!   tag). dockerd's push of a second tag checks every layer and then writes that same
//!   manifest; this is two requests (plus the auth challenge).
//! - `relabel`: the image's labels set in the registry (a copy of its config with the labels,
//!   and a manifest naming it), where the classic builder would spend a build step (a
//!   container created and committed) on a `LABEL` instruction.
//!
//! Any failure here is the caller's cue to do it with dockerd instead, so it never fails a
//! build by itself.
//!
//! Credentials go only where dockerd would send them: over https, or over http to a
//! registry dockerd itself treats as insecure (`--insecure-registry`, 127.0.0.0/8).

use bollard::auth::DockerCredentials;
use bollard::Docker;
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} is not a registry host this client talks to (Docker Hub or none)")]
    NotSupported(String),
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Unexpected(String),
}

impl RegistryError {
    /// A request to `url` that got no answer. A blob's storage (after a redirect) is often
    /// a pre-signed URL, whose query is a credential: neither it nor reqwest's own copy of
    /// the URL goes into the message.
    fn unreachable(url: &str, e: reqwest::Error) -> Self {
        RegistryError::Unreachable {
            url: crate::secret::redact_url(url),
            message: e.without_url().to_string(),
        }
    }

    fn status(url: &str, status: reqwest::StatusCode) -> Self {
        RegistryError::Status {
            url: crate::secret::redact_url(url),
            status: status.as_u16(),
        }
    }
}

/// The image an image's relabelling left in the registry.
#[derive(Debug, Clone)]
pub struct Relabelled {
    /// The new manifest's digest (what the tags now name).
    pub digest: String,
    /// The new config, byte for byte (its sha256 is the image's ID).
    pub config: bytes::Bytes,
    /// How many layers the image has.
    pub layers: usize,
}

/// A config blob larger than this is not an image config this client edits.
const MAX_CONFIG_BYTES: usize = 4 << 20;
const SINGLE_MANIFESTS: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
];

/// The manifest media types dockerd pushes (and their OCI equivalents).
const MANIFEST_TYPES: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.index.v1+json";

/// A small registry client; one per pipeline.
pub struct Registry {
    http: reqwest::Client,
    docker: Docker,
    /// dockerd's insecure-registry settings, read once.
    insecure: OnceCell<Insecure>,
    /// The scheme that worked per registry host, so https is not retried on every build.
    schemes: Mutex<HashMap<String, &'static str>>,
    /// Hosts this process could not reach (dockerd may: another network), and when: for
    /// UNREACHABLE_PAUSE their builds go straight to dockerd's push.
    unreachable: Mutex<HashMap<String, Instant>>,
    /// Hosts where relabelling failed, and when: for UNREACHABLE_PAUSE their builds' labels
    /// go back into the Dockerfile rather than costing a failed try and a second push each.
    relabel_failed: Mutex<HashMap<String, Instant>>,
}

const UNREACHABLE_PAUSE: Duration = Duration::from_secs(600);

/// Which registries dockerd talks to over plain http.
#[derive(Debug, Default)]
struct Insecure {
    cidrs: Vec<ipnet::IpNet>,
    /// Per registry host (with port): `true` when dockerd calls it secure.
    hosts: HashMap<String, bool>,
}

impl Insecure {
    fn allows_http(&self, host: &str, ips: &[IpAddr]) -> bool {
        match self.hosts.get(host) {
            Some(secure) => !secure,
            None => ips
                .iter()
                .any(|ip| self.cidrs.iter().any(|n| n.contains(ip))),
        }
    }
}

/// Whether `host` was put in `map` less than UNREACHABLE_PAUSE ago.
fn recent(map: &Mutex<HashMap<String, Instant>>, host: &str) -> bool {
    map.lock()
        .ok()
        .and_then(|m| m.get(host).copied())
        .is_some_and(|at| at.elapsed() < UNREACHABLE_PAUSE)
}

/// `host[:port]` and the repository name inside it, for `host[:port]/path`.
fn split_repo(repo: &str) -> Option<(&str, &str)> {
    let (host, name) = repo.split_once('/')?;
    // Docker's rule: the first component is a registry host only when it looks like one.
    let is_host = host.contains('.') || host.contains(':') || host == "localhost";
    (is_host && !name.is_empty()).then_some((host, name))
}

/// `host[:port]` without the port (and an IPv6 literal without its brackets).
fn hostname(host: &str) -> &str {
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    bare.trim_start_matches('[').trim_end_matches(']')
}

impl Registry {
    pub fn new(docker: Docker) -> Self {
        Self::with_insecure(docker, OnceCell::new())
    }

    fn with_insecure(docker: Docker, insecure: OnceCell<Insecure>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            http,
            docker,
            insecure,
            schemes: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            relabel_failed: Mutex::new(HashMap::new()),
        }
    }

    /// Tags `repo@digest` as `repo:tag` in its registry.
    pub async fn add_tag(
        &self,
        repo: &str,
        digest: &str,
        tag: &str,
        auth: Option<&DockerCredentials>,
    ) -> Result<(), RegistryError> {
        let mut session = self.open(repo, auth).await?;
        let tagged = async {
            let (media_type, body) = session.get_manifest(digest).await?;
            session.put_manifest(tag, &media_type, body).await
        }
        .await;
        self.note(session.host, tagged)
    }

    /// Whether `relabel` is worth trying for `repo`: a registry host in the name, neither found
    /// unreachable nor failing to relabel a moment ago.
    pub fn can_relabel(&self, repo: &str) -> bool {
        split_repo(repo).is_some_and(|(host, _)| {
            !recent(&self.unreachable, host) && !recent(&self.relabel_failed, host)
        })
    }

    /// Sets `labels` on the image `repo@digest` (over any it has) and writes the result under
    /// each of `tags`. The layers stay where they are: only a config and a manifest are new.
    pub async fn relabel(
        &self,
        repo: &str,
        digest: &str,
        labels: &BTreeMap<String, String>,
        tags: &[&str],
        auth: Option<&DockerCredentials>,
    ) -> Result<Relabelled, RegistryError> {
        let mut session = self.open(repo, auth).await?;
        let relabelled = async {
            let (media_type, manifest) = session.get_manifest(digest).await?;
            if !SINGLE_MANIFESTS.contains(&media_type.as_str()) {
                return Err(RegistryError::Unexpected(format!(
                    "{repo}@{digest} is a {media_type}, not one image's manifest"
                )));
            }
            let mut manifest: serde_json::Value = serde_json::from_slice(&manifest)
                .map_err(|e| RegistryError::Unexpected(format!("{repo}@{digest}: {e}")))?;
            let config_digest = manifest["config"]["digest"]
                .as_str()
                .ok_or_else(|| {
                    RegistryError::Unexpected(format!("{repo}@{digest} names no config"))
                })?
                .to_string();
            let config = session.get_blob(&config_digest).await?;
            let (config, layers) = with_labels(&config, labels).map_err(|e| {
                RegistryError::Unexpected(format!("the config of {repo}@{digest}: {e}"))
            })?;
            let config_digest = sha256_digest(&config);
            session.put_blob(&config_digest, config.clone()).await?;
            manifest["config"]["digest"] = config_digest.into();
            manifest["config"]["size"] = config.len().into();
            let manifest = bytes::Bytes::from(manifest.to_string());
            for tag in tags {
                session
                    .put_manifest(tag, &media_type, manifest.clone())
                    .await?;
            }
            Ok(Relabelled {
                digest: sha256_digest(&manifest),
                config,
                layers,
            })
        }
        .await;
        if let (Err(_), Ok(mut m)) = (&relabelled, self.relabel_failed.lock()) {
            m.insert(session.host.to_string(), Instant::now());
        }
        self.note(session.host, relabelled)
    }

    /// A session with `repo`'s registry, unless this process could not reach it a moment ago.
    async fn open<'a>(
        &'a self,
        repo: &'a str,
        auth: Option<&'a DockerCredentials>,
    ) -> Result<Session<'a>, RegistryError> {
        let (host, name) =
            split_repo(repo).ok_or_else(|| RegistryError::NotSupported(repo.to_string()))?;
        if recent(&self.unreachable, host) {
            return Err(RegistryError::NotSupported(format!(
                "{host} (unreachable from here a moment ago)"
            )));
        }
        Ok(Session {
            client: self,
            host,
            name,
            auth,
            scheme: self.scheme_for(host).await,
            header: None,
        })
    }

    /// Remembers a host this process could not reach; passes `result` on.
    fn note<T>(&self, host: &str, result: Result<T, RegistryError>) -> Result<T, RegistryError> {
        if let (Err(RegistryError::Unreachable { .. }), Ok(mut m)) =
            (&result, self.unreachable.lock())
        {
            m.insert(host.to_string(), Instant::now());
        }
        result
    }

    /// https, or http where dockerd would use it (tried after https fails to connect).
    async fn scheme_for(&self, host: &str) -> Scheme {
        if let Some(s) = self.schemes.lock().ok().and_then(|m| m.get(host).copied()) {
            return Scheme::Known(s);
        }
        let insecure = self
            .insecure
            .get_or_init(|| read_insecure(&self.docker))
            .await;
        let hostname = hostname(host);
        let ips: Vec<IpAddr> = match hostname.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((hostname, 0))
                .await
                .map(|a| a.map(|s| s.ip()).collect())
                .unwrap_or_default(),
        };
        Scheme::Try {
            http_allowed: insecure.allows_http(host, &ips),
        }
    }

    fn remember(&self, host: &str, scheme: &'static str) {
        if let Ok(mut m) = self.schemes.lock() {
            m.insert(host.to_string(), scheme);
        }
    }
}

async fn read_insecure(docker: &Docker) -> Insecure {
    let Ok(info) = docker.info().await else {
        return Insecure::default();
    };
    let Some(cfg) = info.registry_config else {
        return Insecure::default();
    };
    Insecure {
        cidrs: cfg
            .insecure_registry_cidrs
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        hosts: cfg
            .index_configs
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.secure.unwrap_or(true)))
            .collect(),
    }
}

#[derive(Clone, Copy)]
enum Scheme {
    Known(&'static str),
    Try { http_allowed: bool },
}

/// One tag operation: the scheme and Authorization header found on the way are reused.
struct Session<'a> {
    client: &'a Registry,
    host: &'a str,
    name: &'a str,
    auth: Option<&'a DockerCredentials>,
    scheme: Scheme,
    header: Option<String>,
}

impl Session<'_> {
    async fn get_manifest(
        &mut self,
        digest: &str,
    ) -> Result<(String, bytes::Bytes), RegistryError> {
        let path = format!("/v2/{}/manifests/{digest}", self.name);
        let resp = self
            .send(&path, |c, url| {
                c.get(url).header(reqwest::header::ACCEPT, MANIFEST_TYPES)
            })
            .await?;
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.docker.distribution.manifest.v2+json")
            .to_string();
        let url = resp.url().to_string();
        let body = resp
            .bytes()
            .await
            .map_err(|e| RegistryError::unreachable(&url, e))?;
        Ok((media_type, body))
    }

    async fn put_manifest(
        &mut self,
        tag: &str,
        media_type: &str,
        body: bytes::Bytes,
    ) -> Result<(), RegistryError> {
        let path = format!("/v2/{}/manifests/{tag}", self.name);
        self.send(&path, |c, url| {
            c.put(url)
                .header(reqwest::header::CONTENT_TYPE, media_type)
                .body(body.clone())
        })
        .await
        .map(drop)
    }

    /// A blob's bytes (at most MAX_CONFIG_BYTES), checked against its digest. A registry
    /// that keeps blobs elsewhere answers with a redirect, followed without credentials.
    async fn get_blob(&mut self, digest: &str) -> Result<bytes::Bytes, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let mut resp = self.send_or_redirect(&path, |c, url| c.get(url)).await?;
        if resp.status().is_redirection() {
            let to = location(&resp).ok_or_else(|| {
                RegistryError::Unexpected(format!("{path} redirected to nowhere"))
            })?;
            let to = resp
                .url()
                .join(&to)
                .map_err(|e| RegistryError::Unexpected(format!("{path} redirected: {e}")))?;
            resp = self
                .client
                .http
                .get(to.clone())
                .send()
                .await
                .map_err(|e| RegistryError::unreachable(to.as_str(), e))?;
            if !resp.status().is_success() {
                return Err(RegistryError::status(to.as_str(), resp.status()));
            }
        }
        let url = resp.url().to_string();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| RegistryError::unreachable(&url, e))?
        {
            if body.len() + chunk.len() > MAX_CONFIG_BYTES {
                return Err(RegistryError::Unexpected(format!(
                    "{url} is larger than {MAX_CONFIG_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if sha256_digest(&body) != digest {
            return Err(RegistryError::Unexpected(format!(
                "{url} did not hold the bytes of {digest}"
            )));
        }
        Ok(body.into())
    }

    /// Uploads `body` as the blob `digest` (a monolithic upload: POST for a location, PUT
    /// the bytes there).
    async fn put_blob(&mut self, digest: &str, body: bytes::Bytes) -> Result<(), RegistryError> {
        let path = format!("/v2/{}/blobs/uploads/", self.name);
        let started = self.send(&path, |c, url| c.post(url)).await?;
        let to = location(&started)
            .ok_or_else(|| RegistryError::Unexpected(format!("{path} gave no upload location")))?;
        let upload = self.same_origin_path(&to).ok_or_else(|| {
            RegistryError::Unexpected(format!("the upload location {to} is not on {}", self.host))
        })?;
        let sep = if upload.contains('?') { '&' } else { '?' };
        let put = format!("{upload}{sep}digest={digest}");
        self.send(&put, |c, url| {
            c.put(url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await
        .map(drop)
    }

    /// The path and query of `location` when it is on this session's registry (or relative):
    /// credentials go nowhere else.
    fn same_origin_path(&self, location: &str) -> Option<String> {
        if location.starts_with('/') {
            return Some(location.to_string());
        }
        let url = url::Url::parse(location).ok()?;
        let scheme_ok = match self.scheme {
            Scheme::Known(s) => url.scheme() == s,
            Scheme::Try { .. } => false,
        };
        let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
        (scheme_ok && authority == self.host)
            .then(|| url[url::Position::BeforePath..url::Position::AfterQuery].to_string())
    }

    /// Sends one request, answering one auth challenge, and fails on anything but 2xx.
    async fn send(
        &mut self,
        path: &str,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let resp = self.send_or_redirect(path, request).await?;
        if resp.status().is_redirection() {
            return Err(RegistryError::status(resp.url().as_str(), resp.status()));
        }
        Ok(resp)
    }

    /// As `send`, but a redirect is returned for the caller to follow.
    async fn send_or_redirect(
        &mut self,
        path: &str,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut challenged = false;
        loop {
            let resp = self.send_once(path, &request).await?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.header = Some(self.authorize(&challenge).await?);
                continue;
            }
            if !status.is_success() && !status.is_redirection() {
                return Err(RegistryError::status(resp.url().as_str(), status));
            }
            return Ok(resp);
        }
    }

    async fn send_once(
        &mut self,
        path: &str,
        request: &impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let known;
        let schemes: &[&'static str] = match self.scheme {
            Scheme::Known(s) => {
                known = [s];
                &known
            }
            Scheme::Try { http_allowed: true } => &["https", "http"],
            Scheme::Try {
                http_allowed: false,
            } => &["https"],
        };
        let mut last = None;
        for &scheme in schemes {
            let url = format!("{scheme}://{}{path}", self.host);
            let mut req = request(&self.client.http, &url);
            if let Some(h) = &self.header {
                req = req.header(reqwest::header::AUTHORIZATION, h);
            }
            match req.send().await {
                Ok(resp) => {
                    self.scheme = Scheme::Known(scheme);
                    self.client.remember(self.host, scheme);
                    return Ok(resp);
                }
                Err(e) => last = Some(RegistryError::unreachable(&url, e)),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::NotSupported(self.host.to_string())))
    }

    /// The Authorization header that answers `challenge` (Basic, or a Bearer token from the
    /// realm the registry names).
    async fn authorize(&self, challenge: &str) -> Result<String, RegistryError> {
        let Some(creds) = self
            .auth
            .filter(|a| a.username.is_some() || a.identitytoken.is_some())
        else {
            return Err(RegistryError::Auth(format!(
                "{} asks for credentials and the build has none for it",
                self.host
            )));
        };
        let (kind, params) = parse_challenge(challenge);
        let basic = || {
            use base64::Engine;
            let user = creds.username.as_deref().unwrap_or_default();
            let pass = creds.password.as_deref().unwrap_or_default();
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        };
        if kind.eq_ignore_ascii_case("basic") {
            return Ok(format!("Basic {}", basic()));
        }
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::Auth(format!(
                "{} asks for {kind:?} authentication, which only dockerd handles",
                self.host
            )));
        }
        let realm = params.get("realm").cloned().unwrap_or_default();
        let realm_url = url::Url::parse(&realm)
            .map_err(|e| RegistryError::Auth(format!("token realm {realm:?}: {e}")))?;
        // Credentials travel to the token service only as safely as to the registry.
        let same_http_host = matches!(self.scheme, Scheme::Known("http"))
            && realm_url.host_str().map(hostname) == Some(hostname(self.host));
        if realm_url.scheme() != "https" && !same_http_host {
            return Err(RegistryError::Auth(format!(
                "token realm {realm} is not https; not sending credentials there"
            )));
        }
        let mut token_url = realm_url;
        {
            let mut q = token_url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &format!("repository:{}:pull,push", self.name));
        }
        let req = self.client.http.get(token_url);
        let req = match &creds.identitytoken {
            Some(token) if !token.is_empty() => {
                req.header(reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
            }
            _ => req.header(reqwest::header::AUTHORIZATION, format!("Basic {}", basic())),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| RegistryError::unreachable(&realm, e))?;
        if !resp.status().is_success() {
            return Err(RegistryError::status(&realm, resp.status()));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = resp
            .json()
            .await
            .map_err(|e| RegistryError::Auth(format!("token service {realm}: {e}")))?;
        token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}"))
            .ok_or_else(|| RegistryError::Auth(format!("token service {realm} sent no token")))
    }
}

fn location(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get(reqwest::header::LOCATION)?
        .to_str()
        .ok()
        .map(str::to_string)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let sum = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in sum.iter() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The image config `config` with `labels` set in `config.Labels` (over any of the same
/// name), and the number of layers it describes. Everything else is kept as it was.
fn with_labels(
    config: &[u8],
    labels: &BTreeMap<String, String>,
) -> Result<(bytes::Bytes, usize), String> {
    let mut doc: serde_json::Value = serde_json::from_slice(config).map_err(|e| e.to_string())?;
    let layers = doc["rootfs"]["diff_ids"]
        .as_array()
        .map(Vec::len)
        .ok_or("it lists no rootfs.diff_ids")?;
    let root = doc.as_object_mut().ok_or("it is not a JSON object")?;
    let run = object_at(root, "config").ok_or("its config is not an object")?;
    let slot = object_at(run, "Labels").ok_or("its Labels are not an object")?;
    for (k, v) in labels {
        slot.insert(k.clone(), v.clone().into());
    }
    Ok((doc.to_string().into(), layers))
}

/// The object under `key` in `map`, made an empty one when it is missing or null; `None`
/// when it is something else.
fn object_at<'a>(
    map: &'a mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a mut serde_json::Map<String, serde_json::Value>> {
    let slot = map.entry(key).or_insert(serde_json::Value::Null);
    if slot.is_null() {
        *slot = serde_json::Value::Object(Default::default());
    }
    slot.as_object_mut()
}

/// `Bearer realm="…",service="…"` → ("Bearer", {realm, service}).
fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let header = header.trim();
    let (kind, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    (kind.to_string(), params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::Arc;

    #[test]
    fn only_names_with_a_registry_host_are_split() {
        assert_eq!(
            split_repo("127.0.0.1:5000/repo/app-1"),
            Some(("127.0.0.1:5000", "repo/app-1"))
        );
        assert_eq!(
            split_repo("registry.example.com/a/b"),
            Some(("registry.example.com", "a/b"))
        );
        assert_eq!(split_repo("localhost/a"), Some(("localhost", "a")));
        // Docker Hub names: left to dockerd.
        assert_eq!(split_repo("library/busybox"), None);
        assert_eq!(split_repo("busybox"), None);
    }

    #[test]
    fn http_only_where_dockerd_would_use_it() {
        let insecure = Insecure {
            cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
            hosts: [
                ("plain.example:5000".to_string(), false),
                ("127.0.0.1:443".to_string(), true),
            ]
            .into(),
        };
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let public: IpAddr = "203.0.113.7".parse().expect("ip");
        assert!(insecure.allows_http("127.0.0.1:5000", &[lo]));
        assert!(!insecure.allows_http("registry.example:5000", &[public]));
        assert!(insecure.allows_http("plain.example:5000", &[public]));
        // An index config marked secure wins over the CIDR.
        assert!(!insecure.allows_http("127.0.0.1:443", &[lo]));
        assert_eq!(hostname("127.0.0.1:5000"), "127.0.0.1");
        assert_eq!(hostname("[::1]:5000"), "::1");
        assert_eq!(hostname("registry.example"), "registry.example");
    }

    #[test]
    fn challenges_are_parsed_with_quoted_and_bare_values() {
        let (kind, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(kind, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (kind, p) = parse_challenge("Basic realm=buildshuttle-test");
        assert_eq!(kind, "Basic");
        assert_eq!(p["realm"], "buildshuttle-test");
    }

    /// What the mock registry saw.
    #[derive(Default)]
    struct Seen {
        scope: Option<String>,
        put: Option<(String, Vec<u8>)>,
    }

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"config":{"digest":"sha256:c"}}"#;
    const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

    /// A registry on loopback that wants a Bearer token from its own realm (a single
    /// process can run no real token service): the flow of Docker Hub, GHCR, Harbor.
    async fn token_registry() -> (String, Arc<Mutex<Seen>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let realm = format!("http://{host}/token");
        let challenge = move || {
            let mut h = HeaderMap::new();
            let v = format!(r#"Bearer realm="{realm}",service="mock""#);
            h.insert("www-authenticate", v.parse().expect("header"));
            (StatusCode::UNAUTHORIZED, h)
        };
        let authorized =
            |h: &HeaderMap| h.get("authorization").is_some_and(|v| v == "Bearer tok-1");
        let get_challenge = challenge.clone();
        let app = axum::Router::new()
            .route(
                "/token",
                axum::routing::get(
                    |State(seen): State<Arc<Mutex<Seen>>>,
                     Query(q): Query<HashMap<String, String>>,
                     h: HeaderMap| async move {
                        // "shuttle:pw"
                        if h.get("authorization")
                            .is_none_or(|v| v != "Basic c2h1dHRsZTpwdw==")
                            || q.get("service").map(String::as_str) != Some("mock")
                        {
                            return StatusCode::UNAUTHORIZED.into_response();
                        }
                        seen.lock().expect("lock").scope = q.get("scope").cloned();
                        axum::Json(serde_json::json!({"token": "tok-1"})).into_response()
                    },
                ),
            )
            .route(
                "/v2/repo/app/manifests/sha256:abc",
                axum::routing::get(move |h: HeaderMap| async move {
                    if !authorized(&h) {
                        return get_challenge().into_response();
                    }
                    ([("content-type", V2)], MANIFEST).into_response()
                }),
            )
            .route(
                "/v2/repo/app/manifests/latest",
                axum::routing::put(
                    move |State(seen): State<Arc<Mutex<Seen>>>,
                          h: HeaderMap,
                          body: bytes::Bytes| async move {
                        if !authorized(&h) {
                            return challenge().into_response();
                        }
                        let ct = h
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        seen.lock().expect("lock").put = Some((ct, body.to_vec()));
                        StatusCode::CREATED.into_response()
                    },
                ),
            )
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (host, seen)
    }

    fn loopback_registry() -> Registry {
        registry_where_dockerd_says(HashMap::new())
    }

    /// A client whose dockerd (never asked) treats 127.0.0.0/8 as insecure, and `hosts` as
    /// they say (`true`: secure).
    fn registry_where_dockerd_says(hosts: HashMap<String, bool>) -> Registry {
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 5, bollard::API_DEFAULT_VERSION)
                .expect("client");
        let insecure = Insecure {
            cidrs: vec!["127.0.0.0/8".parse().expect("cidr")],
            hosts,
        };
        Registry::with_insecure(docker, OnceCell::new_with(Some(insecure)))
    }

    fn creds(user: &str, pass: &str) -> DockerCredentials {
        DockerCredentials {
            username: Some(user.into()),
            password: Some(pass.into()),
            ..Default::default()
        }
    }

    #[test]
    fn labels_are_set_over_the_config_and_nothing_else_changes() {
        let labels = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("build_uuid".to_string(), "b-2".to_string()),
        ]);
        let config = br#"{"architecture":"amd64","config":{"Cmd":["sh"],"Labels":{"build_uuid":"b-1","team":"x"}},"history":[{"created_by":"RUN x"}],"rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2"]}}"#;
        let (out, layers) = with_labels(config, &labels).expect("labelled");
        let out: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(layers, 2);
        assert_eq!(
            out["config"]["Labels"],
            serde_json::json!({"app": "web", "build_uuid": "b-2", "team": "x"}),
            "ours win, the image's own stay"
        );
        assert_eq!(out["config"]["Cmd"], serde_json::json!(["sh"]));
        assert_eq!(out["history"][0]["created_by"], "RUN x");
        assert_eq!(out["architecture"], "amd64");

        // No labels yet (null, or no config at all).
        for bare in [
            &br#"{"config":{"Labels":null},"rootfs":{"diff_ids":[]}}"#[..],
            br#"{"rootfs":{"diff_ids":["sha256:1"]}}"#,
        ] {
            let (out, _) = with_labels(bare, &labels).expect("labelled");
            let out: serde_json::Value = serde_json::from_slice(&out).expect("json");
            assert_eq!(out["config"]["Labels"]["app"], "web", "{out}");
        }
        for bad in [&b"[]"[..], b"{\"config\":{}}", b"not json"] {
            assert!(with_labels(bad, &labels).is_err());
        }
    }

    #[test]
    fn a_digest_is_the_sha256_of_the_bytes() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn upload_locations_keep_credentials_on_the_registry() {
        let registry = loopback_registry();
        let session = |scheme| Session {
            client: &registry,
            host: "127.0.0.1:5000",
            name: "repo/app",
            auth: None,
            scheme,
            header: None,
        };
        let http = session(Scheme::Known("http"));
        for (location, path) in [
            (
                "/v2/repo/app/blobs/uploads/u1?_state=s",
                Some("/v2/repo/app/blobs/uploads/u1?_state=s"),
            ),
            (
                "http://127.0.0.1:5000/v2/repo/app/blobs/uploads/u1",
                Some("/v2/repo/app/blobs/uploads/u1"),
            ),
            ("http://127.0.0.1:5001/v2/repo/app/blobs/uploads/u1", None),
            ("http://storage.example/upload/u1", None),
            ("https://127.0.0.1:5000/v2/repo/app/blobs/uploads/u1", None),
        ] {
            assert_eq!(
                http.same_origin_path(location).as_deref(),
                path,
                "{location}"
            );
        }
    }

    /// What the relabelling mock saw.
    #[derive(Default)]
    struct Writes {
        storage_auth: Option<bool>,
        blob: Option<(String, Vec<u8>)>,
        manifests: Vec<(String, String, Vec<u8>)>,
    }

    /// A registry with Basic auth whose blobs live elsewhere (a redirect to a storage URL, as
    /// with distribution's S3 driver), for `relabel`'s whole exchange. The redirect goes to
    /// `storage` when given.
    async fn relabelling_registry(
        config: &'static [u8],
        storage: Option<&'static str>,
    ) -> (String, Arc<Mutex<Writes>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let writes = Arc::new(Mutex::new(Writes::default()));
        let config_digest = sha256_digest(config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": V2,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": config_digest},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 3, "digest": "sha256:l1"}],
        })
        .to_string();
        let storage = storage.map_or_else(|| format!("http://{host}/storage/config"), String::from);
        let app = axum::Router::new()
            .route(
                "/storage/config",
                axum::routing::get(
                    move |State(w): State<Arc<Mutex<Writes>>>, h: HeaderMap| async move {
                        w.lock().expect("lock").storage_auth =
                            Some(h.contains_key("authorization"));
                        config
                    },
                ),
            )
            .fallback(
                move |State(w): State<Arc<Mutex<Writes>>>,
                      method: axum::http::Method,
                      uri: axum::http::Uri,
                      h: HeaderMap,
                      body: bytes::Bytes| async move {
                    // "shuttle:pw"
                    if h.get("authorization")
                        .is_none_or(|v| v != "Basic c2h1dHRsZTpwdw==")
                    {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [("www-authenticate", r#"Basic realm="mock""#)],
                        )
                            .into_response();
                    }
                    let path = uri.path();
                    let ct = h
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    match (method.as_str(), path) {
                        ("GET", "/v2/repo/app/manifests/sha256:pushed") => {
                            ([("content-type", V2)], manifest.clone()).into_response()
                        }
                        ("GET", p) if p == format!("/v2/repo/app/blobs/{config_digest}") => (
                            StatusCode::TEMPORARY_REDIRECT,
                            [("location", storage.clone())],
                        )
                            .into_response(),
                        ("POST", "/v2/repo/app/blobs/uploads/") => (
                            StatusCode::ACCEPTED,
                            [("location", "/v2/repo/app/blobs/uploads/u1?_state=s")],
                        )
                            .into_response(),
                        ("PUT", "/v2/repo/app/blobs/uploads/u1") => {
                            let q = uri.query().unwrap_or_default().to_string();
                            w.lock().expect("lock").blob = Some((q, body.to_vec()));
                            StatusCode::CREATED.into_response()
                        }
                        ("PUT", p) if p.starts_with("/v2/repo/app/manifests/") => {
                            let tag = p.rsplit('/').next().unwrap_or_default().to_string();
                            w.lock()
                                .expect("lock")
                                .manifests
                                .push((tag, ct, body.to_vec()));
                            StatusCode::CREATED.into_response()
                        }
                        _ => StatusCode::NOT_FOUND.into_response(),
                    }
                },
            )
            .with_state(writes.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (host, writes)
    }

    #[tokio::test]
    async fn relabelling_writes_a_new_config_and_one_manifest_under_every_tag() {
        const CONFIG: &[u8] =
            br#"{"config":{"Labels":null},"rootfs":{"type":"layers","diff_ids":["sha256:d1"]}}"#;
        let (host, writes) = relabelling_registry(CONFIG, None).await;
        let labels = BTreeMap::from([("build_uuid".to_string(), "b-9".to_string())]);
        let done = loopback_registry()
            .relabel(
                &format!("{host}/repo/app"),
                "sha256:pushed",
                &labels,
                &["1.9", "latest"],
                Some(&creds("shuttle", "pw")),
            )
            .await
            .expect("relabelled");
        let w = writes.lock().expect("lock");
        assert_eq!(
            w.storage_auth,
            Some(false),
            "no credentials to the blob's storage"
        );
        let (query, blob) = w.blob.clone().expect("a config uploaded");
        assert_eq!(blob, done.config.to_vec());
        assert_eq!(query, format!("_state=s&digest={}", sha256_digest(&blob)));
        assert_eq!(done.layers, 1);
        let config: serde_json::Value = serde_json::from_slice(&blob).expect("json");
        assert_eq!(config["config"]["Labels"]["build_uuid"], "b-9");
        let tags: Vec<&str> = w.manifests.iter().map(|(t, _, _)| t.as_str()).collect();
        assert_eq!(tags, ["1.9", "latest"]);
        let (_, ct, body) = &w.manifests[0];
        assert_eq!(ct, V2);
        assert!(
            w.manifests.iter().all(|(_, _, b)| b == body),
            "the same manifest"
        );
        assert_eq!(done.digest, sha256_digest(body));
        let manifest: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert_eq!(manifest["config"]["digest"], sha256_digest(&blob));
        assert_eq!(manifest["config"]["size"], blob.len());
        assert_eq!(
            manifest["layers"][0]["digest"], "sha256:l1",
            "the layers stay"
        );
    }

    #[tokio::test]
    async fn a_blob_storage_that_fails_is_named_without_its_signed_query() {
        // A pre-signed storage URL's query is a credential; the error goes into the build log.
        let (host, _) = relabelling_registry(
            br#"{"config":{}}"#,
            Some("http://127.0.0.1:1/bucket/blob?X-Amz-Credential=cred-zz&X-Amz-Signature=sig-zz"),
        )
        .await;
        let err = loopback_registry()
            .relabel(
                &format!("{host}/repo/app"),
                "sha256:pushed",
                &BTreeMap::from([("a".to_string(), "b".to_string())]),
                &["latest"],
                Some(&creds("shuttle", "pw")),
            )
            .await
            .expect_err("the storage is down");
        let text = format!("{err} {err:?}");
        assert!(text.contains("127.0.0.1:1/bucket/blob"), "{text}");
        assert!(
            !text.contains("sig-zz") && !text.contains("cred-zz"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_bearer_challenge_is_answered_with_a_token_for_pull_and_push() {
        let (host, seen) = token_registry().await;
        let registry = loopback_registry();
        registry
            .add_tag(
                &format!("{host}/repo/app"),
                "sha256:abc",
                "latest",
                Some(&creds("shuttle", "pw")),
            )
            .await
            .expect("tagged");
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.scope.as_deref(), Some("repository:repo/app:pull,push"));
        let (ct, body) = seen.put.as_ref().expect("a PUT");
        assert_eq!(ct, V2, "the manifest keeps its media type");
        assert_eq!(body, MANIFEST, "the same bytes, so the same digest");
    }

    #[tokio::test]
    async fn without_credentials_or_with_wrong_ones_it_fails_for_dockerd_to_try() {
        let (host, seen) = token_registry().await;
        let registry = loopback_registry();
        let repo = format!("{host}/repo/app");
        let none = registry.add_tag(&repo, "sha256:abc", "latest", None).await;
        assert!(matches!(none, Err(RegistryError::Auth(_))), "{none:?}");
        let wrong = registry
            .add_tag(&repo, "sha256:abc", "latest", Some(&creds("shuttle", "no")))
            .await;
        assert!(
            matches!(wrong, Err(RegistryError::Status { status: 401, .. })),
            "{wrong:?}"
        );
        assert!(seen.lock().expect("lock").put.is_none());
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_not_tried_again_for_a_while() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let host = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let registry = loopback_registry();
        let repo = format!("{host}/repo/app");
        let first = registry.add_tag(&repo, "sha256:abc", "latest", None).await;
        assert!(
            matches!(first, Err(RegistryError::Unreachable { .. })),
            "{first:?}"
        );
        let second = registry.add_tag(&repo, "sha256:abc", "latest", None).await;
        assert!(
            matches!(second, Err(RegistryError::NotSupported(_))),
            "{second:?}"
        );
    }

    #[tokio::test]
    async fn credentials_never_go_over_http_to_a_registry_dockerd_calls_secure() {
        let (host, seen) = token_registry().await;
        // dockerd says this host is secure: https only, which the mock does not speak.
        let registry = registry_where_dockerd_says([(host.clone(), true)].into());
        let r = registry
            .add_tag(
                &format!("{host}/repo/app"),
                "sha256:abc",
                "latest",
                Some(&creds("shuttle", "pw")),
            )
            .await;
        assert!(matches!(r, Err(RegistryError::Unreachable { .. })), "{r:?}");
        assert!(
            seen.lock().expect("lock").scope.is_none(),
            "no token was asked for"
        );
    }
}
