//! The build pipeline: one entry point, used by local mode and by the Kubernetes worker.
//! sources → storage (original archive) ∥ context → docker build (layer cache pulled
//! meanwhile) → tag → push `1.{n}`, then label it (classic builder) and tag `latest` in the
//! registry; every output line to the build log, and each stage's duration to `StageTimings`.
//! Knows nothing about HTTP or Kubernetes.

pub mod context;
pub mod docker;
pub mod dockerfile;
pub mod overlap;
pub mod progress;
pub mod registry;
pub mod restream;
pub mod sources;

use crate::build::{elapsed_ms, BuildSpec, FailureReason, Outcome, RegistryAuth, StageTimings};
use crate::config::BuildConfig;
use crate::logs::{BuildLog, Sink};
use crate::storage::Storage;
use bollard::Docker;
use docker::DockerError;
use sources::Source;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

/// Where the build context comes from (cloned to send it again).
#[derive(Clone)]
enum Context {
    /// The source archive itself (see `restream`).
    Archive(std::path::PathBuf, restream::Prepared),
    /// The archive extracted into this folder, with its `.dockerignore`.
    Folder(std::path::PathBuf, context::DockerIgnore),
}

impl Context {
    fn stream(self) -> context::ContextStream {
        match self {
            Context::Archive(file, prepared) => restream::stream(file, prepared),
            Context::Folder(root, ignore) => context::tar_stream(root, ignore),
        }
    }
}

/// Why a `data:` archive could not be staged (see `Pipeline::stage_inline_sources`).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("storage did not take the sources within {} s", .0.as_secs())]
    TimedOut(std::time::Duration),
    #[error("storage refused the sources: {0}")]
    Store(crate::storage::StorageError),
}

/// How long staging a `data:` archive of `len` bytes may wait on storage: 30 s, plus 1 s
/// per MiB (an archive of hundreds of MiB over a slow link is not a hung store). Past it
/// `POST /` is refused (503) rather than held for the S3 client's own limit (5 attempts of
/// S3_TIMEOUT_SECONDS each).
pub fn stage_deadline(len: u64) -> std::time::Duration {
    const BASE: std::time::Duration = std::time::Duration::from_secs(30);
    BASE + std::time::Duration::from_secs(len / (1024 * 1024))
}

/// Stores a decoded `data:` archive (`len` bytes in `file`) at `key`, durably, within
/// `stage_deadline(len)`: both modes stage this way before they acknowledge a build.
pub async fn store_staged(
    storage: &dyn Storage,
    key: &str,
    file: &Path,
    len: u64,
) -> Result<(), StageError> {
    let within = stage_deadline(len);
    match tokio::time::timeout(within, storage.put_file_durable(key, file)).await {
        Ok(stored) => stored.map_err(StageError::Store),
        Err(_) => Err(StageError::TimedOut(within)),
    }
}

/// Everything a build needs besides its spec. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    pub docker: Docker,
    pub storage: Arc<dyn Storage>,
    pub config: Arc<BuildConfig>,
    pub http: reqwest::Client,
    /// Adds the second tag in the registry itself (see `registry`).
    pub registry: Arc<registry::Registry>,
    /// The ARG form the daemon's builder takes, asked once (see `dockerfile::ArgStyle`).
    arg_style: Arc<tokio::sync::OnceCell<dockerfile::ArgStyle>>,
    /// Per built image (`repo:1.{n}`), what labelling it in the registry left there, until
    /// `tidy` makes it the local `latest`.
    relabelled: Arc<std::sync::Mutex<std::collections::HashMap<String, registry::Relabelled>>>,
}

impl Pipeline {
    pub fn new(docker: Docker, storage: Arc<dyn Storage>, config: Arc<BuildConfig>) -> Self {
        let http = sources::http_client(
            config.sources_connect_timeout,
            config.sources_total_timeout,
            config.deny_networks.clone(),
        );
        Self {
            registry: Arc::new(registry::Registry::new(docker.clone())),
            arg_style: Default::default(),
            relabelled: Default::default(),
            docker,
            storage,
            config,
            http,
        }
    }

    /// Runs one build in `workdir` (created once sources arrive; the caller removes it, and
    /// may find none). Never panics on input: every failure is an `Outcome::Failed` with a
    /// reason, and a line in the log saying why.
    /// Each stage's duration goes into `timings` as it ends (so a stopped build keeps what
    /// it measured).
    pub async fn run(
        &self,
        spec: &BuildSpec,
        log: &mut BuildLog,
        workdir: &Path,
        timings: &mut StageTimings,
    ) -> Outcome {
        log.redact_also(
            self.config
                .extra_registries
                .values()
                .map(|a| a.password.expose()),
        );
        let mut outcome = match sources::parse(spec.sources.expose()) {
            _ if spec.sources_stored => {
                self.build(spec, Fetch::Stored, log, workdir, timings).await
            }
            _ if spec.sources.expose() == sources::SOURCES_TOO_LARGE => {
                too_large(log, &self.config.limits)
            }
            Err(e) => Outcome::failed(FailureReason::InvalidSources, e.to_string()),
            Ok(Source::Docker(src)) => self.retag(spec, &src, log, timings).await,
            Ok(Source::Http(url)) => {
                self.build(spec, Fetch::Http(&url), log, workdir, timings)
                    .await
            }
            Ok(Source::Data(b64)) => {
                self.build(spec, Fetch::Data(&b64), log, workdir, timings)
                    .await
            }
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
        // The message is kept (state, BuildJob status) and sent on: no credential in it.
        if let Outcome::Failed { message, .. } = &mut outcome {
            *message = log.redact(message);
        }
        outcome
    }

    /// fetch → (store ∥ context) → build → push, with the previous image pulled as the layer
    /// cache meanwhile. Storing the archive overlaps the context and the build; it must have
    /// succeeded before anything is pushed. With the classic builder, a download that lasts
    /// also feeds dockerd the context as it arrives (see `overlap`).
    async fn build(
        &self,
        spec: &BuildSpec,
        source: Fetch<'_>,
        log: &mut BuildLog,
        workdir: &Path,
        timings: &mut StageTimings,
    ) -> Outcome {
        // `workdir` is created with the archive file (see ArchiveWriter::create).
        let archive = workdir.join("sources");
        let limits = self.config.limits;
        // A .tar.gz or .tar is checked as it arrives: the fetch feeds the file (for storage)
        // and the check at once; the build then streams its context from the file.
        let (tx, chunks) = mpsc::channel(16);
        let scan = Arc::new(restream::LazyScan::new(chunks, limits));
        let tee = sources::Tee::new(tx).on_start({
            let scan = scan.clone();
            move || scan.start()
        });
        // `auto` is resolved by whoever knows the daemon is the build's own (the controller,
        // for dind pods); here the daemon may be shared.
        let buildkit = self.config.builder.buildkit(false);
        let image = spec.image();
        let args = spec.docker_build_args();
        let request = self.build_request(spec, &image, &args, buildkit);
        let growing = Arc::new(overlap::Growing::default());
        let _ended = overlap::EndOnDrop(growing.clone());
        let fetch_started = Instant::now();
        log.line(&source.announce());
        let (fetched, cache, early) = self
            .fetch_beside_pull(
                spec,
                source,
                &archive,
                tee,
                &growing,
                (!buildkit).then_some(&request),
            )
            .await;
        timings.fetch = Some(elapsed_ms(fetch_started));
        let size = match fetched {
            Ok(n) => n,
            Err(e) => return Outcome::failed(FailureReason::SourceFetchFailed, e.to_string()),
        };
        growing.end(true);
        let cache = cache.unwrap_or_else(|| self.start_cache_pull(spec));
        log.line(&format!("Fetched {size} bytes of sources"));
        let store = self.start_store(spec, source, &archive);

        // From here on, only what the check still has to do after the fetch counts.
        let context_started = Instant::now();
        let labels = spec.image_labels();
        // The classic builder spends a step (a container created and committed) on a `LABEL`
        // instruction. When this process can write to the app's registry, the labels go on
        // there after the push instead (see `tag_and_push`). BuildKit sets them for free.
        let repo = spec.image_repository();
        let label_in_registry = !buildkit && self.registry.can_relabel(&repo);
        let in_dockerfile = if label_in_registry {
            Default::default()
        } else {
            labels.clone()
        };
        let Some(scanning) = scan.take() else {
            return Outcome::failed(FailureReason::Internal, "the archive's check was lost");
        };
        let prepared = self
            .prepare_context(
                scanning,
                args.keys().cloned().collect(),
                buildkit,
                in_dockerfile,
                &archive,
                workdir.join("context"),
            )
            .await;
        timings.context = Some(elapsed_ms(context_started));
        // The early build goes on only with the context this check would send, and where the
        // labels need no build option (which it was started without).
        let early = early.and_then(|e| e.decide(&prepared, label_in_registry));
        let (build_context, labelled, how) = match prepared {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(e)) => {
                // The original archive is still kept, as for any other failed build.
                if let Some(store) = store {
                    let _ = self.stored(store, timings).await;
                }
                return Outcome::failed(FailureReason::InvalidSources, e.to_string());
            }
            Err(e) => return Outcome::failed(FailureReason::Internal, e),
        };

        let cache_from = cache.finish(log, timings).await;
        let early_built = match early {
            Some(early) => early.finish(&image, log, timings).await,
            None => None,
        };
        let request = docker::BuildRequest {
            // With the labels neither in the Dockerfile nor set in the registry later: one
            // step per label. (An early build ran only without them.)
            labels: if labelled || label_in_registry {
                Default::default()
            } else {
                labels.clone()
            },
            cache_from,
            ..request
        };
        let mut built = match early_built {
            Some(built) => built,
            None => {
                log.line(&how);
                log.line(&format!("Building {image}"));
                self.build_timed(request.clone(), build_context.clone(), log, timings)
                    .await
            }
        };
        for _ in 0..LOST_IMAGE_RETRIES {
            if !matches!(&built, Err(e) if docker::lost_a_cache_candidate(e)) {
                break;
            }
            log.line(
                "dockerd lost an image while looking for cached steps (another build's image \
                 was being removed at that moment); building again",
            );
            built = self
                .build_timed(request.clone(), build_context.clone(), log, timings)
                .await;
        }
        if let Some(store) = store {
            if let Err(e) = self.stored(store, timings).await {
                return e;
            }
        }
        if let Err(e) = built {
            return docker_failure(e);
        }
        let in_registry = label_in_registry.then_some(&labels);
        self.push_both(spec, &image, &repo, in_registry, log, timings)
            .await
    }

    /// One build of `context`; its time is added to `timings.build`.
    async fn build_timed(
        &self,
        request: docker::BuildRequest,
        context: Context,
        log: &mut BuildLog,
        timings: &mut StageTimings,
    ) -> Result<(), DockerError> {
        let started = Instant::now();
        let built = docker::build(&self.docker, request, context.stream(), log).await;
        timings.build = Some(timings.build.unwrap_or(0) + elapsed_ms(started));
        built
    }

    /// The build's request to dockerd, without its labels and layer cache (decided later).
    fn build_request(
        &self,
        spec: &BuildSpec,
        image: &str,
        args: &BTreeMap<String, String>,
        buildkit: bool,
    ) -> docker::BuildRequest {
        let mut registries = self.config.extra_registries.clone();
        if let Some(auth) = &spec.gm_registry_auth {
            registries.insert(spec.gm_registry_host.clone(), auth.clone());
        }
        docker::BuildRequest {
            tag: image.to_string(),
            // Set in the registry later, or one LABEL step in the Dockerfile, or (rarely, see
            // `build`) one step per label.
            labels: Default::default(),
            build_args: args.clone(),
            no_cache: self.config.no_cache,
            registries: docker::credentials(&registries),
            cache_from: Vec::new(),
            buildkit,
        }
    }

    /// Fetches the sources into `archive` (and `tee`). The layer cache pull runs beside the
    /// fetch (on an empty daemon it is the longest step before the build), starting once the
    /// fetch has lasted CACHE_PULL_AFTER: sources that fail at once cost no call to dockerd,
    /// and a real download hardly waits. So does the build fed as the archive arrives, when
    /// `early` holds its request (classic builder), once the pull is done.
    async fn fetch_beside_pull(
        &self,
        spec: &BuildSpec,
        source: Fetch<'_>,
        archive: &Path,
        tee: sources::Tee,
        growing: &Arc<overlap::Growing>,
        early: Option<&docker::BuildRequest>,
    ) -> (
        Result<u64, sources::SourceError>,
        Option<CachePull>,
        Option<EarlyBuild>,
    ) {
        let limits = self.config.limits;
        let fetch = async {
            match source {
                Fetch::Http(url) => {
                    let (http, deny) = (&self.http, &self.config.deny_networks);
                    sources::download(http, deny, url, archive, &limits, Some(tee)).await
                }
                Fetch::Data(b64) => sources::write_data_tee(b64, archive, &limits, Some(tee)).await,
                Fetch::Stored => {
                    self.read_stored(&spec.source_key(), archive, &limits, tee)
                        .await
                }
            }
        };
        tokio::pin!(fetch);
        tokio::select! {
            biased;
            fetched = &mut fetch => (fetched, None, None),
            () = tokio::time::sleep(CACHE_PULL_AFTER) => {
                let pull = self.start_cache_pull(spec);
                let early = early.map(|request| {
                    self.start_early_build(archive, growing.clone(), pull.images(), request.clone())
                });
                (fetch.await, Some(pull), early)
            }
        }
    }

    /// Starts the durable upload of a fetched archive to storage (none for sources read back
    /// from it). Its writeback starts now, beside the context and the build, rather than when
    /// dockerd's first build container syncs the disk and waits for it (40–80 ms for 100 MiB).
    fn start_store(
        &self,
        spec: &BuildSpec,
        source: Fetch<'_>,
        archive: &Path,
    ) -> Option<AbortOnDropHandle<(Result<(), crate::storage::StorageError>, u64)>> {
        if matches!(source, Fetch::Stored) {
            return None;
        }
        let (storage, key, file) = (self.storage.clone(), spec.source_key(), archive.to_owned());
        // Durable: a retry or a rebuild reads this copy.
        Some(AbortOnDropHandle::new(tokio::spawn(async move {
            let started = Instant::now();
            let stored = storage.put_file_durable(&key, &file).await;
            (stored, elapsed_ms(started))
        })))
    }

    /// Finishes the context once the fetch has ended: a checked archive streams as it is
    /// (`restream`), anything else is extracted into `dest`. The Dockerfile gets the build's
    /// ARGs and, unless empty, `labels`. Answers the context, whether the labels went into
    /// the Dockerfile, and a log line saying how the context is sent.
    async fn prepare_context(
        &self,
        scanning: restream::Scanning,
        keys: Vec<String>,
        buildkit: bool,
        labels: BTreeMap<String, String>,
        archive: &Path,
        dest: std::path::PathBuf,
    ) -> Result<Result<(Context, bool, String), context::ContextError>, String> {
        // BuildKit's ARGs cost nothing and a pinned `# syntax=` frontend may predate the
        // one-instruction form: one per name there. The classic builder pays a step per ARG.
        let one_per_name = keys.is_empty() || buildkit;
        let style = async {
            if one_per_name {
                dockerfile::ArgStyle::OnePerName
            } else {
                self.arg_style().await
            }
        };
        let (file, limits) = (archive.to_owned(), self.config.limits);
        // The daemon's ARG form (asked once per process) while the check finishes.
        let (style, scanned) = tokio::join!(style, scanning);
        let scanned = scanned.map_err(|e| format!("context preparation stopped: {e}"))?;
        tokio::task::spawn_blocking(move || match scanned? {
            restream::Scan::Stream(plan) => {
                let (prepared, labelled) = plan.prepare(&keys, style, &labels)?;
                let how = "Sending the build context straight from the archive".to_string();
                Ok((Context::Archive(file, prepared), labelled, how))
            }
            restream::Scan::Extract(why) => {
                let root = context::extract(&file, &dest, &limits)?;
                let labelled = context::prepare_dockerfile(&root, &keys, style, &labels)?;
                let ignore = context::DockerIgnore::load(&root)?;
                let how = format!("Extracted the sources for the build context ({why})");
                Ok::<_, context::ContextError>((Context::Folder(root, ignore), labelled, how))
            }
        })
        .await
        .map_err(|e| format!("context preparation stopped: {e}"))
    }

    /// Starts the build with a context fed by the archive as it downloads (see `overlap`):
    /// dockerd is called once the archive has given its first entries, with the layer cache
    /// `images` once that pull is done. Its lines wait in a side log.
    fn start_early_build(
        &self,
        archive: &Path,
        growing: Arc<overlap::Growing>,
        images: futures::future::BoxFuture<'static, Vec<String>>,
        mut request: docker::BuildRequest,
    ) -> EarlyBuild {
        use futures::StreamExt;
        let (verdict, verdict_rx) = tokio::sync::oneshot::channel();
        let gave_up = overlap::GaveUp::default();
        let mut context = overlap::stream_while_written(
            archive.to_path_buf(),
            self.config.limits,
            growing,
            verdict_rx,
            gave_up.clone(),
        );
        let docker = self.docker.clone();
        let (mut side, lines) = gated_side_log(gave_up.clone());
        let task = tokio::spawn(async move {
            let first = match context.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return (Err(DockerError::Build(e.to_string())), None),
                None => return (Err(DockerError::Build("no context".into())), None),
            };
            request.cache_from = images.await;
            let started = Instant::now();
            let body = futures::stream::once(async move { Ok(first) }).chain(context);
            (
                docker::build(&docker, request, body, &mut side).await,
                Some(started),
            )
        });
        EarlyBuild {
            task: AbortOnDropHandle::new(task),
            lines,
            verdict: Some(verdict),
            gave_up,
        }
    }

    /// The ARG form this daemon's classic builder takes. A failed question is not remembered:
    /// the next build asks again, this one uses the form every builder takes.
    async fn arg_style(&self) -> dockerfile::ArgStyle {
        let asked = self
            .arg_style
            .get_or_try_init(|| docker::arg_style(&self.docker))
            .await;
        asked.copied().unwrap_or(dockerfile::ArgStyle::OnePerName)
    }

    /// Waits for the archive's upload to storage and records how long it took.
    async fn stored(
        &self,
        store: AbortOnDropHandle<(Result<(), crate::storage::StorageError>, u64)>,
        timings: &mut StageTimings,
    ) -> Result<(), Outcome> {
        let failed = |e: String| {
            Outcome::failed(
                FailureReason::SourceStoreFailed,
                format!("could not store the sources: {e}"),
            )
        };
        match store.await {
            Ok((Ok(()), ms)) => {
                timings.store = Some(ms);
                Ok(())
            }
            Ok((Err(e), ms)) => {
                timings.store = Some(ms);
                Err(failed(e.to_string()))
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Starts pulling the app's previous image (`…:latest`) with the build's registry
    /// credentials, so an empty daemon can reuse its layers (CACHE_FROM_LATEST).
    fn start_cache_pull(&self, spec: &BuildSpec) -> CachePull {
        if self.config.no_cache || !self.config.cache_from_latest {
            return CachePull::Off;
        }
        let docker = self.docker.clone();
        let (repo, auth) = self.layer_cache(spec);
        let image = format!("{repo}:latest");
        let classic = !self.config.builder.buildkit(false);
        let (mut side, lines) = side_log();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            // A daemon that has the app's latest image has its layers in its own cache
            // (it built or pulled it): no registry round trip on the critical path. And with
            // `cachefrom` the classic builder would use nothing but the listed images, so it
            // is only passed for an image it cannot find its steps from: one that came from
            // the registry, or was loaded relabelled (no parent image here).
            let cache_from = if docker::image_id(&docker, &image).await.is_some() {
                side.line(&format!(
                    "{image} is already here; using the local layer cache"
                ));
                if classic && !docker::has_parents(&docker, &image).await {
                    vec![image]
                } else {
                    vec![]
                }
            } else {
                match docker::pull_quiet(&docker, &image, auth, &mut side).await {
                    Ok(()) => {
                        side.line(&format!("Using {image} as the layer cache"));
                        vec![image]
                    }
                    Err(e) => {
                        side.line(&format!(
                            "No previous image to use as the layer cache ({e}); building without it"
                        ));
                        vec![]
                    }
                }
            };
            (cache_from, elapsed_ms(started))
        });
        let task = AbortOnDropHandle::new(task);
        CachePull::Running {
            result: futures::FutureExt::shared(futures::FutureExt::boxed(async move {
                task.await.map_err(|e| e.to_string())
            })),
            lines,
        }
    }
    /// Decodes a `data:` URI's archive into storage now, so the build's spec (kept in state,
    /// or in a BuildJob) carries a reference instead of the payload. An archive that cannot
    /// be decoded is left in the spec: the build decodes it and fails (InvalidSources) as
    /// usual. Storage that fails, or does not take the archive within `stage_deadline`, is
    /// an error: the build cannot be acknowledged without its only copy of the sources.
    pub async fn stage_inline_sources(
        &self,
        spec: &mut BuildSpec,
        scratch: &Path,
    ) -> Result<(), StageError> {
        let Some(b64) = sources::data_payload(spec.sources.expose()) else {
            return Ok(());
        };
        // Unique: two `POST /`s of one build may stage at once, and storage may keep the
        // staged file itself (a hard link) as the object.
        let file = scratch.join(format!(
            "{}.{}.incoming",
            spec.build_uuid,
            uuid::Uuid::new_v4().simple()
        ));
        let staged = async {
            let len = match sources::write_data(b64, &file, &self.config.limits).await {
                Ok(len) => len,
                // Failed again when it runs, from a stand-in: the state keeps no megabytes.
                Err(e) => return Ok(Err(sources::stand_in(spec.sources.expose(), b64, &e))),
            };
            // The build is acknowledged after this: the stored copy must survive a power loss.
            store_staged(self.storage.as_ref(), &spec.source_key(), &file, len)
                .await
                .map(Ok)
        }
        .await;
        let _ = tokio::fs::remove_file(&file).await;
        match staged? {
            Ok(()) => {
                spec.sources = crate::secret::Secret::new("data:base64,");
                spec.sources_stored = true;
            }
            Err(stand_in) => spec.sources = crate::secret::Secret::new(stand_in),
        }
        Ok(())
    }

    /// Copies the stored archive `key` into `dest` (and `tee`), within the source size limit.
    async fn read_stored(
        &self,
        key: &str,
        dest: &Path,
        limits: &crate::config::Limits,
        tee: sources::Tee,
    ) -> Result<u64, sources::SourceError> {
        use futures::StreamExt;
        let failed = |reason: String| sources::SourceError::Download {
            url: format!("storage key {key}"),
            reason,
        };
        let obj = self
            .storage
            .get(key)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut body = obj
            .ok_or_else(|| failed("the stored sources are missing".into()))?
            .body;
        let mut file = sources::ArchiveWriter::create(dest, Some(tee)).await?;
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            // A read error is the storage's (S3 stopped sending), not the disk's.
            let chunk = chunk.map_err(|e| failed(e.to_string()))?;
            written += chunk.len() as u64;
            if written > limits.max_source_bytes {
                return Err(sources::SourceError::TooLarge {
                    limit: limits.max_source_bytes,
                });
            }
            file.write(chunk).await?;
        }
        file.finish().await?;
        Ok(written)
    }

    /// `docker://` sources: pull, re-tag as this build's image, push.
    async fn retag(
        &self,
        spec: &BuildSpec,
        src: &sources::DockerSource,
        log: &mut BuildLog,
        timings: &mut StageTimings,
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
        let started = Instant::now();
        let pulled = docker::pull(&self.docker, &src.image, creds, log).await;
        timings.build = Some(elapsed_ms(started));
        if let Err(e) = pulled {
            return docker_failure(e);
        }
        self.push_both(
            spec,
            &src.image,
            &spec.image_repository(),
            None,
            log,
            timings,
        )
        .await
    }

    /// Pushes `image` as `repo:1.{n}` and `repo:latest` with gm_registry_auth (`latest`
    /// through the registry's API when it can; then no local `latest` tag is needed yet),
    /// with `labels` set on it in the registry when they are not on the image yet.
    async fn push_both(
        &self,
        spec: &BuildSpec,
        image: &str,
        repo: &str,
        labels: Option<&BTreeMap<String, String>>,
        log: &mut BuildLog,
        timings: &mut StageTimings,
    ) -> Outcome {
        let started = Instant::now();
        let pushed = self.tag_and_push(spec, image, repo, labels, log).await;
        if pushed.is_ok() {
            self.push_cache(spec, image, log).await;
        }
        timings.push = Some(elapsed_ms(started));
        match pushed {
            Ok(digest) => Outcome::Succeeded {
                image: spec.image(),
                digest,
            },
            Err(e) => docker_failure(e),
        }
    }

    /// The repository whose `:latest` is the build's layer cache (CACHE_REPOSITORY's, else
    /// the app's own) and the credentials for its registry.
    fn layer_cache(&self, spec: &BuildSpec) -> (String, Option<bollard::auth::DockerCredentials>) {
        let Some(cache) = &self.config.cache_repository else {
            return (spec.image_repository(), app_registry_credentials(spec));
        };
        let repo = format!("{cache}/{}", spec.app_key());
        let host = cache.split('/').next().unwrap_or_default();
        let auth = if host == spec.gm_registry_host.trim_end_matches('/') {
            app_registry_credentials(spec)
        } else {
            self.config
                .extra_registries
                .get(host)
                .map(|a| docker::credential(host, a))
        };
        (repo, auth)
    }

    /// Pushes the built image as the app's layer cache in CACHE_REPOSITORY. The build has
    /// succeeded already: a failure here is one log line.
    async fn push_cache(&self, spec: &BuildSpec, image: &str, log: &mut BuildLog) {
        if self.config.cache_repository.is_none() || self.config.no_cache {
            return;
        }
        let (repo, auth) = self.layer_cache(spec);
        let pushed = async {
            docker::tag(&self.docker, image, &repo, "latest").await?;
            docker::push(&self.docker, &repo, "latest", auth, log).await
        }
        .await;
        if let Err(e) = pushed {
            log.line(&format!(
                "Could not update the layer cache {repo}:latest ({e}); the build itself succeeded"
            ));
        }
    }

    async fn tag_and_push(
        &self,
        spec: &BuildSpec,
        image: &str,
        repo: &str,
        labels: Option<&BTreeMap<String, String>>,
        log: &mut BuildLog,
    ) -> Result<Option<String>, DockerError> {
        let version = spec.version_tag();
        // A build is tagged `repo:1.{n}` already; only a re-tag needs it. The local `latest`
        // waits for `tidy`, unless dockerd has to push it (below).
        if image != format!("{repo}:{version}") {
            docker::tag(&self.docker, image, repo, &version).await?;
        }
        let auth = app_registry_credentials(spec);
        let mut digest = docker::push(&self.docker, repo, &version, auth.clone(), log).await?;
        if let Some(labels) = labels {
            // The image as pushed has no labels yet: a copy of its config with them, under
            // both tags (four requests more than tagging `latest` alone).
            let relabelled = match &digest {
                Some(d) => {
                    self.registry
                        .relabel(repo, d, labels, &[&version, "latest"], auth.as_ref())
                        .await
                }
                None => Err(registry::RegistryError::Unexpected(
                    "dockerd did not say which digest it pushed".into(),
                )),
            };
            match relabelled {
                Ok(r) => {
                    log.line(&format!(
                        "Labelled {repo}:{version} and tagged it latest in the registry as {}",
                        r.digest
                    ));
                    let new = r.digest.clone();
                    if let Ok(mut m) = self.relabelled.lock() {
                        m.insert(image.to_string(), r);
                    }
                    return Ok(Some(new));
                }
                Err(e) => {
                    // The image must not ship without its labels: a LABEL step now, and the
                    // labelled image pushed over the unlabelled one.
                    log.line(&format!(
                        "Could not label the image in the registry ({e}); adding the labels with a build step"
                    ));
                    self.label_with_a_step(image, labels, log).await?;
                    digest = docker::push(&self.docker, repo, &version, auth.clone(), log).await?;
                }
            }
        }
        // `latest` is the same manifest. Written straight to the registry it is two requests;
        // dockerd's push of it checks every layer again (~50 ms for a small image here).
        // Both pushes at once made the registry answer 500 now and then (two uploads of the
        // same config blob racing), so the fallback stays one after the other.
        if let Some(d) = &digest {
            match self
                .registry
                .add_tag(repo, d, "latest", auth.as_ref())
                .await
            {
                Ok(()) => {
                    log.line(&format!("Tagged {repo}:latest as {d} in the registry"));
                    return Ok(digest);
                }
                Err(e) => {
                    tracing::info!(error = %e, "tagging latest through the registry API did not work; pushing it with dockerd")
                }
            }
        }
        docker::tag(&self.docker, image, repo, "latest").await?;
        let pushed = docker::push(&self.docker, repo, "latest", auth, log).await?;
        Ok(digest.or(pushed))
    }

    /// Gives the local image `image` `labels` with a one-line build (`FROM image` + `LABEL`),
    /// tagged `image` again: what the build's own Dockerfile would have done.
    async fn label_with_a_step(
        &self,
        image: &str,
        labels: &BTreeMap<String, String>,
        log: &mut BuildLog,
    ) -> Result<(), DockerError> {
        let from = format!("FROM {image}\n");
        let (dockerfile, option_labels) = match dockerfile::label_line(&from, labels) {
            Some(line) => (dockerfile::append_line(&from, &line), BTreeMap::new()),
            None => (from, labels.clone()),
        };
        let context = context::small_tar(&[("Dockerfile", dockerfile.as_bytes())])
            .map_err(|e| DockerError::Build(format!("the labelling context: {e}")))?;
        let request = docker::BuildRequest {
            tag: image.to_string(),
            labels: option_labels,
            build_args: BTreeMap::new(),
            no_cache: false,
            registries: Default::default(),
            cache_from: vec![],
            buildkit: false,
        };
        let context = futures::stream::once(async move { Ok(bytes::Bytes::from(context)) });
        docker::build(&self.docker, request, context, log).await
    }

    /// Housekeeping once a build has succeeded, to run beside its final callback rather than
    /// before it: the app's local `latest` (the next build's local layer cache) moves to the
    /// new image, and the local `1.{n}` tag, needed only for the push, goes. A daemon that
    /// outlives its builds (local mode, `host` and `external` workers) so keeps one tag per
    /// app instead of one per build: dockerd rewrites its whole tag store on every tag
    /// change, 10 ms per tag here with 200 tags and 30–60 ms with 8,000. The image the tag
    /// left is dangling; `docker image prune` reclaims its layers. The future holds only
    /// what it needs, and nothing for a failed build.
    pub fn tidy(
        &self,
        spec: &BuildSpec,
        outcome: &Outcome,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let relabelled = self
            .relabelled
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&spec.image()));
        let job = matches!(outcome, Outcome::Succeeded { .. }).then(|| {
            let docker = self.docker.clone();
            (docker, spec.image(), spec.image_repository(), relabelled)
        });
        async move {
            let Some((docker, image, repo, relabelled)) = job else {
                return;
            };
            let latest = format!("{repo}:latest");
            // Labelled in the registry: the local `latest` becomes that very image (its config
            // over the layers already here, so its ID is the registry's config digest).
            // Otherwise, or if the daemon will not load it, the built image.
            let loaded = match relabelled {
                Some(r) => {
                    let id = registry::sha256_digest(&r.config);
                    match docker::load_config(&docker, r.config, r.layers, &latest).await {
                        Ok(()) => Some(id),
                        Err(e) => {
                            tracing::info!(error = %e, "the local latest image keeps no labels");
                            None
                        }
                    }
                }
                None => None,
            };
            let ours = match loaded {
                Some(id) => Some(id),
                None => {
                    if let Err(e) = docker::tag(&docker, &image, &repo, "latest").await {
                        tracing::info!(error = %e, "could not tag the app's local latest image");
                        return;
                    }
                    docker::image_id(&docker, &image).await
                }
            };
            // Only while `latest` still holds the build's image (a build of the same app
            // finishing at the same time may have moved it): then the image keeps a tag and
            // nothing is deleted.
            let now = docker::image_id(&docker, &latest).await;
            if now.is_none() || now != ours {
                return;
            }
            if let Err(e) = docker::untag(&docker, &image).await {
                tracing::info!(error = %e, "could not remove the build's local tag");
            }
        }
    }
}

/// A build log whose lines are handed over through a channel, for a step that runs beside
/// the build's own log; `forward` writes them into the build log (redacted there).
fn side_log() -> (BuildLog, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        BuildLog::new(Vec::new()).with_sink(Box::new(Forward(tx, None))),
        rx,
    )
}

/// A side log that stops taking lines once `gate` holds a reason: an early build's lines
/// after its stream gave up (the failed upload's error) are not the build's.
fn gated_side_log(gate: overlap::GaveUp) -> (BuildLog, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        BuildLog::new(Vec::new()).with_sink(Box::new(Forward(tx, Some(gate)))),
        rx,
    )
}

struct Forward(mpsc::UnboundedSender<String>, Option<overlap::GaveUp>);

impl Sink for Forward {
    fn write_line(&mut self, line: &str) {
        let closed = self
            .1
            .as_ref()
            .is_some_and(|gate| gate.lock().map_or(true, |reason| reason.is_some()));
        if !closed {
            let _ = self.0.send(line.to_string());
        }
    }
    fn finish(self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// Waits for `task`, writing the lines of its side log into `log` as they come.
async fn forward<F: std::future::Future>(
    log: &mut BuildLog,
    mut lines: mpsc::UnboundedReceiver<String>,
    task: F,
) -> F::Output {
    tokio::pin!(task);
    loop {
        tokio::select! {
            biased;
            Some(line) = lines.recv() => log.line(&line),
            out = &mut task => {
                while let Ok(line) = lines.try_recv() {
                    log.line(&line);
                }
                return out;
            }
        }
    }
}

/// The build's credentials (`gm_registry_auth`) for the app's registry.
fn app_registry_credentials(spec: &BuildSpec) -> Option<bollard::auth::DockerCredentials> {
    spec.gm_registry_auth
        .as_ref()
        .map(|a| docker::credential(&spec.gm_registry_host, a))
}

/// How long a fetch runs before the layer cache pull starts beside it.
const CACHE_PULL_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// How often a build that failed only because dockerd lost an image it was looking through
/// (`docker::lost_a_cache_candidate`) is built again. Each retry finds the steps done so far
/// in the cache; the race takes a removal at the very moment of a cache lookup, so a second
/// one in a row is rare and a third is not a race.
const LOST_IMAGE_RETRIES: usize = 2;

/// A build started while the sources download (see `Pipeline::start_early_build`).
struct EarlyBuild {
    /// The build's result, and when dockerd was called.
    task: AbortOnDropHandle<(Result<(), DockerError>, Option<Instant>)>,
    lines: mpsc::UnboundedReceiver<String>,
    /// The checked archive's context, for the end of the stream.
    verdict: Option<tokio::sync::oneshot::Sender<Result<overlap::Verdict, String>>>,
    gave_up: overlap::GaveUp,
}

type Prepared = Result<Result<(Context, bool, String), context::ContextError>, String>;

impl EarlyBuild {
    /// Tells the stream whether the checked archive's context is the one it guessed; the
    /// build goes on only then (dropped, it stops: dockerd builds nothing).
    fn decide(mut self, prepared: &Prepared, label_in_registry: bool) -> Option<Self> {
        let verdict = match prepared {
            Ok(Ok((Context::Archive(_, p), labelled, _))) if *labelled || label_in_registry => {
                Ok(p.verdict())
            }
            Ok(Ok((Context::Archive(..), ..))) => Err("its labels are build options".into()),
            Ok(Ok((Context::Folder(..), _, how))) => Err(how.clone()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let go = verdict.is_ok();
        if let Some(sender) = self.verdict.take() {
            let _ = sender.send(verdict);
        }
        go.then_some(self)
    }

    /// Waits for the build, writing its lines into `log`; `None` if its stream gave up after
    /// all (the context is then sent again the usual way).
    async fn finish(
        self,
        image: &str,
        log: &mut BuildLog,
        timings: &mut StageTimings,
    ) -> Option<Result<(), DockerError>> {
        log.line("The build context went to dockerd as the sources downloaded");
        log.line(&format!("Building {image}"));
        let (result, started) = forward(log, self.lines, self.task)
            .await
            .unwrap_or_else(|e| (Err(DockerError::Build(e.to_string())), None));
        if let Ok(Some(why)) = self.gave_up.lock().map(|mut g| g.take()) {
            log.line(&format!("Sending the build context again ({why})"));
            return None;
        }
        timings.build = started.map(elapsed_ms);
        Some(result)
    }
}

/// A task's result that more than one waits for (the task stops when none does).
type SharedResult<T> =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<T, String>>>;

/// The pull of the previous image, running beside fetch and context.
enum CachePull {
    Off,
    Running {
        /// The images to build from, and how long the pull took.
        result: SharedResult<(Vec<String>, u64)>,
        lines: mpsc::UnboundedReceiver<String>,
    },
}

impl CachePull {
    /// The images to build from, once the pull is done (for a build that starts before
    /// `finish` logs it).
    fn images(&self) -> futures::future::BoxFuture<'static, Vec<String>> {
        use futures::FutureExt;
        match self {
            CachePull::Off => futures::future::ready(Vec::new()).boxed(),
            CachePull::Running { result, .. } => result
                .clone()
                .map(|r| r.map(|(images, _)| images).unwrap_or_default())
                .boxed(),
        }
    }

    /// Waits for the pull, logs what it did, and returns the images to build from.
    async fn finish(self, log: &mut BuildLog, timings: &mut StageTimings) -> Vec<String> {
        let CachePull::Running { result, lines } = self else {
            return Vec::new();
        };
        match forward(log, lines, result).await {
            Ok((images, ms)) => {
                timings.cache = Some(ms);
                images
            }
            Err(e) => {
                log.line(&format!(
                    "The layer cache pull stopped ({e}); building without it"
                ));
                Vec::new()
            }
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

impl Fetch<'_> {
    /// The build log's line for the fetch's start (a URL's credentials redacted).
    fn announce(self) -> String {
        match self {
            Fetch::Http(url) => format!(
                "Fetching sources from {}",
                crate::secret::redact_url(url.as_str())
            ),
            Fetch::Data(_) => "Decoding sources from the data: URI".into(),
            Fetch::Stored => "Reading the sources from storage".into(),
        }
    }
}

fn docker_failure(e: DockerError) -> Outcome {
    let reason = match &e {
        DockerError::Build(_) => FailureReason::BuildFailed,
        DockerError::Push { .. } => FailureReason::PushFailed,
        DockerError::Pull { .. } => FailureReason::PullFailed,
        DockerError::Tag { .. } | DockerError::Untag { .. } | DockerError::Load { .. } => {
            FailureReason::BuildFailed
        }
        DockerError::Unavailable { .. } | DockerError::Lost(_) | DockerError::TlsFiles(_) => {
            FailureReason::DockerUnavailable
        }
    };
    Outcome::failed(reason, e.to_string())
}

/// The build of `SOURCES_TOO_LARGE` (a `data:` URI refused for its length when it was
/// accepted): failed as the URI itself fails, with the same lines, at once.
pub fn too_large(log: &mut BuildLog, limits: &crate::config::Limits) -> Outcome {
    log.line("Decoding sources from the data: URI");
    let error = sources::SourceError::TooLarge {
        limit: limits.max_source_bytes,
    };
    Outcome::failed(FailureReason::SourceFetchFailed, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Object, StorageError};
    use clap::Parser;
    use std::sync::Mutex;

    /// Records which store call each key went through.
    #[derive(Default)]
    struct Recording(Mutex<Vec<(String, &'static str)>>);

    #[async_trait::async_trait]
    impl crate::storage::Storage for Recording {
        async fn put_file(&self, key: &str, _path: &Path) -> Result<(), StorageError> {
            self.0.lock().unwrap().push((key.into(), "put_file"));
            Ok(())
        }
        async fn put_file_durable(&self, key: &str, _path: &Path) -> Result<(), StorageError> {
            self.0
                .lock()
                .unwrap()
                .push((key.into(), "put_file_durable"));
            Ok(())
        }
        async fn get(&self, _key: &str) -> Result<Option<Object>, StorageError> {
            Ok(None)
        }
        async fn exists(&self, _key: &str) -> Result<bool, StorageError> {
            Ok(false)
        }
        fn describe(&self) -> String {
            "recording".into()
        }
    }

    /// A pipeline with the default settings, storing into a `Recording`, whose dockerd is a
    /// closed port.
    fn offline_pipeline() -> (Pipeline, Arc<Recording>) {
        let cli = crate::config::Cli::try_parse_from(["buildshuttle", "serve"])
            .unwrap_or_else(|e| panic!("{e}"));
        let crate::config::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = Arc::new(args.build.validate().unwrap_or_else(|e| panic!("{e}")));
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap_or_else(|e| panic!("{e}"));
        let storage = Arc::new(Recording::default());
        (Pipeline::new(docker, storage.clone(), config), storage)
    }

    #[tokio::test]
    async fn downloaded_sources_are_stored_durably() {
        // The stored archive is what a retry or a rebuild reads; writing it back early also
        // spares dockerd's first build container (it syncs the disk) that wait.
        let (pipeline, storage) = offline_pipeline();
        let archive = context::small_tar(&[("Dockerfile", b"FROM scratch\n")]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/app.tar",
            axum::routing::get(move || async move { archive.clone() }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut spec = crate::build::tests::spec();
        spec.sources = crate::secret::Secret::new(format!("http://{addr}/app.tar"));
        let work = tempfile::tempdir().unwrap();
        let mut log = BuildLog::new(Vec::new());
        let outcome = pipeline
            .run(
                &spec,
                &mut log,
                &work.path().join("build"),
                &mut StageTimings::default(),
            )
            .await;
        assert!(
            matches!(
                &outcome,
                Outcome::Failed {
                    reason: FailureReason::DockerUnavailable,
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(
            *storage.0.lock().unwrap(),
            vec![(spec.source_key(), "put_file_durable")]
        );
    }

    #[tokio::test]
    async fn inline_sources_are_staged_durably_before_the_build_is_acknowledged() {
        // dockerd is never contacted: staging only decodes and stores.
        let (pipeline, storage) = offline_pipeline();
        let scratch = tempfile::tempdir().unwrap();
        let mut spec = crate::build::tests::spec();
        pipeline
            .stage_inline_sources(&mut spec, scratch.path())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(spec.sources_stored);
        assert_eq!(spec.sources.expose(), "data:base64,");
        assert_eq!(
            *storage.0.lock().unwrap(),
            vec![(spec.source_key(), "put_file_durable")]
        );
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_undecodable_data_uri_is_kept_as_a_short_stand_in_that_fails_the_same_way() {
        let (offline, storage) = offline_pipeline();
        let mut config = (*offline.config).clone();
        config.limits.max_source_bytes = 1 << 20;
        let pipeline = Pipeline::new(offline.docker, storage.clone(), Arc::new(config));
        let scratch = tempfile::tempdir().unwrap();
        // 600 KB of base64 with a bad symbol in its fifth 64 KiB: the state would keep it all.
        let mut payload = "QUJD".repeat(150_000);
        payload.replace_range(300_001..300_002, "!");
        let mut spec = crate::build::tests::spec();
        spec.sources = crate::secret::Secret::new(format!("data:base64,{payload}"));
        pipeline
            .stage_inline_sources(&mut spec, scratch.path())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!spec.sources_stored);
        let kept = spec.sources.expose();
        assert!(kept.len() <= sources::STAND_IN_MAX, "{}", kept.len());
        let b64 = sources::data_payload(kept).unwrap_or_else(|| panic!("{kept}"));
        let elsewhere = tempfile::tempdir().unwrap();
        let e = sources::write_data(b64, &elsewhere.path().join("x"), &pipeline.config.limits)
            .await
            .expect_err("it fails as the whole URI does");
        assert!(matches!(e, sources::SourceError::BadBase64(_)), "{e}");
        // Too large for MAX_SOURCE_BYTES: kept as SOURCES_TOO_LARGE, whose build fails so.
        let mut spec = crate::build::tests::spec();
        spec.sources =
            crate::secret::Secret::new(format!("data:base64,{}", "QUJD".repeat(400_000)));
        pipeline
            .stage_inline_sources(&mut spec, scratch.path())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.sources.expose(), sources::SOURCES_TOO_LARGE);
        let mut log = BuildLog::new(Vec::new());
        let work = tempfile::tempdir().unwrap();
        let outcome = pipeline
            .run(&spec, &mut log, work.path(), &mut StageTimings::default())
            .await;
        match outcome {
            Outcome::Failed { reason, message } => {
                assert_eq!(reason, FailureReason::SourceFetchFailed);
                assert!(message.contains("MAX_SOURCE_BYTES"), "{message}");
            }
            o => panic!("{o:?}"),
        }
        assert!(storage.0.lock().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_outcome_message_holds_no_credential() {
        let (offline, storage) = offline_pipeline();
        let mut config = (*offline.config).clone();
        // A password the daemon's error happens to echo (words of it, here).
        config.extra_registries.insert(
            "r.example:5000".into(),
            crate::build::RegistryAuth {
                username: "u".into(),
                password: crate::secret::Secret::new("hyper legacy client"),
            },
        );
        let pipeline = Pipeline::new(offline.docker, storage, Arc::new(config));
        let mut spec = crate::build::tests::spec();
        spec.sources = crate::secret::Secret::new("docker://127.0.0.1:5000/base/busybox:1");
        let mut log = BuildLog::new(Vec::new());
        let work = tempfile::tempdir().unwrap();
        let outcome = pipeline
            .run(&spec, &mut log, work.path(), &mut StageTimings::default())
            .await;
        let Outcome::Failed { message, .. } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(!message.contains("hyper legacy client"), "{message}");
        assert!(message.contains("***"), "{message}");
    }

    /// A store that accepts the upload and never answers (a hung S3).
    struct Hung;

    #[async_trait::async_trait]
    impl crate::storage::Storage for Hung {
        async fn put_file(&self, _key: &str, _path: &Path) -> Result<(), StorageError> {
            std::future::pending().await
        }
        async fn get(&self, _key: &str) -> Result<Option<Object>, StorageError> {
            Ok(None)
        }
        async fn exists(&self, _key: &str) -> Result<bool, StorageError> {
            Ok(false)
        }
        fn describe(&self) -> String {
            "hung".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn staging_into_a_store_that_never_answers_ends_at_its_deadline() {
        let (offline, _) = offline_pipeline();
        let pipeline = Pipeline::new(offline.docker, Arc::new(Hung), offline.config);
        let scratch = tempfile::tempdir().unwrap();
        let mut spec = crate::build::tests::spec();
        let before = spec.sources.expose().to_string();
        let started = tokio::time::Instant::now();
        let e = pipeline
            .stage_inline_sources(&mut spec, scratch.path())
            .await
            .expect_err("a hung store fails the staging");
        assert!(matches!(e, StageError::TimedOut(_)), "{e}");
        let took = started.elapsed();
        assert!(
            took >= stage_deadline(3) && took < stage_deadline(3) * 2,
            "{took:?}"
        );
        assert_eq!(stage_deadline(3), std::time::Duration::from_secs(30));
        assert_eq!(
            stage_deadline(200 * 1024 * 1024),
            std::time::Duration::from_secs(230)
        );
        // Nothing staged: the spec is as it came, and the scratch file is gone.
        assert!(!spec.sources_stored);
        assert_eq!(spec.sources.expose(), before);
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    }
}
