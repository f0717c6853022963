//! Gives a manifest already in a registry a second tag through the registry's HTTP API (the
//! OCI distribution spec: GET the manifest by digest, PUT the same bytes under the tag).
//! dockerd's push of a second tag checks every layer and then writes that same manifest;
//! this is two requests (plus the auth challenge). Any failure here is the caller's cue to
//! push the tag with dockerd as before, so it never fails a build by itself.
//!
//! Credentials go only where dockerd would send them: over https, or over http to a
//! registry dockerd itself treats as insecure (`--insecure-registry`, 127.0.0.0/8).

use bollard::auth::DockerCredentials;
use bollard::Docker;
use std::collections::HashMap;
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
}

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
        let (host, name) =
            split_repo(repo).ok_or_else(|| RegistryError::NotSupported(repo.to_string()))?;
        let paused = self
            .unreachable
            .lock()
            .ok()
            .and_then(|m| m.get(host).copied());
        if paused.is_some_and(|at| at.elapsed() < UNREACHABLE_PAUSE) {
            return Err(RegistryError::NotSupported(format!(
                "{host} (unreachable from here a moment ago)"
            )));
        }
        let mut session = Session {
            client: self,
            host,
            name,
            auth,
            scheme: self.scheme_for(host).await,
            header: None,
        };
        let tagged = async {
            let (media_type, body) = session.get_manifest(digest).await?;
            session.put_manifest(tag, &media_type, body).await
        }
        .await;
        if let (Err(RegistryError::Unreachable { .. }), Ok(mut m)) =
            (&tagged, self.unreachable.lock())
        {
            m.insert(host.to_string(), Instant::now());
        }
        tagged
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
        let body = resp.bytes().await.map_err(|e| RegistryError::Unreachable {
            url,
            message: e.to_string(),
        })?;
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

    /// Sends one request, answering one auth challenge, and fails on anything but 2xx.
    async fn send(
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
            if !status.is_success() {
                return Err(RegistryError::Status {
                    url: resp.url().to_string(),
                    status: status.as_u16(),
                });
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
                Err(e) => {
                    last = Some(RegistryError::Unreachable {
                        url,
                        message: e.to_string(),
                    })
                }
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
        let resp = req.send().await.map_err(|e| RegistryError::Unreachable {
            url: realm.clone(),
            message: e.to_string(),
        })?;
        if !resp.status().is_success() {
            return Err(RegistryError::Status {
                url: realm,
                status: resp.status().as_u16(),
            });
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
