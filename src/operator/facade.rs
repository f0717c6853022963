//! The HTTP API's executor in Kubernetes mode: a build is a BuildJob (no secrets) plus a
//! Secret it owns (the credentials); a `data:` archive goes to storage first. A new build
//! whose number another build's BuildJob holds replaces it. Stop marks BuildJobs
//! cancelled; logs come from the running pod, or from storage once finished.

use super::crd::{job_name, secret_keys, BuildJob, BuildJobSpec, Phase, SourceKind, SourceRef};
use super::pod::WORKER_CONTAINER;
use crate::build::BuildSpec;
use crate::config::Limits;
use crate::executor::LogStream;
use crate::executor::{BuildSelector, Executor, ExecutorError};
use crate::pipeline::sources::{self, Source};
use crate::storage::{Object, Storage};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{
    DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, Preconditions,
};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone)]
pub struct KubeExecutor {
    client: Client,
    namespace: String,
    storage: Arc<dyn Storage>,
    /// EXTRA_DOCKER_REGISTRY_CONFIG as given (passwords): copied into each build's Secret.
    extra_registries: Option<String>,
    limits: Limits,
    scratch: PathBuf,
    /// Set by this replica's controller while it leads and cannot watch BuildJobs or pods.
    pub watch_failing: Arc<std::sync::atomic::AtomicBool>,
    /// INSTANCE_NAME: labels the BuildJobs this installation creates, and scopes stop-all.
    instance: Option<String>,
    /// Shared with this process's controller: a BuildJob created here is decided from the
    /// watch's copy, its Secret not read again (`controller::OwnWrites`).
    own: Option<Arc<super::controller::OwnWrites>>,
    /// REPLACE_WAIT (tests shorten it).
    replace_wait: std::time::Duration,
    /// Whether the installed CRD declares what this version writes (no build is written
    /// to one that would drop part of it).
    crd: super::crd_check::CrdCheck,
}

fn unavailable(what: &str) -> impl FnOnce(kube::Error) -> ExecutorError + '_ {
    move |e| {
        tracing::error!(error = %e, "Kubernetes API: {what}");
        ExecutorError::Unavailable(format!("the Kubernetes API failed while {what}"))
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl KubeExecutor {
    /// Deletes a BuildJob this request just created and cannot complete (its finalizer
    /// first: nothing is owed for a build that was never accepted). Best effort: logged.
    async fn remove_unfinished(&self, jobs: &Api<BuildJob>, name: &str) {
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        let removed = async {
            jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            jobs.delete(name, &Default::default()).await.map(|_| ())
        };
        if let Err(e) = removed.await {
            tracing::error!(job = %name, error = %e, "could not remove a BuildJob whose credentials Secret was not created; delete it by hand");
        }
    }

    pub fn new(
        client: Client,
        namespace: impl Into<String>,
        storage: Arc<dyn Storage>,
        extra_registries: Option<String>,
        limits: Limits,
        scratch: PathBuf,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            storage,
            extra_registries,
            limits,
            scratch,
            watch_failing: Arc::default(),
            instance: None,
            own: None,
            replace_wait: REPLACE_WAIT,
            crd: super::crd_check::CrdCheck::off(),
        }
    }

    /// Refuses builds (and fails `/octhc`) while `check` finds the installed CRD stale.
    pub fn with_crd_check(mut self, check: super::crd_check::CrdCheck) -> Self {
        self.crd = check;
        self
    }

    /// Tells this process's controller what the facade wrote.
    pub fn with_own_writes(mut self, own: Arc<super::controller::OwnWrites>) -> Self {
        self.own = Some(own);
        self
    }

    /// Scopes this facade to one installation (INSTANCE_NAME).
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        self.instance = instance;
        self
    }

    fn jobs(&self) -> Api<BuildJob> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Where the sources are, for the CR: `data:` archives are stored now.
    async fn source_ref(&self, spec: &BuildSpec) -> Result<SourceRef, ExecutorError> {
        if spec.sources_stored {
            let key = spec.source_key();
            return Ok(SourceRef {
                kind: SourceKind::Stored,
                display: format!("stored as {key}"),
                storage_key: Some(key),
            });
        }
        Ok(match sources::parse(spec.sources.expose()) {
            Ok(Source::Data(b64)) => {
                tokio::fs::create_dir_all(&self.scratch)
                    .await
                    .map_err(|e| ExecutorError::Unavailable(format!("scratch folder: {e}")))?;
                let tmp = tempfile::NamedTempFile::new_in(&self.scratch)
                    .map_err(|e| ExecutorError::Unavailable(format!("scratch file: {e}")))?;
                let key = spec.source_key();
                match sources::write_data(&b64, tmp.path(), &self.limits).await {
                    Ok(_) => {
                        self.storage.put_file(&key, tmp.path()).await.map_err(|e| {
                            tracing::error!(error = %e, "storing a data: archive");
                            ExecutorError::Unavailable("the sources could not be stored".into())
                        })?;
                        SourceRef {
                            kind: SourceKind::Stored,
                            display: format!("stored as {key}"),
                            storage_key: Some(key),
                        }
                    }
                    // Not decodable: the worker reports it (InvalidSources), as local mode does.
                    Err(_) => SourceRef {
                        kind: SourceKind::Http,
                        display: "data: URI (not decodable)".into(),
                        storage_key: None,
                    },
                }
            }
            Ok(Source::Docker(d)) => SourceRef {
                kind: SourceKind::Docker,
                display: format!("docker://{}", d.image),
                storage_key: None,
            },
            Ok(Source::Http(url)) => SourceRef {
                kind: SourceKind::Http,
                display: display_url(&url),
                storage_key: None,
            },
            Err(_) => SourceRef {
                kind: SourceKind::Http,
                display: "(unsupported source URI)".into(),
                storage_key: None,
            },
        })
    }

    fn secret_for(
        &self,
        spec: &BuildSpec,
        job: &BuildJob,
        source: &SourceRef,
    ) -> Option<KubeSecret> {
        let owner = job.controller_owner_ref(&())?;
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        if source.kind != SourceKind::Stored {
            put(secret_keys::SOURCES, spec.sources.expose());
        }
        if let Some(a) = &spec.gm_registry_auth {
            put(secret_keys::GM_REGISTRY_USERNAME, &a.username);
            put(secret_keys::GM_REGISTRY_PASSWORD, a.password.expose());
        }
        if let Some(p) = &spec.docker_password {
            put(secret_keys::DOCKER_PASSWORD, p.expose());
        }
        if let Some(c) = &spec.callback_auth {
            put(secret_keys::CALLBACK_AUTH, c.expose());
        }
        if !spec.build_args.is_empty() {
            put(
                secret_keys::BUILD_ARGS,
                &serde_json::to_string(&spec.build_args).ok()?,
            );
        }
        if let Some(x) = self
            .extra_registries
            .as_deref()
            .filter(|x| !x.trim().is_empty())
        {
            put(secret_keys::EXTRA_REGISTRIES, x);
        }
        Some(KubeSecret {
            metadata: ObjectMeta {
                name: Some(job.spec.credentials_secret.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(job.spec.labels()),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        })
    }

    /// Deletes `other`, the BuildJob of another build holding this build number (unless it
    /// is going already), as `kubectl delete` would: a running build is stopped by the
    /// controller and reports `failed`; a finished one goes as soon as its callbacks are
    /// sent. Only that very object (uid precondition): one made since is looked at again.
    async fn replace(
        &self,
        jobs: &Api<BuildJob>,
        other: &BuildJob,
        build_uuid: &str,
    ) -> Result<(), ExecutorError> {
        if other.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let name = other.name_any();
        let finished = other
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_finished);
        tracing::info!(job = %name, build = %build_uuid, replaced = %other.spec.build_uuid, finished, "a new build has this build number: removing the BuildJob of the earlier one");
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: other.uid(),
            resource_version: None,
        });
        match jobs.delete(&name, &params).await {
            Ok(_) => Ok(()),
            // Gone already, or replaced by another object meanwhile: the next read tells.
            Err(e) if is_code(&e, 404) || is_code(&e, 409) => Ok(()),
            Err(e) => Err(unavailable(
                "removing the BuildJob of an earlier build with this number",
            )(e)),
        }
    }

    /// Creates the BuildJob's credentials Secret. One of that name that this BuildJob does
    /// not own (an earlier BuildJob's, not yet garbage-collected) is deleted and made again:
    /// this build must never run with another build's sources or credentials.
    async fn create_secret(
        &self,
        secret: &KubeSecret,
        job: &BuildJob,
    ) -> Result<(), ExecutorError> {
        let secrets: Api<KubeSecret> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = secret.name_any();
        for _ in 0..SECRET_ATTEMPTS {
            match secrets.create(&PostParams::default(), secret).await {
                Ok(_) => {
                    if let Some(own) = &self.own {
                        own.secret_known(job, super::controller::callback_auth(Some(secret)));
                    }
                    return Ok(());
                }
                Err(e) if is_code(&e, 409) => {}
                Err(e) => return Err(unavailable("creating the credentials Secret")(e)),
            }
            let there = secrets
                .get_opt(&name)
                .await
                .map_err(unavailable("reading the credentials Secret"))?;
            let Some(there) = there else {
                continue; // gone meanwhile: create it again
            };
            if owned_by(&there, job) {
                return Ok(()); // a repeated POST: this build's own
            }
            tracing::warn!(secret = %name, job = %job.name_any(), "a credentials Secret of an earlier BuildJob with this name is in the way; replacing it");
            let params = DeleteParams::background().preconditions(Preconditions {
                uid: there.uid(),
                resource_version: None,
            });
            match secrets.delete(&name, &params).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) || is_code(&e, 409) => {}
                Err(e) => {
                    return Err(unavailable(
                        "deleting a credentials Secret an earlier BuildJob left",
                    )(e))
                }
            }
        }
        tracing::error!(secret = %name, job = %job.name_any(), "a credentials Secret of another BuildJob is still in the way after {SECRET_ATTEMPTS} attempts; delete it by hand");
        Err(ExecutorError::Unavailable(format!(
            "the credentials Secret {name} belongs to another BuildJob and could not be replaced"
        )))
    }

    async fn cancel(&self, name: &str) -> Result<bool, ExecutorError> {
        let patch = serde_json::json!({"spec": {"cancelled": true}});
        match self
            .jobs()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(j) => Ok(!j
                .status
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_finished)),
            Err(e) if is_code(&e, 404) => Ok(false),
            Err(e) => Err(unavailable("stopping a build")(e)),
        }
    }
}

/// Whether `secret` is owned by `job` (by uid: a BuildJob of the same name before it has
/// another).
fn owned_by(secret: &KubeSecret, job: &BuildJob) -> bool {
    let uid = job.uid();
    uid.is_some()
        && secret
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
}

/// How long a POST waits for the BuildJob of an earlier build with its number to go (a
/// running one is stopped first, and its `failed` callback sent).
pub const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// How often it looks meanwhile.
const REPLACE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Tries at replacing a credentials Secret another BuildJob left.
const SECRET_ATTEMPTS: u32 = 3;

/// How often a follower looks at a BuildJob that has no running pod yet (one GET).
const FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

type Lines = futures::stream::BoxStream<'static, std::io::Result<String>>;

/// One reader of a build's log as it grows.
struct Follower {
    exec: KubeExecutor,
    name: String,
    app: String,
    app_uuid: String,
    build_number: u64,
    prefix: String,
    /// The pod whose log is (or was last) streamed, and how many build lines of it were sent.
    pod: Option<String>,
    sent: usize,
    lines: Option<Lines>,
    /// The worker container of `pod` has stopped: its log will not grow, wait for the
    /// stored log.
    pod_done: bool,
    /// The build has ended: the rest of its stored log, then the end.
    rest: Option<LogStream>,
    ended: bool,
}

impl Follower {
    fn stream(mut self) -> LogStream {
        self.prefix = format!("[{}-{}] ", self.app, self.build_number);
        futures::stream::unfold(self, |mut f| async move {
            let chunk = f.next_chunk().await?;
            Some((Ok(chunk), f))
        })
        .boxed()
    }

    /// Switches to the stored log from the first line not yet sent, then the end.
    async fn end_with_stored_log(&mut self) {
        self.ended = true;
        let skip = if self.pod.is_some() { self.sent } else { 0 };
        let key = crate::build::log_key(&self.app, &self.app_uuid, self.build_number);
        self.rest = stored_after(&self.exec.storage, &key, skip).await;
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.ended {
                return match self.rest.as_mut()?.next().await {
                    Some(Ok(chunk)) => Some(chunk),
                    _ => None,
                };
            }
            if let Some(lines) = self.lines.as_mut() {
                match lines.next().await {
                    Some(Ok(line)) => {
                        if let Some(rest) = line.strip_prefix(&self.prefix) {
                            self.sent += 1;
                            let mut b = Vec::with_capacity(rest.len() + 1);
                            b.extend_from_slice(rest.as_bytes());
                            b.push(b'\n');
                            return Some(Bytes::from(b));
                        }
                        continue;
                    }
                    // The container stopped, or the API server or kubelet cut the stream
                    // (a restart, an idle timeout): the log is re-opened unless the pod
                    // says its worker has stopped. The kubelet records a stop a moment after
                    // the log ends, so the pod is read after a pause.
                    _ => {
                        self.lines = None;
                        tokio::time::sleep(FOLLOW_WAIT).await;
                        let pod = self.pod.clone().unwrap_or_default();
                        self.pod_done = worker_stopped(&self.exec, &pod).await.unwrap_or(false);
                        continue;
                    }
                }
            }
            let job = match self.exec.jobs().get_opt(&self.name).await {
                Ok(Some(job)) => Some(job),
                // Deleted (and past its finalizer): it will never say it finished.
                Ok(None) => {
                    self.end_with_stored_log().await;
                    continue;
                }
                Err(_) => None,
            };
            let status = job.and_then(|j| j.status).unwrap_or_default();
            match (status.phase, status.pod_name) {
                (Some(p), _) if p.is_finished() => self.end_with_stored_log().await,
                (Some(Phase::Running), Some(pod))
                    if !(self.pod_done && self.pod.as_deref() == Some(&pod)) =>
                {
                    if self.pod.as_deref() != Some(&pod) {
                        self.pod = Some(pod.clone());
                        self.sent = 0;
                        self.pod_done = false;
                    }
                    match open_log(&self.exec, &pod, &self.prefix, self.sent).await {
                        Some(lines) => self.lines = Some(lines),
                        None => tokio::time::sleep(FOLLOW_WAIT).await,
                    }
                }
                _ => tokio::time::sleep(FOLLOW_WAIT).await,
            }
        }
    }
}

/// Whether the worker container of `pod` has stopped (or the pod is gone); `None` when the
/// pod could not be read.
async fn worker_stopped(exec: &KubeExecutor, pod: &str) -> Option<bool> {
    let pods: Api<Pod> = Api::namespaced(exec.client.clone(), &exec.namespace);
    let Some(pod) = pods.get_opt(pod).await.ok()? else {
        return Some(true);
    };
    let status = pod.status.unwrap_or_default();
    let pod_ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let worker_ended = status
        .container_statuses
        .unwrap_or_default()
        .iter()
        .any(|c| {
            c.name == WORKER_CONTAINER && c.state.as_ref().is_some_and(|s| s.terminated.is_some())
        });
    Some(pod_ended || worker_ended)
}

/// One `follow=true` log request for the worker container, skipping the build lines
/// already sent (a reconnect to the same pod).
async fn open_log(exec: &KubeExecutor, pod: &str, prefix: &str, sent: usize) -> Option<Lines> {
    let pods: Api<Pod> = Api::namespaced(exec.client.clone(), &exec.namespace);
    let params = LogParams {
        container: Some(WORKER_CONTAINER.into()),
        follow: true,
        ..Default::default()
    };
    let reader = pods.log_stream(pod, &params).await.ok()?;
    let prefix = prefix.to_string();
    let mut skip = sent;
    let lines = reader.lines().try_filter(move |line| {
        let keep = if skip > 0 && line.starts_with(&prefix) {
            skip -= 1;
            false
        } else {
            true
        };
        futures::future::ready(keep)
    });
    Some(lines.boxed())
}

/// The stored log past its first `skip` lines, streamed (a log may be 100 MiB).
async fn stored_after(storage: &Arc<dyn Storage>, key: &str, skip: usize) -> Option<LogStream> {
    let obj = storage.get(key).await.ok()??;
    let mut left = skip;
    let body = obj.body.filter_map(move |chunk| {
        let out = match chunk {
            Ok(mut c) => {
                while left > 0 && !c.is_empty() {
                    match c.iter().position(|b| *b == b'\n') {
                        Some(i) => {
                            let _ = c.split_to(i + 1);
                            left -= 1;
                        }
                        None => c = Bytes::new(),
                    }
                }
                (!c.is_empty()).then_some(Ok(c))
            }
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    });
    Some(body.boxed())
}

/// A URL for people: scheme, host and path; no userinfo, no query (tokens live there).
fn display_url(url: &reqwest::Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    )
}

/// Only the build's own lines of a worker pod's log (the worker prints them as
/// `[{app}-{n}] line`), without that prefix.
pub fn build_lines(pod_log: &str, app: &str, build_number: u64) -> String {
    let prefix = format!("[{app}-{build_number}] ");
    let mut out = String::new();
    for line in pod_log.lines() {
        if let Some(rest) = line.strip_prefix(&prefix) {
            out.push_str(rest);
            out.push('\n');
        }
    }
    out
}

fn bytes_object(bytes: Vec<u8>, offset: u64) -> Object {
    use futures::StreamExt;
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let rest = Bytes::from(bytes).slice(start..);
    Object {
        len: Some(rest.len() as u64),
        body: futures::stream::once(async move { Ok(rest) }).boxed(),
    }
}

#[async_trait]
impl Executor for KubeExecutor {
    async fn submit(&self, spec: BuildSpec) -> Result<(), ExecutorError> {
        // A CRD older than this version would drop part of the BuildJob.
        if let Some(why) = self.crd.refusal_after_first_check().await {
            return Err(ExecutorError::NotReady(why));
        }
        let name = job_name(&spec.app, &spec.app_uuid, spec.build_number);
        let jobs = self.jobs();
        let build_uuid = spec.build_uuid.to_string();
        // The BuildJob's name holds the app and the build number, not the build_uuid, and
        // controller-api numbers builds anew after one is deleted: a BuildJob of another
        // build with this number (kept for its TTL, or still running) gives way to the new
        // one, as the legacy shuttle removed the old build's container. It is deleted (a
        // running one is stopped and reports `failed`); this request waits for it to go.
        let give_up = tokio::time::Instant::now() + self.replace_wait;
        let mut source = None;
        let (job, source, created) = loop {
            // A repeated POST finds its BuildJob and stores nothing again.
            let existing = jobs
                .get_opt(&name)
                .await
                .map_err(unavailable("reading a BuildJob"))?;
            match existing {
                Some(j) if j.spec.build_uuid == build_uuid => {
                    let source = j.spec.source.clone();
                    break (j, source, false);
                }
                Some(other) => {
                    self.replace(&jobs, &other, &build_uuid).await?;
                    if tokio::time::Instant::now() >= give_up {
                        tracing::warn!(job = %name, build = %build_uuid, held_by = %other.spec.build_uuid, "the BuildJob of an earlier build with this number did not go in time");
                        return Err(ExecutorError::Unavailable(format!(
                            "build number {} of this app is still held by build {} (being removed); try again shortly",
                            spec.build_number, other.spec.build_uuid
                        )));
                    }
                    tokio::time::sleep(REPLACE_POLL).await;
                }
                None => {
                    let source = match &source {
                        Some(s) => SourceRef::clone(s),
                        None => source.insert(self.source_ref(&spec).await?).clone(),
                    };
                    let mut job =
                        BuildJob::new(&name, BuildJobSpec::from_build(&spec, source.clone()));
                    job.metadata.namespace = Some(self.namespace.clone());
                    let mut labels = job.spec.labels();
                    if let Some(i) = &self.instance {
                        labels.insert(super::crd::labels::INSTANCE.into(), i.clone());
                    }
                    job.metadata.labels = Some(labels);
                    // Held until the final callback is sent, so deleting a running BuildJob
                    // still tells controller-api.
                    job.metadata.finalizers = Some(vec![super::crd::FINALIZER.to_string()]);
                    match jobs.create(&PostParams::default(), &job).await {
                        Ok(j) => {
                            if let Some(own) = &self.own {
                                own.wrote(&j);
                            }
                            break (j, source, true);
                        }
                        // Created meanwhile (a repeated POST, or another build): look again.
                        Err(e) if is_code(&e, 409) => {
                            if tokio::time::Instant::now() >= give_up {
                                return Err(unavailable("creating a BuildJob")(e));
                            }
                        }
                        Err(e) => return Err(unavailable("creating a BuildJob")(e)),
                    }
                }
            }
        };
        let secret = self.secret_for(&spec, &job, &source).ok_or_else(|| {
            ExecutorError::Unavailable("the API server returned a BuildJob without a uid".into())
        })?;
        if let Err(e) = self.create_secret(&secret, &job).await {
            // The caller hears 503 and will not ask again: a BuildJob left behind would run
            // without its credentials (no source, no registry login, callbacks refused).
            if created {
                self.remove_unfinished(&jobs, &name).await;
            }
            return Err(e);
        }
        tracing::info!(job = %name, build = %spec.build_uuid, "BuildJob accepted");
        Ok(())
    }

    async fn stop(&self, which: BuildSelector) -> Result<usize, ExecutorError> {
        if let Some(n) = which.build_number {
            return Ok(usize::from(
                self.cancel(&job_name(&which.app, &which.app_uuid, n))
                    .await?,
            ));
        }
        let mut selector = format!("app={},app_uuid={}", which.app, which.app_uuid);
        if let Some(s) = super::crd::labels::instance_selector(self.instance.as_deref()) {
            selector = format!("{selector},{s}");
        }
        let list = self
            .jobs()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(unavailable("listing BuildJobs"))?;
        let mut stopped = 0;
        for j in list.items {
            let finished = j
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_finished);
            if !finished && !j.spec.cancelled && self.cancel(&j.name_any()).await? {
                stopped += 1;
            }
        }
        Ok(stopped)
    }

    async fn log(
        &self,
        app: &str,
        app_uuid: &str,
        build_number: u64,
        offset: u64,
    ) -> Result<Option<Object>, ExecutorError> {
        let name = job_name(app, app_uuid, build_number);
        let job = self
            .jobs()
            .get_opt(&name)
            .await
            .map_err(unavailable("reading a BuildJob"))?;
        let status = job
            .as_ref()
            .and_then(|j| j.status.clone())
            .unwrap_or_default();
        let running = status.phase.is_some_and(Phase::holds_slot);
        if let (true, Some(pod)) = (running, status.pod_name.as_deref()) {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
            let params = LogParams {
                container: Some(WORKER_CONTAINER.into()),
                ..Default::default()
            };
            return match pods.logs(pod, &params).await {
                Ok(text) => Ok(Some(bytes_object(
                    build_lines(&text, app, build_number).into_bytes(),
                    offset,
                ))),
                // Not started yet (or already gone): nothing to show so far.
                Err(e) if is_code(&e, 400) || is_code(&e, 404) => {
                    Ok(Some(bytes_object(Vec::new(), offset)))
                }
                Err(e) => Err(unavailable("reading a worker pod's log")(e)),
            };
        }
        let key = crate::build::log_key(app, app_uuid, build_number);
        let stored = self.storage.get_from(&key, offset).await.map_err(|e| {
            tracing::error!(error = %e, "reading a stored log");
            ExecutorError::Unavailable("the log storage failed".into())
        })?;
        Ok(match (stored, job) {
            (Some(obj), _) => Some(obj),
            // Known but nothing written yet (queued), or its log was never stored.
            (None, Some(_)) => Some(bytes_object(Vec::new(), offset)),
            (None, None) => None,
        })
    }

    /// One streaming `pods/log?follow=true` per reader while the pod runs, then the stored
    /// log from the first line the pod's log did not show (the switch is at a line
    /// boundary, so kubelet log rotation can make it neither skip nor repeat a line).
    async fn follow(
        &self,
        app: &str,
        app_uuid: &str,
        build_number: u64,
    ) -> Result<Option<LogStream>, ExecutorError> {
        let name = job_name(app, app_uuid, build_number);
        if self
            .jobs()
            .get_opt(&name)
            .await
            .map_err(unavailable("reading a BuildJob"))?
            .is_none()
        {
            return Ok(None);
        }
        let follower = Follower {
            exec: self.clone(),
            name,
            app: app.to_string(),
            app_uuid: app_uuid.to_string(),
            build_number,
            prefix: String::new(),
            pod: None,
            sent: 0,
            lines: None,
            pod_done: false,
            rest: None,
            ended: false,
        };
        Ok(Some(follower.stream()))
    }

    fn follow_supported(&self) -> bool {
        true
    }

    fn health(&self) -> Result<(), String> {
        if let Some(why) = self.crd.refusal() {
            return Err(why);
        }
        if self
            .watch_failing
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err("the BuildJob controller cannot watch BuildJobs or worker pods".into());
        }
        Ok(())
    }

    async fn is_active(&self, app: &str, app_uuid: &str, build_number: u64) -> bool {
        match self
            .jobs()
            .get_opt(&job_name(app, app_uuid, build_number))
            .await
        {
            Ok(Some(j)) => !j
                .status
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_finished),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::decide::tests::{job, JOB};
    use crate::operator::mock::{self, status_error, Expect};
    use crate::secret::Secret;
    use crate::storage::LocalStorage;
    use base64::Engine;
    use futures::StreamExt;
    use http::Method;
    use serde_json::{json, Value};

    const JOBS: &str = "/apis/buildshuttle.akkeris.io/v1/namespaces/builds/buildjobs";
    const SECRETS: &str = "/api/v1/namespaces/builds/secrets";

    fn limits() -> Limits {
        Limits {
            max_source_bytes: 1 << 20,
            max_context_bytes: 1 << 20,
            max_archive_entries: 100,
        }
    }

    fn executor(client: Client, dir: &std::path::Path) -> (KubeExecutor, Arc<dyn Storage>) {
        let storage: Arc<dyn Storage> =
            Arc::new(LocalStorage::new(dir.join("store")).unwrap_or_else(|e| panic!("{e}")));
        let exec = KubeExecutor::new(
            client,
            "builds",
            storage.clone(),
            Some(r#"{"r.example": {"username": "x", "password": "extra-pw"}}"#.into()),
            limits(),
            dir.join("scratch"),
        );
        (exec, storage)
    }

    /// The BuildJob's GET, answered 404.
    fn no_job_yet() -> Expect {
        Expect::new(
            Method::GET,
            format!("{JOBS}/{JOB}"),
            404,
            Some(status_error(404, "NotFound")),
        )
    }

    fn with_uid(mut v: Value) -> Value {
        v["metadata"]["uid"] = json!("uid-7");
        v
    }

    fn secrets_in(spec: &BuildSpec) -> Vec<String> {
        let mut s: Vec<String> = spec.secrets().into_iter().map(str::to_string).collect();
        s.push("extra-pw".into());
        s
    }

    fn data_spec() -> BuildSpec {
        let mut s = crate::build::tests::spec();
        s.sources = Secret::new(format!(
            "data:base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b"archive-bytes")
        ));
        s.docker_password = Some(Secret::new("dockerpw"));
        s
    }

    async fn read_all(obj: Object) -> String {
        let chunks: Vec<_> = obj.body.collect().await;
        let bytes: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.unwrap_or_default().to_vec())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn submit_stores_data_sources_and_keeps_secrets_out_of_the_buildjob() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let mut spec = data_spec();
        // controller-api passes the app's config vars as build args.
        spec.build_args = [("DATABASE_URL".into(), "postgres://u:s3cr3t@db".into())].into();
        let mut leaks = secrets_in(&spec);
        leaks.push("s3cr3t".into());
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None).check(move |b| {
                let text = b.to_string();
                for s in &leaks {
                    assert!(
                        !text.contains(s.as_str()),
                        "{s} leaked into the BuildJob: {text}"
                    );
                }
                assert!(
                    !text.contains("data:base64"),
                    "the archive is not in the CR"
                );
                assert_eq!(b["metadata"]["name"], JOB);
                assert_eq!(b["metadata"]["labels"]["app"], "myapp");
                assert_eq!(b["spec"]["source"]["kind"], "Stored");
                assert_eq!(
                    b["spec"]["source"]["storageKey"],
                    "6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11"
                );
                assert_eq!(b["spec"]["cancelled"], false);
                assert_eq!(b["spec"]["buildArgs"]["DATABASE_URL"], "", "the name only");
            }),
            Expect::new(Method::POST, SECRETS, 201, None).check(move |b| {
                assert_eq!(b["metadata"]["name"], format!("{JOB}-credentials"));
                assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "uid-7");
                assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "BuildJob");
                let decode = |k: &str| {
                    let v = b["data"][k].as_str().unwrap_or("");
                    String::from_utf8(
                        base64::engine::general_purpose::STANDARD
                            .decode(v)
                            .unwrap_or_default(),
                    )
                    .unwrap_or_default()
                };
                assert_eq!(decode("gm_registry_password"), "regpass");
                assert_eq!(decode("callback_auth"), "cb-token");
                assert_eq!(decode("docker_password"), "dockerpw");
                assert_eq!(
                    decode("build_args"),
                    r#"{"DATABASE_URL":"postgres://u:s3cr3t@db"}"#
                );
                assert!(decode("extra_docker_registry_config").contains("extra-pw"));
                assert!(
                    b["data"].get("sources").is_none(),
                    "stored sources need no URI"
                );
            }),
        ];
        // The API server answers the create with the object and its uid.
        let verifier = mock::verify_with(handle, scenario, with_uid);
        let (exec, storage) = executor(client, dir.path());
        let res = exec.submit(spec.clone()).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert!(res.is_ok(), "{res:?}");
        let stored = storage
            .get(&spec.source_key())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("stored"));
        assert_eq!(read_all(stored).await, "archive-bytes");
    }

    #[tokio::test]
    async fn what_it_creates_is_known_to_this_process_controller() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None),
            Expect::new(Method::POST, SECRETS, 201, None),
        ];
        let created = |v: Value| {
            let mut v = with_uid(v);
            v["metadata"]["resourceVersion"] = json!("5");
            v
        };
        let verifier = mock::verify_with(handle, scenario, created);
        let own = Arc::new(super::super::controller::OwnWrites::default());
        let (exec, _) = executor(client, dir.path());
        let exec = exec.with_own_writes(own.clone());
        let res = exec.submit(data_spec()).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert!(res.is_ok(), "{res:?}");
        let mut job = crate::operator::decide::tests::job(None);
        job.metadata.uid = Some("uid-7".into());
        job.metadata.resource_version = Some("5".into());
        assert!(own.is_last_write(&job), "the creation is our last write");
        let auth = own.known_credentials(&job).flatten();
        assert_eq!(auth.as_ref().map(|a| a.expose()), Some("cb-token"));
        job.metadata.resource_version = Some("6".into());
        assert!(!own.is_last_write(&job), "a later version is not ours");
    }

    #[tokio::test]
    async fn on_a_stale_crd_no_buildjob_is_written_and_the_health_check_says_why() {
        use crate::operator::crd_check::{CrdCheck, CrdState};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        // No API call at all.
        let verifier = mock::verify(handle, vec![]);
        let (exec, _) = executor(client, dir.path());
        let stale = CrdState::Stale(vec!["status.logEnded".into()]);
        let exec = exec.with_crd_check(CrdCheck::fixed(stale));
        let res = exec.submit(data_spec()).await;
        let health = exec.health();
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match res {
            Err(ExecutorError::NotReady(why)) => {
                assert!(why.contains("status.logEnded"), "{why}");
                assert_eq!(health, Err(why));
            }
            other => panic!("refused as not ready: {other:?}"),
        }
    }

    /// `submit(spec)` against a mocked API server that must see exactly `scenario` (echoed
    /// bodies pass through `echo`); what `submit` answered.
    async fn submitted(
        spec: BuildSpec,
        scenario: Vec<Expect>,
        echo: fn(Value) -> Value,
    ) -> Result<(), ExecutorError> {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let verifier = mock::verify_with(handle, scenario, echo);
        let (exec, _) = executor(client, dir.path());
        let res = exec.submit(spec).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        res
    }

    /// The credentials Secret of the BuildJob with uid `owner`, as the API server has it.
    fn secret_owned_by(owner: &str, secret_uid: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": format!("{JOB}-credentials"), "namespace": "builds", "uid": secret_uid,
                            "ownerReferences": [{"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJob",
                                                 "name": JOB, "uid": owner, "controller": true}]},
               "data": {"sources": "b2xkLXNvdXJjZXM="}})
    }

    fn secret_path() -> String {
        format!("{SECRETS}/{JOB}-credentials")
    }

    fn ok_status() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})
    }

    /// The DELETE of the object with uid `uid` (a uid precondition, background propagation).
    fn delete_of(path: String, uid: &'static str) -> Expect {
        Expect::new(Method::DELETE, path, 200, Some(ok_status())).check(move |b| {
            assert_eq!(b["preconditions"]["uid"], uid, "{b}");
            assert_eq!(b["propagationPolicy"], "Background", "{b}");
        })
    }

    #[tokio::test]
    async fn a_repeated_submit_creates_nothing_new() {
        let existing =
            with_uid(serde_json::to_value(job(Some(Phase::Running))).unwrap_or_default());
        let mut spec = crate::build::tests::spec();
        spec.sources = Secret::new("https://user:tok@example.com/a.tgz?sig=abc");
        let scenario = vec![
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(existing)),
            Expect::new(
                Method::POST,
                SECRETS,
                409,
                Some(status_error(409, "AlreadyExists")),
            ),
            // Its own Secret (from the first POST): kept.
            Expect::new(
                Method::GET,
                secret_path(),
                200,
                Some(secret_owned_by("uid-7", "s-1")),
            ),
        ];
        let res = submitted(spec, scenario, |v| v).await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_credentials_secret_an_earlier_buildjob_left_is_replaced_not_used() {
        let mut spec = crate::build::tests::spec();
        spec.sources = Secret::new("https://example.com/new.tgz");
        let mut scenario = vec![no_job_yet(), Expect::new(Method::POST, JOBS, 201, None)];
        scenario.extend(a_stale_secret_in_the_way());
        scenario.extend([Expect::new(Method::POST, SECRETS, 201, None).check(|b| {
            assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "uid-7");
            let v = b["data"]["sources"].as_str().unwrap_or("");
            let uri = base64::engine::general_purpose::STANDARD
                .decode(v)
                .unwrap_or_default();
            assert_eq!(uri, b"https://example.com/new.tgz");
        })]);
        let res = submitted(spec, scenario, with_uid).await;
        assert!(res.is_ok(), "{res:?}");
    }

    /// Creating the Secret meets one a deleted BuildJob of this name left (not yet
    /// garbage-collected): 409, read, deleted by its uid.
    fn a_stale_secret_in_the_way() -> [Expect; 3] {
        [
            Expect::new(
                Method::POST,
                SECRETS,
                409,
                Some(status_error(409, "AlreadyExists")),
            ),
            Expect::new(
                Method::GET,
                secret_path(),
                200,
                Some(secret_owned_by("uid-old", "s-old")),
            ),
            delete_of(secret_path(), "s-old"),
        ]
    }

    #[tokio::test]
    async fn a_credentials_secret_that_stays_in_the_way_fails_the_submit_and_its_buildjob() {
        let mut spec = crate::build::tests::spec();
        spec.sources = Secret::new("https://example.com/new.tgz");
        let mut scenario = vec![no_job_yet(), Expect::new(Method::POST, JOBS, 201, None)];
        for _ in 0..SECRET_ATTEMPTS {
            scenario.extend(a_stale_secret_in_the_way());
        }
        scenario.extend([
            Expect::new(
                Method::PATCH,
                format!("{JOBS}/{JOB}"),
                200,
                Some(with_uid(
                    serde_json::to_value(job(None)).unwrap_or_default(),
                )),
            ),
            Expect::new(Method::DELETE, format!("{JOBS}/{JOB}"), 200, None),
        ]);
        let res = submitted(spec, scenario, with_uid).await;
        let e = res.expect_err("refused").to_string();
        assert!(e.contains("another BuildJob"), "{e}");
    }

    /// A BuildJob of another build (`OTHER`) with this build number, uid `uid-old`.
    fn other_build(phase: Phase, deleting: bool) -> Value {
        let mut other = job(Some(phase));
        other.spec.build_uuid = OTHER.into();
        other.metadata.uid = Some("uid-old".into());
        if deleting {
            other.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    crate::operator::decide::tests::t(0),
                ));
        }
        serde_json::to_value(other).unwrap_or_default()
    }

    const OTHER: &str = "00000000-0000-4000-8000-000000000001";

    #[tokio::test]
    async fn a_finished_build_with_the_same_number_gives_way_to_the_new_one() {
        let scenario = vec![
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(other_build(Phase::Succeeded, false)),
            ),
            delete_of(format!("{JOBS}/{JOB}"), "uid-old"),
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None).check(|b| {
                assert_eq!(
                    b["spec"]["buildUuid"],
                    crate::build::tests::spec().build_uuid.to_string()
                );
            }),
            Expect::new(Method::POST, SECRETS, 201, None),
        ];
        let res = submitted(data_spec(), scenario, with_uid).await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_running_build_with_the_same_number_is_stopped_and_waited_for_then_replaced() {
        let scenario = vec![
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(other_build(Phase::Running, false)),
            ),
            delete_of(format!("{JOBS}/{JOB}"), "uid-old"),
            // The controller stops it and sends its `failed` callback: it is held meanwhile,
            // and not deleted a second time.
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(other_build(Phase::Failed, true)),
            ),
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None),
            Expect::new(Method::POST, SECRETS, 201, None),
        ];
        let res = submitted(data_spec(), scenario, with_uid).await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_build_holding_the_number_that_does_not_go_in_time_is_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let scenario = vec![
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(other_build(Phase::Running, false)),
            ),
            delete_of(format!("{JOBS}/{JOB}"), "uid-old"),
        ];
        let verifier = mock::verify(handle, scenario);
        let (mut exec, _) = executor(client, dir.path());
        exec.replace_wait = std::time::Duration::ZERO;
        let res = exec.submit(crate::build::tests::spec()).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let e = res.expect_err("refused").to_string();
        assert!(e.contains(OTHER), "{e}");
    }

    #[tokio::test]
    async fn a_secret_that_cannot_be_created_takes_the_new_buildjob_with_it() {
        let mut spec = crate::build::tests::spec();
        spec.sources = Secret::new("https://example.com/a.tgz");
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None),
            Expect::new(
                Method::POST,
                SECRETS,
                500,
                Some(status_error(500, "InternalError")),
            ),
            Expect::new(
                Method::PATCH,
                format!("{JOBS}/{JOB}"),
                200,
                Some(with_uid(
                    serde_json::to_value(job(None)).unwrap_or_default(),
                )),
            )
            .check(|b| {
                assert!(b["metadata"]["finalizers"].is_null(), "{b}");
            }),
            Expect::new(Method::DELETE, format!("{JOBS}/{JOB}"), 200, None),
        ];
        let res = submitted(spec, scenario, with_uid).await;
        assert!(res.is_err(), "{res:?}");
    }

    #[tokio::test]
    async fn a_create_race_409_reads_the_winner() {
        let existing = with_uid(serde_json::to_value(job(None)).unwrap_or_default());
        let mut spec = crate::build::tests::spec();
        spec.sources = Secret::new("https://user:tok@example.com/a.tgz?sig=abc");
        let scenario = vec![
            no_job_yet(),
            Expect::new(
                Method::POST,
                JOBS,
                409,
                Some(status_error(409, "AlreadyExists")),
            )
            .check(|b| {
                let text = b.to_string();
                assert!(!text.contains("tok"), "{text}");
                assert_eq!(b["spec"]["source"]["display"], "https://example.com/a.tgz");
            }),
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(existing)),
            Expect::new(Method::POST, SECRETS, 201, None).check(|b| {
                let v = b["data"]["sources"].as_str().unwrap_or("");
                let uri = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_default();
                assert_eq!(uri, b"https://user:tok@example.com/a.tgz?sig=abc");
            }),
        ];
        let res = submitted(spec, scenario, |v| v).await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn stop_by_name_and_by_label_mark_cancelled() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let running = serde_json::to_value(job(Some(Phase::Running))).unwrap_or_default();
        let mut other = job(Some(Phase::Running));
        other.metadata.name = Some("myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-13".into());
        let mut done = job(Some(Phase::Succeeded));
        done.metadata.name = Some("myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-11".into());
        let list = json!({"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJobList", "metadata": {},
                          "items": [serde_json::to_value(&other).unwrap_or_default(), serde_json::to_value(&done).unwrap_or_default()]});
        let cancel_check = |b: &Value| assert_eq!(b, &json!({"spec": {"cancelled": true}}));
        let scenario = vec![
            Expect::new(Method::PATCH, format!("{JOBS}/{JOB}"), 200, Some(running.clone())).check(cancel_check),
            Expect::new(Method::PATCH, format!("{JOBS}/missing-1"), 404, Some(status_error(404, "NotFound"))),
            Expect::new(
                Method::GET,
                format!("{JOBS}?&labelSelector=app%3Dmyapp%2Capp_uuid%3D0b1c2d3e-aaaa-bbbb-cccc-111122223333"),
                200,
                Some(list),
            ),
            Expect::new(Method::PATCH, format!("{JOBS}/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-13"), 200, Some(running))
                .check(cancel_check),
        ];
        let verifier = mock::verify(handle, scenario);
        let (exec, _) = executor(client, dir.path());
        let sel = |n| BuildSelector {
            app: "myapp".into(),
            app_uuid: "0b1c2d3e-aaaa-bbbb-cccc-111122223333".into(),
            build_number: n,
        };
        let one = exec.stop(sel(Some(12))).await;
        let none = exec.cancel("missing-1").await;
        let all = exec.stop(sel(None)).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(one.ok(), Some(1));
        assert_eq!(none.ok(), Some(false));
        assert_eq!(all.ok(), Some(1), "the finished build is left alone");
    }

    #[tokio::test]
    async fn a_follow_ends_when_its_buildjob_is_gone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let queued = serde_json::to_value(job(Some(Phase::Queued))).unwrap_or_default();
        let scenario = vec![
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(queued)),
            // `kubectl delete bj` of a queued build, past its finalizer.
            no_job_yet(),
        ];
        let verifier = mock::verify(handle, scenario);
        let (exec, storage) = executor(client, dir.path());
        let spec = crate::build::tests::spec();
        let src = dir.path().join("log");
        std::fs::write(&src, "Stopped while queued\nBuild finished\n")
            .unwrap_or_else(|e| panic!("{e}"));
        storage
            .put_file(&spec.log_key(), &src)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let stream = exec
            .follow("myapp", &spec.app_uuid, 12)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("a follower"));
        let text = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let chunks: Vec<_> = stream.collect().await;
            chunks
                .into_iter()
                .flat_map(|c| c.unwrap_or_default().to_vec())
                .collect::<Vec<u8>>()
        })
        .await
        .unwrap_or_else(|_| panic!("the follow never ended"));
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(
            String::from_utf8_lossy(&text),
            "Stopped while queued\nBuild finished\n"
        );
    }

    #[tokio::test]
    async fn logs_come_from_the_running_pod_then_from_storage() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let running = serde_json::to_value(job(Some(Phase::Running))).unwrap_or_default();
        let mut finished = job(Some(Phase::Succeeded));
        if let Some(s) = finished.status.as_mut() {
            s.pod_name = Some("gone".into());
        }
        let pod_log =
            "[myapp-12] Step 1/2 : FROM x\nWARN something from the service\n[myapp-12] done\n";
        let scenario = vec![
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(running)),
            Expect::new(
                Method::GET,
                format!("/api/v1/namespaces/builds/pods/{JOB}-worker-0/log?&container=worker"),
                200,
                Some(Value::String(pod_log.into())),
            ),
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(serde_json::to_value(&finished).unwrap_or_default()),
            ),
            no_job_yet(),
        ];
        let verifier = mock::verify(handle, scenario);
        let (exec, storage) = executor(client, dir.path());
        let spec = crate::build::tests::spec();
        let live = exec.log("myapp", &spec.app_uuid, 12, 0).await;
        let src = dir.path().join("log");
        std::fs::write(&src, "stored line\nBuild finished\n").unwrap_or_else(|e| panic!("{e}"));
        storage
            .put_file(&spec.log_key(), &src)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let done = exec.log("myapp", &spec.app_uuid, 12, 7).await;
        // Deleted after its TTL: the stored log still answers.
        let after_ttl = exec.log("myapp", &spec.app_uuid, 12, 0).await;
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let live = live.ok().flatten().unwrap_or_else(|| panic!("live log"));
        assert_eq!(read_all(live).await, "Step 1/2 : FROM x\ndone\n");
        let done = done.ok().flatten().unwrap_or_else(|| panic!("stored log"));
        assert_eq!(read_all(done).await, "line\nBuild finished\n");
        assert!(after_ttl.ok().flatten().is_some());
    }
}
