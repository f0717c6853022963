//! The HTTP API's executor in Kubernetes mode: a build is a BuildJob (no secrets) plus a
//! Secret it owns (the credentials); a `data:` archive goes to storage first. A new build
//! whose number another build's BuildJob holds replaces it. Stop marks BuildJobs
//! cancelled; logs come from the running pod (streamed), or from storage once finished.
//! Every API call a request makes is bounded (API_CALL_TIMEOUT): no request waits for ever
//! on an API server that does not answer.

use super::crd::{
    job_name, secret_keys, BuildJob, BuildJobSpec, Phase, SourceKind, SourceRef, SOURCES_TOO_LARGE,
};
use super::pod::WORKER_CONTAINER;
use crate::build::BuildSpec;
use crate::config::Limits;
use crate::executor::LogStream;
use crate::executor::{BuildSelector, Executor, ExecutorError};
use crate::pipeline::sources::{self, stand_in, Source, SourceError, STAND_IN_MAX};
use crate::storage::{Object, Storage};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
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
    /// API_CALL_TIMEOUT (tests shorten it).
    api_timeout: std::time::Duration,
    /// For followed pod logs, quiet for as long as a build step prints nothing (`client`
    /// has a read timeout; see `super::client`).
    streams: Client,
}

fn unavailable(what: &str) -> impl FnOnce(kube::Error) -> ExecutorError + '_ {
    move |e| {
        tracing::error!(error = %e, "Kubernetes API: {what}");
        ExecutorError::Unavailable(format!("the Kubernetes API failed while {what}"))
    }
}

pub(super) fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// How long one API call of a request (or one read of a pod log it streams) may take in
/// all: the `calls` client's read timeout catches a silent connection, this also a trickle.
use super::client::API_CALL_TIMEOUT;

/// An API call that got no answer in time, as the client's own errors are (so each caller
/// treats it as the API failing: 503).
fn timed_out(after: std::time::Duration) -> kube::Error {
    kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the Kubernetes API did not answer within {} s",
            after.as_secs_f32()
        ),
    )))
}

impl KubeExecutor {
    /// Deletes a BuildJob this request just created and cannot complete (its finalizer
    /// first: nothing is owed for a build that was never accepted). Best effort: logged.
    async fn remove_unfinished(&self, jobs: &Api<BuildJob>, job: &BuildJob) {
        let name = &job.name_any();
        // Only this one (a uid in the patch is checked against the object's, a precondition
        // on the delete), never a BuildJob of its name another request made since.
        let patch = serde_json::json!({"metadata": {"finalizers": null, "uid": job.metadata.uid}});
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: job.metadata.uid.clone(),
            resource_version: None,
        });
        let removed = async {
            self.bounded(jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await?;
            self.bounded(jobs.delete(name, &params)).await.map(|_| ())
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
            client: client.clone(),
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
            api_timeout: API_CALL_TIMEOUT,
            streams: client.clone(),
        }
    }

    /// One API call, bounded by `api_timeout` (see API_CALL_TIMEOUT).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        match tokio::time::timeout(self.api_timeout, call).await {
            Ok(answered) => answered,
            Err(_) => Err(timed_out(self.api_timeout)),
        }
    }

    /// The client for followed pod logs (`Clients::streams`); `new`'s client until then.
    pub fn with_streams(mut self, streams: Client) -> Self {
        self.streams = streams;
        self
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

    /// Where the sources are, for the CR, and what the credentials Secret holds of them:
    /// `data:` archives are stored now.
    async fn source_ref(&self, spec: &BuildSpec) -> Result<Sources, ExecutorError> {
        if spec.sources_stored {
            return Ok(Sources::stored(spec));
        }
        let uri = spec.sources.expose();
        let full = |reference| Sources {
            reference,
            secret: Some(uri.to_string()),
        };
        if let Some(b64) = sources::data_payload(uri) {
            return match self.decode(b64).await? {
                Ok(tmp) => {
                    let key = spec.source_key();
                    // A hung S3 answers 503 in time, as in local mode, rather than holding
                    // the request for the S3 client's 5 attempts.
                    let len = tmp.as_file().metadata().map_or(0, |m| m.len());
                    let stored =
                        crate::pipeline::store_staged(self.storage.as_ref(), &key, tmp.path(), len);
                    match stored.await {
                        Ok(()) => {}
                        Err(e @ crate::pipeline::StageError::Store(_)) => {
                            tracing::error!(error = %e, "storing a data: archive");
                            return Err(ExecutorError::Unavailable(
                                "the sources could not be stored".into(),
                            ));
                        }
                        Err(e @ crate::pipeline::StageError::TimedOut(_)) => {
                            tracing::error!(error = %e, "storing a data: archive");
                            return Err(ExecutorError::NotReady(
                                "storage did not take the build's sources in time; try again later.".into(),
                            ));
                        }
                    }
                    Ok(Sources::stored(spec))
                }
                // Not decodable: the worker's pipeline fails it, as local mode's does, from
                // a stand-in of the URI (which may be far larger than a Secret can hold).
                Err(e) => Ok(Sources {
                    reference: SourceRef {
                        kind: SourceKind::Http,
                        display: "data: URI (not decodable)".into(),
                        storage_key: None,
                    },
                    secret: Some(stand_in(uri, b64, &e)),
                }),
            };
        }
        Ok(match sources::parse(uri) {
            Ok(Source::Docker(d)) => full(SourceRef {
                kind: SourceKind::Docker,
                display: format!("docker://{}", d.image),
                storage_key: None,
            }),
            Ok(Source::Http(url)) => full(SourceRef {
                kind: SourceKind::Http,
                display: crate::secret::redact_url(url.as_str()),
                storage_key: None,
            }),
            Ok(Source::Data(_)) | Err(_) => full(SourceRef {
                kind: SourceKind::Http,
                display: "(unsupported source URI)".into(),
                storage_key: None,
            }),
        })
    }

    /// What the credentials Secret holds of the sources of a BuildJob made earlier (a
    /// repeated POST): as `source_ref` made it.
    async fn secret_sources(
        &self,
        spec: &BuildSpec,
        reference: &SourceRef,
    ) -> Result<Option<String>, ExecutorError> {
        if reference.kind == SourceKind::Stored {
            return Ok(None);
        }
        let uri = spec.sources.expose();
        let Some(b64) = sources::data_payload(uri).filter(|_| uri.len() > STAND_IN_MAX) else {
            return Ok(Some(uri.to_string()));
        };
        Ok(Some(match self.decode(b64).await? {
            Err(e) => stand_in(uri, b64, &e),
            // Decodable here (another replica's MAX_SOURCE_BYTES?): the worker sees it as
            // too large, as the replica that accepted it did.
            Ok(_) => SOURCES_TOO_LARGE.to_string(),
        }))
    }

    /// Decodes a `data:` payload into a scratch file: the file, or why the payload cannot be
    /// decoded. A failure of this replica's own (its disk) is an error: try again.
    async fn decode(
        &self,
        b64: &str,
    ) -> Result<Result<tempfile::NamedTempFile, sources::SourceError>, ExecutorError> {
        tokio::fs::create_dir_all(&self.scratch)
            .await
            .map_err(|e| ExecutorError::Unavailable(format!("scratch folder: {e}")))?;
        let tmp = tempfile::NamedTempFile::new_in(&self.scratch)
            .map_err(|e| ExecutorError::Unavailable(format!("scratch file: {e}")))?;
        match sources::write_data(b64, tmp.path(), &self.limits).await {
            Ok(_) => Ok(Ok(tmp)),
            Err(e @ (SourceError::BadBase64(_) | SourceError::TooLarge { .. })) => Ok(Err(e)),
            Err(e) => {
                tracing::error!(error = %e, "decoding a data: archive into the scratch folder");
                Err(ExecutorError::Unavailable(
                    "the sources could not be decoded here".into(),
                ))
            }
        }
    }

    fn secret_for(
        &self,
        spec: &BuildSpec,
        job: &BuildJob,
        sources: Option<&str>,
    ) -> Option<KubeSecret> {
        let owner = job.controller_owner_ref(&())?;
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        if let Some(s) = sources {
            put(secret_keys::SOURCES, s);
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
        if let Some(url) = spec.callback.as_deref() {
            if job.spec.callback.as_deref() != Some(url) {
                put(secret_keys::CALLBACK, url);
            }
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
        match self.bounded(jobs.delete(&name, &params)).await {
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
            match self
                .bounded(secrets.create(&PostParams::default(), secret))
                .await
            {
                Ok(_) => {
                    if let Some(own) = &self.own {
                        own.secret_known(job, super::controller::callback_secrets(Some(secret)));
                    }
                    return Ok(());
                }
                Err(e) if is_code(&e, 409) => {}
                Err(e) => return Err(unavailable("creating the credentials Secret")(e)),
            }
            let there = self
                .bounded(secrets.get_opt(&name))
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
            match self.bounded(secrets.delete(&name, &params)).await {
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
        let jobs = self.jobs();
        match self
            .bounded(jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
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

/// Where a build's sources are (the BuildJob's part) and what its credentials Secret holds
/// of them (none for stored sources).
#[derive(Clone, Debug)]
struct Sources {
    reference: SourceRef,
    secret: Option<String>,
}

impl Sources {
    fn stored(spec: &BuildSpec) -> Self {
        let key = spec.source_key();
        Sources {
            reference: SourceRef {
                kind: SourceKind::Stored,
                display: format!("stored as {key}"),
                storage_key: Some(key),
            },
            secret: None,
        }
    }
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

/// A worker pod's log through a `LineFilter`: pieces of the build's lines, each with how
/// many build lines it ends.
pub(super) type Pieces = futures::stream::BoxStream<'static, std::io::Result<(Bytes, usize)>>;

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
    lines: Option<Pieces>,
    /// The worker container of `pod` has stopped: its log will not grow, wait for the
    /// stored log.
    pod_done: bool,
    /// The build has ended: the rest of its stored log, then the end.
    rest: Option<LogStream>,
    ended: bool,
}

impl Follower {
    fn stream(mut self) -> LogStream {
        self.prefix = build_prefix(&self.app, self.build_number);
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

    /// Ends with the rest of the ended worker's log in `pod` (once read, not followed),
    /// from the first line not yet sent.
    async fn end_with_pod_log(&mut self, pod: String) {
        self.ended = true;
        let skip = if self.pod.as_deref() == Some(&pod) {
            self.sent
        } else {
            0
        };
        let pods: Api<Pod> = Api::namespaced(self.exec.client.clone(), &self.exec.namespace);
        let params = super::pod::worker_log(false);
        let Ok(reader) = self.exec.bounded(pods.log_stream(&pod, &params)).await else {
            return;
        };
        let filter = LineFilter::new(&self.prefix, skip, true);
        let pieces = filtered(reader, filter, Some(self.exec.api_timeout));
        self.rest = Some(pieces.map(|p| p.map(|(chunk, _)| chunk)).boxed());
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
                // A build step may print nothing for minutes, so a quiet stream is not cut;
                // one that went quiet for good (an API server or proxy that stopped
                // answering mid-stream) is told apart by the pod: a stopped worker's log
                // does not grow, and the rest comes from the stored log.
                match tokio::time::timeout(self.exec.api_timeout, lines.next()).await {
                    Ok(Some(Ok((chunk, ended)))) => {
                        self.sent += ended;
                        return Some(chunk);
                    }
                    Err(_) => {
                        let pod = self.pod.clone().unwrap_or_default();
                        if worker_stopped(&self.exec, &pod).await == Some(true) {
                            self.lines = None;
                            self.pod_done = true;
                        }
                        continue;
                    }
                    // The container stopped, or the API server or kubelet cut the stream
                    // (a restart, an idle timeout): the log is re-opened unless the pod
                    // says its worker has stopped. The kubelet records a stop a moment after
                    // the log ends, so the pod is read after a pause.
                    Ok(_) => {
                        self.lines = None;
                        tokio::time::sleep(FOLLOW_WAIT).await;
                        let pod = self.pod.clone().unwrap_or_default();
                        self.pod_done = worker_stopped(&self.exec, &pod).await.unwrap_or(false);
                        continue;
                    }
                }
            }
            let jobs = self.exec.jobs();
            let job = match self.exec.bounded(jobs.get_opt(&self.name)).await {
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
                // The worker's log still to be copied into storage: the rest from its pod,
                // whose log no longer grows.
                (Some(p), Some(pod)) if p.is_finished() && status.log_copied == Some(false) => {
                    self.end_with_pod_log(pod).await
                }
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
    let Some(pod) = exec.bounded(pods.get_opt(pod)).await.ok()? else {
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
/// already sent (a reconnect to the same pod). Only whole lines come out of it (`sent`
/// counts lines), and opening it is bounded; reading is bounded by the follower.
async fn open_log(exec: &KubeExecutor, pod: &str, prefix: &str, sent: usize) -> Option<Pieces> {
    let pods: Api<Pod> = Api::namespaced(exec.streams.clone(), &exec.namespace);
    let params = super::pod::worker_log(true);
    let reader = exec.bounded(pods.log_stream(pod, &params)).await.ok()?;
    Some(filtered(reader, LineFilter::new(prefix, sent, true), None))
}

/// Where a filtered pod log is in the line it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// At a line's start, or within its first bytes while too few to tell whether it is a
    /// build line.
    Start,
    /// In a build line being given out.
    Keep,
    /// In a line left out.
    Drop,
}

/// Picks a build's own lines out of its worker pod's log as it streams: the lines that
/// start with `[{app}-{n}] ` (the worker prints its build's lines so), without that
/// prefix, each ended by `\n`. Byte for byte what `str::lines` and `strip_prefix` make of
/// the whole log (a `\r` before `\n` dropped, a last line without `\n` given one), for any
/// bytes (not only UTF-8), holding no more than the prefix, however long a line or a log.
pub(super) struct LineFilter {
    prefix: Vec<u8>,
    /// The current line's first bytes, while `At::Start`.
    head: Vec<u8>,
    at: At,
    /// A `\r` held back from the output: dropped if `\n` follows.
    cr: bool,
    /// Build lines still to leave out (those a follower sent before it re-opened the log).
    skip: usize,
    /// `Some`: whole lines only, the current one held here until its `\n` (a follower
    /// counts what it sent in lines); a last line without `\n` is left out (the stored log
    /// has it whole).
    line: Option<Vec<u8>>,
    /// Build lines given out since `take_ended`.
    ended: usize,
}

impl LineFilter {
    pub(super) fn new(prefix: &str, skip: usize, whole_lines: bool) -> Self {
        Self {
            prefix: prefix.as_bytes().to_vec(),
            head: Vec::with_capacity(prefix.len()),
            at: At::Start,
            cr: false,
            skip,
            line: whole_lines.then(Vec::new),
            ended: 0,
        }
    }

    fn put(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        match &mut self.line {
            Some(line) => line.extend_from_slice(bytes),
            None => out.extend_from_slice(bytes),
        }
    }

    /// A build line given out ends.
    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.put(out, b"\n");
        if let Some(line) = &mut self.line {
            out.append(line);
        }
        self.ended += 1;
        self.at = At::Start;
    }

    /// Filters the next bytes of the log into `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            let nl = input.iter().position(|b| *b == b'\n');
            match self.at {
                At::Start => {
                    let want = self.prefix.len() - self.head.len();
                    let take = want.min(nl.unwrap_or(input.len()));
                    self.head.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.head.len() == self.prefix.len() {
                        let build_line = self.head == self.prefix;
                        self.head.clear();
                        self.at = if !build_line {
                            At::Drop
                        } else if self.skip > 0 {
                            self.skip -= 1;
                            At::Drop
                        } else {
                            At::Keep
                        };
                    } else if !input.is_empty() {
                        // A `\n` before the prefix could be whole: not a build line.
                        self.head.clear();
                        input = &input[1..];
                    }
                }
                At::Keep => {
                    let seg = &input[..nl.unwrap_or(input.len())];
                    if let Some((last, body)) = seg.split_last() {
                        if std::mem::take(&mut self.cr) {
                            self.put(out, b"\r");
                        }
                        if *last == b'\r' {
                            self.put(out, body);
                            self.cr = true;
                        } else {
                            self.put(out, seg);
                        }
                    }
                    match nl {
                        Some(i) => {
                            self.cr = false;
                            self.end_line(out);
                            input = &input[i + 1..];
                        }
                        None => input = &[],
                    }
                }
                At::Drop => match nl {
                    Some(i) => {
                        self.at = At::Start;
                        input = &input[i + 1..];
                    }
                    None => input = &[],
                },
            }
        }
    }

    /// The log has ended: a build line without its `\n` gets one (unless whole lines only).
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.at == At::Keep {
            match &mut self.line {
                Some(line) => line.clear(),
                None => {
                    if std::mem::take(&mut self.cr) {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    self.ended += 1;
                }
            }
        }
        self.head.clear();
        self.at = At::Start;
    }

    fn take_ended(&mut self) -> usize {
        std::mem::take(&mut self.ended)
    }
}

/// A pod log read through `filter`, piece by piece as it arrives (nothing is held but the
/// piece being read). `read_within`: each read must bring bytes (or the end) in that time.
pub(super) fn filtered<R>(
    reader: R,
    filter: LineFilter,
    read_within: Option<std::time::Duration>,
) -> Pieces
where
    R: futures::AsyncBufRead + Send + 'static,
{
    let reader = Box::pin(reader);
    futures::stream::unfold(Some((reader, filter)), move |state| async move {
        let (mut reader, mut filter) = state?;
        let mut out = Vec::new();
        loop {
            let read = reader.fill_buf();
            let read = match read_within {
                Some(within) => match tokio::time::timeout(within, read).await {
                    Ok(read) => read,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the pod log sent nothing for {} s", within.as_secs_f32()),
                    )),
                },
                None => read.await,
            };
            let n = match read {
                Ok([]) => {
                    filter.finish(&mut out);
                    let ended = filter.take_ended();
                    return (!out.is_empty()).then(|| (Ok((Bytes::from(out), ended)), None));
                }
                Ok(buf) => {
                    filter.feed(buf, &mut out);
                    buf.len()
                }
                Err(e) => return Some((Err(e), None)),
            };
            reader.as_mut().consume(n);
            if !out.is_empty() {
                let ended = filter.take_ended();
                return Some((Ok((Bytes::from(out), ended)), Some((reader, filter))));
            }
        }
    })
    .boxed()
}

/// A filtered pod log from byte `offset` of what it gives out, streamed (its length is not
/// known before its end).
fn from_offset(pieces: Pieces, offset: u64) -> Object {
    let mut skip = offset;
    let body = pieces.filter_map(move |piece| {
        let out = match piece {
            Ok((mut chunk, _)) => {
                let cut = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                skip -= cut as u64;
                let _ = chunk.split_to(cut);
                (!chunk.is_empty()).then_some(Ok(chunk))
            }
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(out)
    });
    Object {
        len: None,
        body: body.boxed(),
    }
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

/// What the worker puts before each line of its build in its pod's log.
pub(super) fn build_prefix(app: &str, build_number: u64) -> String {
    format!("[{app}-{build_number}] ")
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

impl KubeExecutor {
    /// The build's lines in the worker's pod log from byte `offset` of them.
    async fn pod_log(
        &self,
        pod: &str,
        app: &str,
        build_number: u64,
        offset: u64,
    ) -> Result<Option<Object>, ExecutorError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let params = super::pod::worker_log(false);
        // Streamed through the line filter: a log of any size costs a request no more
        // than the piece being read.
        match self.bounded(pods.log_stream(pod, &params)).await {
            Ok(reader) => {
                let filter = LineFilter::new(&build_prefix(app, build_number), 0, false);
                let pieces = filtered(reader, filter, Some(self.api_timeout));
                Ok(Some(from_offset(pieces, offset)))
            }
            // Not started yet (or already gone): nothing to show so far.
            Err(e) if is_code(&e, 400) || is_code(&e, 404) => {
                Ok(Some(bytes_object(Vec::new(), offset)))
            }
            Err(e) => Err(unavailable("reading a worker pod's log")(e)),
        }
    }
}

impl KubeExecutor {
    /// A build's log in storage, past its first `offset` bytes.
    async fn stored_log(
        &self,
        app: &str,
        app_uuid: &str,
        build_number: u64,
        offset: u64,
    ) -> Result<Option<Object>, ExecutorError> {
        let key = crate::build::log_key(app, app_uuid, build_number);
        self.storage.get_from(&key, offset).await.map_err(|e| {
            tracing::error!(error = %e, "reading a stored log");
            ExecutorError::Unavailable("the log storage failed".into())
        })
    }

    /// `submit`'s work: the BuildJob (replacing an earlier build's of this number), then
    /// its credentials Secret.
    async fn accept(&self, spec: BuildSpec) -> Result<(), ExecutorError> {
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
        // A create whose answer never came (a timeout, a connection reset) may have made
        // the BuildJob: the next look finds it, and it is this request's to finish.
        let mut lost_create: Option<kube::Error> = None;
        let (job, source, created) = loop {
            // A repeated POST finds its BuildJob and stores nothing again.
            let existing = self
                .bounded(jobs.get_opt(&name))
                .await
                .map_err(unavailable("reading a BuildJob"))?;
            match existing {
                Some(j) if j.spec.build_uuid == build_uuid => {
                    let secret = self.secret_sources(&spec, &j.spec.source).await?;
                    break (j, secret, lost_create.is_some());
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
                    // Not made after all: the API server did not take it (no second try
                    // here; the request is already one call's bound late).
                    if let Some(e) = lost_create.take() {
                        return Err(unavailable("creating a BuildJob")(e));
                    }
                    let source = match &source {
                        Some(s) => Sources::clone(s),
                        None => source.insert(self.source_ref(&spec).await?).clone(),
                    };
                    let mut job = BuildJob::new(
                        &name,
                        BuildJobSpec::from_build(&spec, source.reference.clone()),
                    );
                    job.metadata.namespace = Some(self.namespace.clone());
                    let mut labels = job.spec.labels();
                    if let Some(i) = &self.instance {
                        labels.insert(super::crd::labels::INSTANCE.into(), i.clone());
                    }
                    job.metadata.labels = Some(labels);
                    // Held until the final callback is sent, so deleting a running BuildJob
                    // still tells controller-api.
                    job.metadata.finalizers = Some(vec![super::crd::FINALIZER.to_string()]);
                    match self
                        .bounded(jobs.create(&PostParams::default(), &job))
                        .await
                    {
                        Ok(j) => {
                            if let Some(own) = &self.own {
                                own.wrote(&j);
                            }
                            break (j, source.secret, true);
                        }
                        // Created meanwhile (a repeated POST, or another build): look again.
                        Err(e) if is_code(&e, 409) => {
                            if tokio::time::Instant::now() >= give_up {
                                return Err(unavailable("creating a BuildJob")(e));
                            }
                        }
                        // Refused: nothing was made.
                        Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                            return Err(unavailable("creating a BuildJob")(kube::Error::Api(s)))
                        }
                        // No answer, or a failure past the point where it may have been
                        // written: look again, once.
                        Err(e) => {
                            tracing::warn!(job = %name, build = %build_uuid, error = %e, "creating a BuildJob got no answer; looking whether it was made");
                            lost_create = Some(e);
                        }
                    }
                }
            }
        };
        let secret = self
            .secret_for(&spec, &job, source.as_deref())
            .ok_or_else(|| {
                ExecutorError::Unavailable(
                    "the API server returned a BuildJob without a uid".into(),
                )
            })?;
        if let Err(e) = self.create_secret(&secret, &job).await {
            // The caller hears 503 and will not ask again: a BuildJob left behind would run
            // without its credentials (no source, no registry login, callbacks refused).
            if created {
                self.remove_unfinished(&jobs, &job).await;
            }
            return Err(e);
        }
        tracing::info!(job = %name, build = %spec.build_uuid, "BuildJob accepted");
        Ok(())
    }
}

#[async_trait]
impl Executor for KubeExecutor {
    async fn submit(&self, spec: BuildSpec) -> Result<(), ExecutorError> {
        // A BuildJob created without its Secret would run without its credentials (no
        // source, no registry login, callbacks refused).
        let this = self.clone();
        crate::executor::accept_to_the_end(spec.build_uuid, async move { this.accept(spec).await })
            .await
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
        let jobs = self.jobs();
        let list = self
            .bounded(jobs.list(&ListParams::default().labels(&selector)))
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
        let jobs = self.jobs();
        let job = self
            .bounded(jobs.get_opt(&name))
            .await
            .map_err(unavailable("reading a BuildJob"))?;
        let status = job
            .as_ref()
            .and_then(|j| j.status.clone())
            .unwrap_or_default();
        let running = status.phase.is_some_and(Phase::holds_slot);
        // A worker that could not store its log: its pod's log is the log until copied.
        let unstored = status.log_copied == Some(false);
        if let (true, Some(pod)) = (running || unstored, status.pod_name.as_deref()) {
            return self.pod_log(pod, app, build_number, offset).await;
        }
        let stored = self.stored_log(app, app_uuid, build_number, offset).await?;
        match (stored, job, status.pod_name.as_deref()) {
            (Some(obj), _, _) => Ok(Some(obj)),
            // Never stored (its copy given up): what its pod still holds.
            (None, Some(_), Some(pod)) => self.pod_log(pod, app, build_number, offset).await,
            // Known but nothing written yet (queued).
            (None, Some(_), None) => Ok(Some(bytes_object(Vec::new(), offset))),
            (None, None, _) => Ok(None),
        }
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
        let jobs = self.jobs();
        if self
            .bounded(jobs.get_opt(&name))
            .await
            .map_err(unavailable("reading a BuildJob"))?
            .is_none()
        {
            // Gone (past BUILDJOB_TTL_SECONDS): a finished build's stored log, whole, as
            // the route without `follow` and local mode serve it.
            let stored = self.stored_log(app, app_uuid, build_number, 0).await?;
            return Ok(stored.map(|obj| obj.body));
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
        let jobs = self.jobs();
        match self
            .bounded(jobs.get_opt(&job_name(app, app_uuid, build_number)))
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
    use crate::pipeline::sources::DATA_CHUNK;
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
        // A callback URL may carry a password or a token.
        let callback = "https://ctl:cbpass@api.example/hook?token=cbquery";
        spec.callback = Some(callback.into());
        let mut leaks = secrets_in(&spec);
        leaks.extend(["s3cr3t".into(), "cbpass".into(), "cbquery".into()]);
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
                assert_eq!(b["spec"]["callback"], "https://api.example/hook?%E2%80%A6");
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
                assert_eq!(decode("callback"), callback);
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
        let auth = own.known_credentials(&job).and_then(|c| c.auth);
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

    /// The client goes away once the BuildJob is being created (hyper drops the request's
    /// future): the BuildJob still gets its Secret.
    #[tokio::test]
    async fn a_submit_whose_client_hangs_up_still_gives_its_buildjob_a_secret() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let posted = Arc::new(tokio::sync::Notify::new());
        let p = posted.clone();
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None).check(move |_| p.notify_one()),
            Expect::new(Method::POST, SECRETS, 201, None),
        ];
        let verifier = mock::verify_with(handle, scenario, with_uid);
        let (exec, _) = executor(client, dir.path());
        tokio::select! {
            biased;
            _ = posted.notified() => {}
            r = exec.submit(crate::build::tests::spec()) => panic!("answered at once: {r:?}"),
        }
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    /// The create's answer is lost after the API server made the BuildJob: it is found,
    /// and given its Secret, not left to run without one.
    #[tokio::test]
    async fn a_buildjob_whose_create_answer_was_lost_is_found_and_finished() {
        let mine = with_uid(serde_json::to_value(job(None)).unwrap_or_default());
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None).lost(),
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(mine)),
            Expect::new(Method::POST, SECRETS, 201, None),
        ];
        let res = submitted(crate::build::tests::spec(), scenario, with_uid).await;
        assert!(res.is_ok(), "{res:?}");
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
        spec.sources = Secret::new("https://user:tok@example.com:8443/a.tgz?sig=abc");
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
                // The port is kept (a source server is often on one); what may hold a
                // token is not.
                assert_eq!(
                    b["spec"]["source"]["display"],
                    "https://example.com:8443/a.tgz?%E2%80%A6"
                );
            }),
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(existing)),
            Expect::new(Method::POST, SECRETS, 201, None).check(|b| {
                let v = b["data"]["sources"].as_str().unwrap_or("");
                let uri = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_default();
                assert_eq!(uri, b"https://user:tok@example.com:8443/a.tgz?sig=abc");
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

    /// Stores `text` as the log of the test spec's build (12).
    async fn store_log(storage: &Arc<dyn Storage>, dir: &std::path::Path, text: &str) {
        let src = dir.join("log");
        std::fs::write(&src, text).unwrap_or_else(|e| panic!("{e}"));
        let key = crate::build::tests::spec().log_key();
        storage
            .put_file(&key, &src)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// What a follow of build `n` sends, to its end (within 5 s); `None`: not found.
    async fn followed(exec: &KubeExecutor, app_uuid: &str, n: u64) -> Option<String> {
        let stream = exec.follow("myapp", app_uuid, n).await.ok().flatten()?;
        let text = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let chunks: Vec<_> = stream.collect().await;
            chunks
                .into_iter()
                .flat_map(|c| c.unwrap_or_default().to_vec())
                .collect::<Vec<u8>>()
        })
        .await
        .unwrap_or_else(|_| panic!("the follow never ended"));
        Some(String::from_utf8_lossy(&text).into_owned())
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
        store_log(
            &storage,
            dir.path(),
            "Stopped while queued\nBuild finished\n",
        )
        .await;
        let text = followed(&exec, &spec.app_uuid, 12)
            .await
            .unwrap_or_else(|| panic!("a follower"));
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(text, "Stopped while queued\nBuild finished\n");
    }

    #[tokio::test]
    async fn a_follow_of_a_build_whose_buildjob_expired_serves_its_stored_log() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let spec = crate::build::tests::spec();
        // Past BUILDJOB_TTL_SECONDS: no BuildJob, the stored log stays. Then another
        // build that never was.
        let never = Expect::new(
            Method::GET,
            format!("{JOBS}/{}", job_name("myapp", &spec.app_uuid, 13)),
            404,
            Some(status_error(404, "NotFound")),
        );
        let verifier = mock::verify(handle, vec![no_job_yet(), never]);
        let (exec, storage) = executor(client, dir.path());
        store_log(&storage, dir.path(), "Step 1/1 : FROM x\nBuild finished\n").await;
        let text = followed(&exec, &spec.app_uuid, 12).await;
        assert_eq!(
            text.as_deref(),
            Some("Step 1/1 : FROM x\nBuild finished\n"),
            "the stored log, as without follow"
        );
        let unknown = exec.follow("myapp", &spec.app_uuid, 13).await;
        assert!(matches!(unknown, Ok(None)), "unknown: a 404");
        drop(exec);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
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
        let pod_log_of = || {
            Expect::new(
                Method::GET,
                format!("/api/v1/namespaces/builds/pods/{JOB}-worker-0/log?&container=worker"),
                200,
                Some(Value::String(pod_log.into())),
            )
        };
        let scenario = vec![
            Expect::new(
                Method::GET,
                format!("{JOBS}/{JOB}"),
                200,
                Some(running.clone()),
            ),
            pod_log_of(),
            // From a byte offset of what the build's lines are.
            Expect::new(Method::GET, format!("{JOBS}/{JOB}"), 200, Some(running)),
            pod_log_of(),
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
        let live_from = exec.log("myapp", &spec.app_uuid, 12, 5).await;
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
        let live_from = live_from
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("live log"));
        assert_eq!(read_all(live_from).await, "1/2 : FROM x\ndone\n");
        let done = done.ok().flatten().unwrap_or_else(|| panic!("stored log"));
        assert_eq!(read_all(done).await, "line\nBuild finished\n");
        assert!(after_ttl.ok().flatten().is_some());
    }

    /// What the facade served of a running build's log before it streamed it: the whole pod
    /// log read into a `String`, then only the build's own lines, without their prefix.
    fn build_lines_before(pod_log: &str, app: &str, build_number: u64) -> String {
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

    /// A small deterministic generator (no dependency for it).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n.max(1)
        }
    }

    /// `log` through a `LineFilter` fed in pieces cut where `rng` says: (output, build lines
    /// counted).
    fn filter_in_pieces(log: &[u8], filter: &mut LineFilter, rng: &mut Lcg) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut ended = 0;
        let mut rest = log;
        while !rest.is_empty() {
            let n = 1 + rng.next(rest.len().min(12));
            filter.feed(&rest[..n], &mut out);
            ended += filter.take_ended();
            rest = &rest[n..];
        }
        filter.finish(&mut out);
        (out, ended + filter.take_ended())
    }

    #[test]
    fn the_streamed_line_filter_gives_what_the_whole_log_gave_byte_for_byte() {
        let mut rng = Lcg(7);
        // Pieces of lines that make every case: build lines, others, `\r\n`, a lone `\r`, a
        // prefix cut short, a line that is only the prefix, no `\n` at the end.
        let parts = [
            "[myapp-12] ",
            "[myapp-12]",
            "[myapp-1] ",
            "[myapp-123] ",
            "x",
            "Step 1/2 : FROM y",
            "\r",
            "\n",
            "\r\n",
            " ",
            "[",
            "é中",
        ];
        for case in 0..3000 {
            let mut log = String::new();
            for _ in 0..rng.next(40) {
                log.push_str(parts[rng.next(parts.len())]);
            }
            let mut filter = LineFilter::new("[myapp-12] ", 0, false);
            let (out, ended) = filter_in_pieces(log.as_bytes(), &mut filter, &mut rng);
            let before = build_lines_before(&log, "myapp", 12);
            assert_eq!(
                String::from_utf8_lossy(&out),
                before,
                "case {case}: {log:?}"
            );
            assert_eq!(ended, before.matches('\n').count(), "case {case}: {log:?}");
        }
    }

    #[test]
    fn a_follower_gets_whole_lines_and_skips_those_it_had() {
        let log = b"[a-1] one\nnoise\n[a-1] two\r\n[a-1] three\n[a-1] four, cut";
        let mut rng = Lcg(3);
        for _ in 0..200 {
            let mut filter = LineFilter::new("[a-1] ", 1, true);
            let mut rest: &[u8] = log;
            let mut seen = Vec::new();
            while !rest.is_empty() {
                let n = 1 + rng.next(rest.len().min(9));
                let mut out = Vec::new();
                filter.feed(&rest[..n], &mut out);
                let ended = filter.take_ended();
                // Whole lines only, and as many as counted.
                assert!(out.is_empty() || out.ends_with(b"\n"), "{out:?}");
                assert_eq!(ended, out.iter().filter(|b| **b == b'\n').count());
                seen.extend(out);
                rest = &rest[n..];
            }
            let mut out = Vec::new();
            filter.finish(&mut out);
            assert!(out.is_empty(), "a line cut short is left to the stored log");
            assert_eq!(String::from_utf8_lossy(&seen), "two\nthree\n");
        }
    }

    #[test]
    fn any_bytes_pass_a_line_filter_and_long_lines_cost_nothing() {
        // Not UTF-8 (the `String` read before failed the whole request).
        let log = b"[a-1] \xff\xfe ok\n\xff\n[a-1] x\n";
        let mut out = Vec::new();
        let mut filter = LineFilter::new("[a-1] ", 0, false);
        filter.feed(log, &mut out);
        filter.finish(&mut out);
        assert_eq!(out, b"\xff\xfe ok\nx\n");
        // A 10 MiB line with no `\n`: given out as it comes, never held.
        let mut filter = LineFilter::new("[a-1] ", 0, false);
        let mut out = Vec::new();
        filter.feed(b"[a-1] ", &mut out);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            out.clear();
            filter.feed(&chunk, &mut out);
            assert_eq!(out.len(), chunk.len());
            assert!(filter.head.capacity() <= 16);
        }
    }

    /// A `data:` URI of `payload` with the pipeline's decoding error of it (as local mode's
    /// build reports it) and that of the stand-in the worker gets instead.
    async fn errors_of(payload: &str, limits: &Limits) -> (String, String, String) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let uri = format!("data:application/zip;base64,{payload}");
        let error = sources::write_data(payload, &dir.path().join("a"), limits)
            .await
            .expect_err("not decodable");
        let stand_in = stand_in(&uri, payload, &error);
        let b64 = sources::data_payload(&stand_in).unwrap_or_else(|| panic!("{stand_in}"));
        let again = match sources::write_data(b64, &dir.path().join("b"), limits).await {
            Err(e) => e.to_string(),
            Ok(_) if stand_in == SOURCES_TOO_LARGE => "too large".into(),
            Ok(n) => panic!("the stand-in decodes ({n} bytes)"),
        };
        (error.to_string(), stand_in, again)
    }

    #[tokio::test]
    async fn an_undecodable_data_uri_is_passed_on_as_a_short_one_failing_the_same_way() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let valid = b64.encode(vec![7u8; 3 << 20]); // 4 MiB of base64
        let mut cases: Vec<(&str, String)> = Vec::new();
        // A bad symbol in the first chunk, one in the middle, one in the last.
        for at in [100, 1_500_001, valid.len() - 10] {
            let mut p = valid.clone();
            p.replace_range(at..at + 1, "!");
            cases.push(("a bad symbol", p));
        }
        // MIME-style: wrapped at 76 characters.
        let wrapped: String = valid
            .as_bytes()
            .chunks(76)
            .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
            .collect();
        cases.push(("wrapped lines", wrapped));
        // URL-safe base64; a multi-byte character across a chunk boundary; bad padding.
        cases.push(("url-safe", valid.replace('w', "-").replace('c', "_")));
        let mut p = valid.clone();
        p.replace_range(DATA_CHUNK * 3 - 1..DATA_CHUNK * 3 + 1, "中");
        cases.push(("a character across chunks", p));
        cases.push(("bad padding", format!("{}=A==", &valid[..valid.len() - 4])));
        let large = Limits {
            max_source_bytes: 1 << 30,
            ..limits()
        };
        for (what, payload) in cases {
            let (error, stand_in, again) = errors_of(&payload, &large).await;
            assert_eq!(again, error, "{what}");
            assert!(
                error.starts_with("the data: URI's base64 is invalid"),
                "{what}: {error}"
            );
            assert!(stand_in.len() <= STAND_IN_MAX, "{what}: {}", stand_in.len());
        }
        // Too large for MAX_SOURCE_BYTES (refused by its length): the worker says so.
        let (error, stand_in, _) = errors_of(&valid, &limits()).await;
        assert_eq!(stand_in, SOURCES_TOO_LARGE);
        assert!(error.contains("MAX_SOURCE_BYTES"), "{error}");
        // A short one goes as it is.
        let (error, stand_in, again) = errors_of("QUJD!", &large).await;
        assert_eq!(stand_in, "data:application/zip;base64,QUJD!");
        assert_eq!(again, error);
    }

    fn payload_again() -> String {
        let mut payload = "QUJD".repeat(150_000);
        payload.replace_range(300_001..300_002, "!");
        payload
    }

    #[tokio::test]
    async fn an_undecodable_data_uri_is_accepted_with_a_stand_in_a_secret_can_hold() {
        let mut spec = crate::build::tests::spec();
        // 600 KB (over the 128 KiB an environment string may hold), within MAX_SOURCE_BYTES.
        let payload = payload_again();
        spec.sources = Secret::new(format!("data:base64,{payload}"));
        let scenario = vec![
            no_job_yet(),
            Expect::new(Method::POST, JOBS, 201, None).check(|b| {
                assert_eq!(b["spec"]["source"]["display"], "data: URI (not decodable)");
                assert!(b.to_string().len() < 8192);
            }),
            Expect::new(Method::POST, SECRETS, 201, None).check(|b| {
                let v = b["data"]["sources"].as_str().unwrap_or("");
                let uri = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_default();
                let uri = String::from_utf8_lossy(&uri);
                assert!(uri.len() <= STAND_IN_MAX, "{}", uri.len());
                // The chunk that failed: the fifth.
                let chunk = &payload_again()[4 * DATA_CHUNK..5 * DATA_CHUNK];
                assert_eq!(uri, format!("data:base64,{chunk}"));
            }),
        ];
        let res = submitted(spec, scenario, with_uid).await;
        assert!(res.is_ok(), "{res:?}");
    }

    /// An API server that takes every request and never answers.
    fn hung_api(
        mut handle: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
    ) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(call) = handle.next_request().await {
                held.push(call);
            }
            held.len()
        })
    }

    #[tokio::test]
    async fn a_request_whose_api_call_never_answers_is_refused_in_time() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (client, handle) = mock::client();
        let calls = hung_api(handle);
        let (mut exec, _) = executor(client, dir.path());
        exec.api_timeout = std::time::Duration::from_millis(300);
        let within = std::time::Duration::from_secs(5);
        let bounded = |what: &'static str, r: Result<Result<(), ExecutorError>, _>| match r {
            Ok(Err(ExecutorError::Unavailable(_))) => {}
            other => panic!("{what}: {other:?}"),
        };
        let spec = crate::build::tests::spec();
        bounded(
            "submit",
            tokio::time::timeout(within, exec.submit(spec.clone())).await,
        );
        let sel = BuildSelector {
            app: "myapp".into(),
            app_uuid: spec.app_uuid.clone(),
            build_number: Some(12),
        };
        let stop = tokio::time::timeout(within, exec.stop(sel.clone())).await;
        bounded("stop", stop.map(|r| r.map(|_| ())));
        let stop_all = BuildSelector {
            build_number: None,
            ..sel
        };
        let stop = tokio::time::timeout(within, exec.stop(stop_all)).await;
        bounded("stop all", stop.map(|r| r.map(|_| ())));
        let log = tokio::time::timeout(within, exec.log("myapp", &spec.app_uuid, 12, 0)).await;
        bounded("log", log.map(|r| r.map(|_| ())));
        let follow = tokio::time::timeout(within, exec.follow("myapp", &spec.app_uuid, 12)).await;
        bounded("follow", follow.map(|r| r.map(|_| ())));
        assert!(
            !tokio::time::timeout(within, exec.is_active("myapp", &spec.app_uuid, 12))
                .await
                .unwrap_or(true),
            "is_active"
        );
        drop(exec);
        assert_eq!(calls.await.unwrap_or(0), 6, "one hung call each");
    }
}
