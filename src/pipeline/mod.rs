//! The build pipeline: one entry point, used by local mode and by the Kubernetes worker.
//! sources → storage (original archive) → context → docker build → tag → push; every output
//! line to the build log. Knows nothing about HTTP or Kubernetes.

pub mod context;
pub mod docker;
pub mod dockerfile;
pub mod sources;

use crate::build::{BuildSpec, FailureReason, Outcome, RegistryAuth};
use crate::config::BuildConfig;
use crate::logs::BuildLog;
use crate::storage::Storage;
use bollard::Docker;
use docker::DockerError;
use sources::Source;
use std::path::Path;
use std::sync::Arc;

/// Everything a build needs besides its spec. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    pub docker: Docker,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<BuildConfig>,
    pub http: reqwest::Client,
}

impl Pipeline {
    pub fn new(docker: Docker, storage: Arc<dyn Storage>, config: Arc<BuildConfig>) -> Self {
        let http = sources::http_client(
            config.sources_connect_timeout,
            config.sources_total_timeout,
            config.deny_networks.clone(),
        );
        Self {
            docker,
            storage,
            config,
            http,
        }
    }

    /// Runs one build in `workdir` (created; the caller removes it). Never panics on input:
    /// every failure is an `Outcome::Failed` with a reason, and a line in the log saying why.
    pub async fn run(&self, spec: &BuildSpec, log: &mut BuildLog, workdir: &Path) -> Outcome {
        let outcome = match sources::parse(spec.sources.expose()) {
            _ if spec.sources_stored => self.build(spec, Fetch::Stored, log, workdir).await,
            Err(e) => Outcome::failed(FailureReason::InvalidSources, e.to_string()),
            Ok(Source::Docker(src)) => self.retag(spec, &src, log).await,
            Ok(Source::Http(url)) => self.build(spec, Fetch::Http(&url), log, workdir).await,
            Ok(Source::Data(b64)) => self.build(spec, Fetch::Data(&b64), log, workdir).await,
        };
        match &outcome {
            Outcome::Succeeded { image, digest } => {
                log.line(&format!(
                    "Successfully built and pushed {image} {}",
                    digest.as_deref().unwrap_or("")
                ));
            }
            Outcome::Failed { reason, message } => {
                log.line(&format!("Build failed ({}): {message}", reason.as_str()));
            }
        }
        outcome
    }

    async fn build(
        &self,
        spec: &BuildSpec,
        source: Fetch<'_>,
        log: &mut BuildLog,
        workdir: &Path,
    ) -> Outcome {
        if let Err(e) = tokio::fs::create_dir_all(workdir).await {
            return Outcome::failed(
                FailureReason::Internal,
                format!("cannot create the build folder: {e}"),
            );
        }
        let archive = workdir.join("sources");
        let limits = self.config.limits;
        let fetched = match source {
            Fetch::Http(url) => {
                log.line(&format!(
                    "Fetching sources from {}",
                    crate::secret::redact_url(url.as_str())
                ));
                sources::download(
                    &self.http,
                    &self.config.deny_networks,
                    url,
                    &archive,
                    &limits,
                )
                .await
            }
            Fetch::Data(b64) => {
                log.line("Decoding sources from the data: URI");
                sources::write_data(b64, &archive, &limits).await
            }
            Fetch::Stored => {
                log.line("Reading the sources from storage");
                self.read_stored(&spec.source_key(), &archive, &limits)
                    .await
            }
        };
        let size = match fetched {
            Ok(n) => n,
            Err(e) => return Outcome::failed(FailureReason::SourceFetchFailed, e.to_string()),
        };
        log.line(&format!("Fetched {size} bytes of sources"));
        let stored = match source {
            Fetch::Stored => Ok(()),
            _ => self.storage.put_file(&spec.source_key(), &archive).await,
        };
        if let Err(e) = stored {
            return Outcome::failed(
                FailureReason::SourceStoreFailed,
                format!("could not store the sources: {e}"),
            );
        }

        let args = spec.docker_build_args();
        let keys: Vec<String> = args.keys().cloned().collect();
        let (dest, limits2) = (workdir.join("context"), limits);
        let prepared = tokio::task::spawn_blocking(move || {
            let root = context::extract(&archive, &dest, &limits2)?;
            context::prepare_dockerfile(&root, &keys)?;
            let ignore = context::DockerIgnore::load(&root)?;
            Ok::<_, context::ContextError>((root, ignore))
        })
        .await;
        let (root, ignore) = match prepared {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Outcome::failed(FailureReason::InvalidSources, e.to_string()),
            Err(e) => {
                return Outcome::failed(
                    FailureReason::Internal,
                    format!("context preparation stopped: {e}"),
                )
            }
        };

        let repo = spec.image_repository();
        let image = spec.image();
        let mut registries = self.config.extra_registries.clone();
        if let Some(auth) = &spec.gm_registry_auth {
            registries.insert(spec.gm_registry_host.clone(), auth.clone());
        }
        let request = docker::BuildRequest {
            tag: image.clone(),
            labels: spec.image_labels(),
            build_args: args,
            no_cache: self.config.no_cache,
            registries: docker::credentials(&registries),
        };
        log.line(&format!("Building {image}"));
        if let Err(e) = docker::build(
            &self.docker,
            request,
            context::tar_stream(root, ignore),
            log,
        )
        .await
        {
            return docker_failure(e);
        }
        self.push_both(spec, &image, &repo, log).await
    }

    /// Decodes a `data:` URI's archive into storage now, so the build's spec (kept in state,
    /// or in a BuildJob) carries a reference instead of the payload. Best effort: on any
    /// failure the spec is left as it was and the build decodes it (and fails) as usual.
    pub async fn stage_inline_sources(&self, spec: &mut BuildSpec, scratch: &Path) {
        let Some(b64) = sources::data_payload(spec.sources.expose()) else {
            return;
        };
        let file = scratch.join(format!("{}.incoming", spec.build_uuid));
        let staged = async {
            sources::write_data(b64, &file, &self.config.limits)
                .await
                .ok()?;
            self.storage.put_file(&spec.source_key(), &file).await.ok()
        }
        .await;
        let _ = tokio::fs::remove_file(&file).await;
        if staged.is_some() {
            spec.sources = crate::secret::Secret::new("data:base64,");
            spec.sources_stored = true;
        }
    }

    /// Copies the stored archive `key` into `dest`, within the source size limit.
    async fn read_stored(
        &self,
        key: &str,
        dest: &Path,
        limits: &crate::config::Limits,
    ) -> Result<u64, sources::SourceError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let missing = || sources::SourceError::Download {
            url: format!("storage key {key}"),
            reason: "the stored sources are missing".into(),
        };
        let obj = self
            .storage
            .get(key)
            .await
            .map_err(|e| sources::SourceError::Download {
                url: format!("storage key {key}"),
                reason: e.to_string(),
            })?;
        let mut body = obj.ok_or_else(missing)?.body;
        let mut file = tokio::fs::File::create(dest).await?;
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            if written > limits.max_source_bytes {
                return Err(sources::SourceError::TooLarge {
                    limit: limits.max_source_bytes,
                });
            }
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok(written)
    }

    /// `docker://` sources: pull, re-tag as this build's image, push.
    async fn retag(
        &self,
        spec: &BuildSpec,
        src: &sources::DockerSource,
        log: &mut BuildLog,
    ) -> Outcome {
        let auth = match (
            &src.username,
            &src.password,
            &spec.docker_login,
            &spec.docker_password,
        ) {
            (Some(u), Some(p), _, _) => Some(RegistryAuth {
                username: u.clone(),
                password: p.clone(),
            }),
            (_, _, Some(u), Some(p)) if !u.is_empty() => Some(RegistryAuth {
                username: u.clone(),
                password: p.clone(),
            }),
            _ => self.config.extra_registries.get(&src.registry).cloned(),
        };
        let creds = auth.as_ref().map(|a| docker::credential(&src.registry, a));
        if let Err(e) = docker::pull(&self.docker, &src.image, creds, log).await {
            return docker_failure(e);
        }
        self.push_both(spec, &src.image, &spec.image_repository(), log)
            .await
    }

    /// Tags `image` as `repo:1.{n}` and `repo:latest` and pushes both with gm_registry_auth.
    async fn push_both(
        &self,
        spec: &BuildSpec,
        image: &str,
        repo: &str,
        log: &mut BuildLog,
    ) -> Outcome {
        let version = spec.version_tag();
        for tag in [version.as_str(), "latest"] {
            if let Err(e) = docker::tag(&self.docker, image, repo, tag).await {
                return docker_failure(e);
            }
        }
        let auth = spec
            .gm_registry_auth
            .as_ref()
            .map(|a| docker::credential(&spec.gm_registry_host, a));
        let mut digest = None;
        for tag in [version.as_str(), "latest"] {
            match docker::push(&self.docker, repo, tag, auth.clone(), log).await {
                Ok(d) => digest = digest.or(d),
                Err(e) => return docker_failure(e),
            }
        }
        Outcome::Succeeded {
            image: spec.image(),
            digest,
        }
    }
}

/// Sources that are downloaded and built (as opposed to `docker://`, which is re-tagged).
#[derive(Clone, Copy)]
enum Fetch<'a> {
    Http(&'a reqwest::Url),
    Data(&'a str),
    /// Already in storage under the build's source key.
    Stored,
}

fn docker_failure(e: DockerError) -> Outcome {
    let reason = match &e {
        DockerError::Build(_) => FailureReason::BuildFailed,
        DockerError::Push { .. } => FailureReason::PushFailed,
        DockerError::Pull { .. } => FailureReason::PullFailed,
        DockerError::Tag { .. } => FailureReason::BuildFailed,
        DockerError::Unavailable { .. } | DockerError::Lost(_) | DockerError::TlsFiles(_) => {
            FailureReason::DockerUnavailable
        }
    };
    Outcome::failed(reason, e.to_string())
}
