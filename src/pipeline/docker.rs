//! Talking to dockerd (bollard): connecting from DOCKER_BUILD_SETTINGS, building from a
//! streamed context, pulling, tagging and pushing. Every line of daemon output goes to the
//! build log; a daemon error ends the step with the daemon's own message.

use crate::build::RegistryAuth;
use crate::config::DockerSettings;
use crate::logs::BuildLog;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    BuildImageOptions, CreateImageOptions, PushImageOptions, RemoveImageOptions, TagImageOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach dockerd ({where_}): {message}")]
    Unavailable { where_: String, message: String },
    #[error("TLS files for dockerd could not be prepared: {0}")]
    TlsFiles(std::io::Error),
    #[error("the build failed: {0}")]
    Build(String),
    #[error("pushing {image} failed: {message}")]
    Push { image: String, message: String },
    #[error("pulling {image} failed: {message}")]
    Pull { image: String, message: String },
    #[error("the connection to dockerd was lost: {0}")]
    Lost(String),
    #[error("tagging {image} failed: {message}")]
    Tag { image: String, message: String },
    #[error("removing the local tag {image} failed: {message}")]
    Untag { image: String, message: String },
    #[error("loading the image config for {image} failed: {message}")]
    Load { image: String, message: String },
}

/// The ARG form the daemon's builder takes: one instruction naming every arg from API 1.41
/// (dockerd 20.10), one per name before. `Err` when the daemon cannot say.
pub async fn arg_style(docker: &Docker) -> Result<super::dockerfile::ArgStyle, DockerError> {
    let version = docker
        .version()
        .await
        .map_err(|e| DockerError::Unavailable {
            where_: "the version endpoint".into(),
            message: e.to_string(),
        })?;
    Ok(arg_style_for_api(&version.api_version.unwrap_or_default()))
}

/// `arg_style` for an API version such as "1.41"; anything unreadable gets one ARG per name.
fn arg_style_for_api(api: &str) -> super::dockerfile::ArgStyle {
    use super::dockerfile::ArgStyle;
    let mut parts = api.split('.').map(|p| p.trim().parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (1, 41) {
        ArgStyle::OneInstruction
    } else {
        ArgStyle::OnePerName
    }
}

/// Seconds bollard waits for a response's headers; long-running output streams are bounded
/// by the build timeout instead.
const REQUEST_TIMEOUT_SECS: u64 = 600;

/// Connects to dockerd as DOCKER_BUILD_SETTINGS says. TLS material given as PEM text is
/// written (mode 0600) under `scratch`; values that are not PEM are taken as file paths.
pub fn connect(settings: &DockerSettings, scratch: &Path) -> Result<Docker, DockerError> {
    let unavailable = |e: bollard::errors::Error| DockerError::Unavailable {
        where_: describe(settings),
        message: e.to_string(),
    };
    match settings {
        DockerSettings::Socket(path) => {
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
                .map_err(unavailable)
        }
        DockerSettings::Http { address } => Docker::connect_with_http(
            &format!("tcp://{address}"),
            REQUEST_TIMEOUT_SECS,
            API_DEFAULT_VERSION,
        )
        .map_err(unavailable),
        DockerSettings::Https {
            address,
            ca,
            cert,
            key,
        } => {
            // Several crates enable rustls providers; pick one explicitly (idempotent).
            let _ = rustls::crypto::ring::default_provider().install_default();
            std::fs::create_dir_all(scratch).map_err(DockerError::TlsFiles)?;
            let ca = pem_file(scratch, "ca.pem", ca).map_err(DockerError::TlsFiles)?;
            let cert =
                pem_file(scratch, "cert.pem", cert.expose()).map_err(DockerError::TlsFiles)?;
            let key = pem_file(scratch, "key.pem", key.expose()).map_err(DockerError::TlsFiles)?;
            Docker::connect_with_ssl(
                address,
                &key,
                &cert,
                &ca,
                REQUEST_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            )
            .map_err(unavailable)
        }
    }
}

fn pem_file(dir: &Path, name: &str, value: &str) -> std::io::Result<std::path::PathBuf> {
    if !value.trim_start().starts_with("-----BEGIN") {
        return Ok(std::path::PathBuf::from(value));
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(value.as_bytes())?;
    Ok(path)
}

/// Where dockerd is, for messages.
pub fn describe(settings: &DockerSettings) -> String {
    match settings {
        DockerSettings::Socket(p) => format!("unix socket {p}"),
        DockerSettings::Http { address } => format!("tcp://{address}"),
        DockerSettings::Https { address, .. } => format!("https://{address}"),
    }
}

/// Negotiates the API version and checks that dockerd answers, within `wait`.
pub async fn ready(
    docker: Docker,
    settings: &DockerSettings,
    wait: Duration,
) -> Result<Docker, DockerError> {
    let unavailable = |message: String| DockerError::Unavailable {
        where_: describe(settings),
        message,
    };
    let attempt = async {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(docker)
    };
    tokio::time::timeout(wait, attempt)
        .await
        .unwrap_or_else(|_| Err(unavailable(format!("no answer within {wait:?}"))))
}

/// Registry credentials keyed by registry host, as the build API's X-Registry-Config wants.
pub fn credentials(auth: &BTreeMap<String, RegistryAuth>) -> HashMap<String, DockerCredentials> {
    auth.iter()
        .map(|(host, a)| (host.clone(), credential(host, a)))
        .collect()
}

pub fn credential(host: &str, a: &RegistryAuth) -> DockerCredentials {
    DockerCredentials {
        username: Some(a.username.clone()),
        password: Some(a.password.expose().to_string()),
        serveraddress: Some(host.to_string()),
        ..Default::default()
    }
}

/// What to build.
#[derive(Clone)]
pub struct BuildRequest {
    pub tag: String,
    pub labels: BTreeMap<String, String>,
    pub build_args: BTreeMap<String, String>,
    pub no_cache: bool,
    pub registries: HashMap<String, DockerCredentials>,
    /// Images whose layers the build may reuse (`cachefrom`; for BuildKit, images with inline
    /// cache metadata); empty: the daemon's own layer cache.
    pub cache_from: Vec<String>,
    /// BuildKit rather than the classic builder (DOCKER_BUILDKIT).
    pub buildkit: bool,
}

/// Builds the image from the streamed context, with the classic builder or BuildKit. Returns
/// when the build ended; the daemon's output is logged line by line.
pub async fn build(
    docker: &Docker,
    req: BuildRequest,
    context: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    log: &mut BuildLog,
) -> Result<(), DockerError> {
    let mut build_args = req.build_args;
    if req.buildkit {
        // The image carries its layer cache metadata, so another daemon can use it as
        // `cachefrom`.
        build_args.insert("BUILDKIT_INLINE_CACHE".into(), "1".into());
    }
    let mut options = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(req.tag),
        nocache: req.no_cache,
        rm: true,
        forcerm: true,
        buildargs: Some(build_args.into_iter().collect()),
        labels: (!req.labels.is_empty()).then(|| req.labels.into_iter().collect()),
        cachefrom: (!req.cache_from.is_empty()).then_some(req.cache_from),
        ..Default::default()
    };
    let registries = (!req.registries.is_empty()).then_some(req.registries);
    if req.buildkit {
        options.version = bollard::query_parameters::BuilderVersion::BuilderBuildKit;
        options.session = Some(format!("buildshuttle-{}", uuid::Uuid::new_v4()));
        return buildkit(docker, options, registries, context, log).await;
    }
    // (A daemon error arrives as an `Err`: bollard turns `errorDetail` messages into one.)
    let mut stream =
        docker.build_image(options, registries, Some(bollard::body_try_stream(context)));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| logged(log, build_error(e)))?;
        if let Some(text) = info.stream.as_deref() {
            log.line(text);
        }
        if let Some(status) = info.status.as_deref() {
            log_status(
                log,
                info.id.as_deref(),
                status,
                info.progress_detail.is_some(),
            );
        }
    }
    Ok(())
}

/// Whether a build failed only because the classic builder lost sight of an image while it
/// looked for a cached step: it lists the step's parent's children, then reads each, and one
/// was deleted in between (another build's tidy-up on a shared daemon, see
/// `Pipeline::tidy`). Nothing about the build is wrong; building again works.
pub fn lost_a_cache_candidate(err: &DockerError) -> bool {
    matches!(err, DockerError::Build(m) if m.starts_with("unable to find image \"sha256:"))
}

/// A build stream's error: the daemon's message as the build's failure, or a lost connection.
fn build_error(e: bollard::errors::Error) -> DockerError {
    let daemon = from_daemon(&e);
    let msg = stream_error(e);
    if daemon {
        DockerError::Build(msg)
    } else {
        DockerError::Lost(msg)
    }
}

/// `err`, its message written to the build log first.
fn logged(log: &mut BuildLog, err: DockerError) -> DockerError {
    if let DockerError::Build(m) | DockerError::Lost(m) = &err {
        log.line(m);
    }
    err
}

/// What a BuildKit build's own thread reports.
enum Reported {
    Lines(Vec<String>),
    Ended(Result<(), DockerError>),
}

/// A BuildKit build (`options` with BuildKit's version and a session id): bollard's session
/// answers BuildKit's registry credential requests (pulls of `FROM` images, the layer cache).
///
/// bollard serves the session from a task of its own that lasts as long as its connection to
/// dockerd, which dockerd never closes; so the build runs on a runtime of its own, on a
/// blocking thread, whose end closes the session. Dropping the returned future (a stop, a
/// timeout) ends that runtime too, which also cancels the build in dockerd.
async fn buildkit(
    docker: &Docker,
    options: BuildImageOptions,
    registries: Option<HashMap<String, DockerCredentials>>,
    context: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    log: &mut BuildLog,
) -> Result<(), DockerError> {
    let docker = docker.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Reported>(64);
    let _thread = tokio::task::spawn_blocking(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let lost = DockerError::Lost(format!("no runtime for the build: {e}"));
                let _ = tx.blocking_send(Reported::Ended(Err(lost)));
                return;
            }
        };
        runtime.block_on(async {
            let run = async {
                let mut progress = super::progress::Progress::default();
                let body = bollard::body_try_stream(context);
                let mut stream = docker.build_image(options, registries, Some(body));
                while let Some(item) = stream.next().await {
                    let info = item.map_err(build_error)?;
                    let mut lines: Vec<String> = info.stream.into_iter().collect();
                    if let Some(bollard::models::BuildInfoAux::BuildKit(status)) = info.aux {
                        lines.extend(progress.lines(status));
                    }
                    if !lines.is_empty() && tx.send(Reported::Lines(lines)).await.is_err() {
                        break;
                    }
                }
                Ok(())
            };
            tokio::select! {
                _ = tx.closed() => {}
                ended = run => { let _ = tx.send(Reported::Ended(ended)).await; }
            }
        });
        // Dropping the runtime ends the session's task and closes its connection.
        drop(runtime);
    });
    while let Some(reported) = rx.recv().await {
        match reported {
            Reported::Lines(lines) => lines.iter().for_each(|l| log.line(l)),
            Reported::Ended(Err(e)) => return Err(logged(log, e)),
            Reported::Ended(Ok(())) => return Ok(()),
        }
    }
    Err(DockerError::Lost(
        "the build's thread ended without a result".into(),
    ))
}

/// Pull/push progress: one line per status change; the byte-count ticks are skipped so a
/// large layer does not flood the log.
fn log_status(log: &mut BuildLog, id: Option<&str>, status: &str, ticking: bool) {
    let ticking = ticking && matches!(status, "Downloading" | "Extracting" | "Pushing");
    if ticking {
        return;
    }
    match id {
        Some(id) if !id.is_empty() => log.line(&format!("{id}: {status}")),
        _ => log.line(status),
    }
}

fn stream_error(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerStreamError { error } => error,
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

/// Whether an error came from the daemon (a failed step) rather than from the connection.
fn from_daemon(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerStreamError { .. }
            | bollard::errors::Error::DockerResponseServerError { .. }
    )
}

pub async fn tag(docker: &Docker, image: &str, repo: &str, tag: &str) -> Result<(), DockerError> {
    docker
        .tag_image(
            image,
            Some(TagImageOptions {
                repo: Some(repo.to_string()),
                tag: Some(tag.to_string()),
            }),
        )
        .await
        .map_err(|e| DockerError::Tag {
            image: image.to_string(),
            message: stream_error(e),
        })
}

/// Makes `config` (an image config whose `layers` layers this daemon has already) a local
/// image tagged `image`, through `docker load` with no layer in the archive: a daemon with the
/// graphdriver image store finds every layer by its chain ID and reads none of them. That is
/// how an image relabelled in the registry becomes the local one without a pull. A daemon
/// that wants the layers (the containerd image store) refuses; the caller keeps the image it
/// had.
pub async fn load_config(
    docker: &Docker,
    config: Bytes,
    layers: usize,
    image: &str,
) -> Result<(), DockerError> {
    let failed = |message: String| DockerError::Load {
        image: image.to_string(),
        message,
    };
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [image],
        "Layers": (0..layers).map(|i| format!("{i}/layer.tar")).collect::<Vec<_>>(),
    }])
    .to_string();
    let archive = super::context::small_tar(&[
        ("config.json", &config[..]),
        ("manifest.json", manifest.as_bytes()),
    ])
    .map_err(|e| failed(e.to_string()))?;
    let mut out = docker.import_image(
        bollard::query_parameters::ImportImageOptionsBuilder::default()
            .quiet(true)
            .build(),
        bollard::body_full(archive.into()),
        None,
    );
    while let Some(item) = out.next().await {
        item.map_err(|e| failed(stream_error(e)))?;
    }
    Ok(())
}

/// Removes the local tag `image` (`repo:tag`), never the parent images it leaves untagged.
/// The image itself goes only if that was its last tag and no container uses it.
pub async fn untag(docker: &Docker, image: &str) -> Result<(), DockerError> {
    docker
        .remove_image(
            image,
            Some(RemoveImageOptions {
                force: false,
                noprune: true,
                ..Default::default()
            }),
            None,
        )
        .await
        .map(|_| ())
        .map_err(|e| DockerError::Untag {
            image: image.to_string(),
            message: stream_error(e),
        })
}

/// Pushes `repo:tag`; returns the digest the registry reported.
pub async fn push(
    docker: &Docker,
    repo: &str,
    tag: &str,
    auth: Option<DockerCredentials>,
    log: &mut BuildLog,
) -> Result<Option<String>, DockerError> {
    let image = format!("{repo}:{tag}");
    log.line(&format!("Pushing {image}"));
    let fail = |message: String| DockerError::Push {
        image: image.clone(),
        message,
    };
    let mut digest = None;
    let mut stream = docker.push_image(
        repo,
        Some(PushImageOptions {
            tag: Some(tag.to_string()),
            ..Default::default()
        }),
        auth,
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(status) = info.status.as_deref() {
                    log_status(log, None, status, info.progress_detail.is_some());
                    if let Some(d) = parse_digest(status) {
                        digest = Some(d);
                    }
                }
                if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                    log.line(&msg);
                    return Err(fail(msg));
                }
            }
            Err(e) => {
                let daemon = from_daemon(&e);
                let msg = stream_error(e);
                log.line(&msg);
                return Err(if daemon {
                    fail(msg)
                } else {
                    DockerError::Lost(msg)
                });
            }
        }
    }
    Ok(digest)
}

/// `"1.5: digest: sha256:abc… size: 527"` → `sha256:abc…`.
fn parse_digest(status: &str) -> Option<String> {
    let rest = &status[status.find("digest: ")? + "digest: ".len()..];
    let d = rest.split_whitespace().next()?;
    d.starts_with("sha256:").then(|| d.to_string())
}

/// Whether the local image `image` has its parent images here (it was built here), so the
/// classic builder finds its steps in the local cache. A pulled or loaded image has none: its
/// history names no image below the top one.
pub async fn has_parents(docker: &Docker, image: &str) -> bool {
    match docker.image_history(image).await {
        Ok(history) => history.get(1).is_some_and(|h| h.id != "<missing>"),
        Err(_) => false,
    }
}

/// The ID of a local image, `None` when the daemon has no such image.
pub async fn image_id(docker: &Docker, image: &str) -> Option<String> {
    docker.inspect_image(image).await.ok().and_then(|i| i.id)
}

/// Pulls `image` (`host/repo:tag`).
pub async fn pull(
    docker: &Docker,
    image: &str,
    auth: Option<DockerCredentials>,
    log: &mut BuildLog,
) -> Result<(), DockerError> {
    pull_logged(docker, image, auth, log, true).await
}

/// Pulls `image` for the layer cache: a failure (there is often no previous image) is the
/// caller's to describe, so the daemon's error is not logged here.
pub async fn pull_quiet(
    docker: &Docker,
    image: &str,
    auth: Option<DockerCredentials>,
    log: &mut BuildLog,
) -> Result<(), DockerError> {
    pull_logged(docker, image, auth, log, false).await
}

async fn pull_logged(
    docker: &Docker,
    image: &str,
    auth: Option<DockerCredentials>,
    log: &mut BuildLog,
    log_errors: bool,
) -> Result<(), DockerError> {
    log.line(&format!("Pulling {image}"));
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        }),
        None,
        auth,
    );
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(status) = info.status.as_deref() {
                    log_status(
                        log,
                        info.id.as_deref(),
                        status,
                        info.progress_detail.is_some(),
                    );
                }
                if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                    if log_errors {
                        log.line(&msg);
                    }
                    return Err(DockerError::Pull {
                        image: image.to_string(),
                        message: msg,
                    });
                }
            }
            Err(e) => {
                let daemon = from_daemon(&e);
                let msg = stream_error(e);
                if log_errors {
                    log.line(&msg);
                }
                return Err(if daemon {
                    DockerError::Pull {
                        image: image.to_string(),
                        message: msg,
                    }
                } else {
                    DockerError::Lost(msg)
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_from_push_status() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            parse_digest(&format!("1.5: digest: {d} size: 527")),
            Some(d)
        );
        assert_eq!(parse_digest("Pushed"), None);
    }

    #[test]
    fn one_arg_instruction_from_api_1_41() {
        use crate::pipeline::dockerfile::ArgStyle::*;
        for (api, style) in [
            ("1.41", OneInstruction),
            ("1.43", OneInstruction),
            ("2.0", OneInstruction),
            ("1.40", OnePerName),
            ("1.9", OnePerName),
            ("", OnePerName),
            ("x.y", OnePerName),
        ] {
            assert_eq!(arg_style_for_api(api), style, "{api}");
        }
    }
}
