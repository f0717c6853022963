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
        let http =
            sources::http_client(config.sources_connect_timeout, config.sources_total_timeout);
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
                    sources::redact_url(url.as_str())
                ));
                sources::download(&self.http, url, &archive, &limits).await
            }
            Fetch::Data(b64) => {
                log.line("Decoding sources from the data: URI");
                sources::write_data(b64, &archive, &limits).await
            }
        };
        let size = match fetched {
            Ok(n) => n,
            Err(e) => return Outcome::failed(FailureReason::SourceFetchFailed, e.to_string()),
        };
        log.line(&format!("Fetched {size} bytes of sources"));
        if let Err(e) = self.storage.put_file(&spec.source_key(), &archive).await {
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
enum Fetch<'a> {
    Http(&'a reqwest::Url),
    Data(&'a str),
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
