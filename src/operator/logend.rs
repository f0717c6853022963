//! What the controller owes a build's stored log. First, the log of a worker that could not
//! store it (storage refused past the worker's retries): copied from its pod's log, which
//! holds every line until the pod goes. Then the end of the log of a build that ended
//! without a worker writing it (stopped while queued, a pod that never started, a lost or
//! killed pod, a deleted BuildJob, a worker stopped by SIGTERM): `Build failed (reason):
//! message` and `Build finished`, appended to its stored log and sent to Kafka, as local
//! mode does for a build that never ran. Written off the reconcile path (as callbacks are),
//! then recorded in `status.logCopied` and `status.logEnded`; a crash in between writes it
//! again (a repeated end is better than none).

use super::controller::{lock, owned_by, pod_ended, record_status, Context};
use super::crd::BuildJob;
use super::decide::{LogEnd, LogOwed};
use super::facade::{build_prefix, filtered, is_code, LineFilter};
use super::pod::WORKER_CONTAINER;
use crate::logs::{KafkaProducers, LogFiles, LogSinks, Stdout, FINISHED_LINE};
use crate::storage::Storage;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long the writer waits for a worker still running to stop (the pod's default
/// termination grace is 30 s): its own upload of the stored log would replace the end.
pub const WORKER_STOP_WAIT: Duration = Duration::from_secs(45);

/// BuildJobs whose log end this process remembers writing (see `spawn`).
const ENDING_MAX: usize = 16_384;

/// Tries at appending to the stored log before the end is given up on (and recorded, so
/// a BuildJob being deleted is not held while storage is down).
const STORE_ATTEMPTS: u32 = 5;

/// How long a worker's log is tried again to be copied into storage, which refuses it (an
/// outage the worker already waited out for 90 s): the BuildJob is held meanwhile.
const COPY_PATIENCE: Duration = Duration::from_secs(600);

/// The longest pause between two tries at copying a worker's log.
const COPY_PAUSE_MAX: Duration = Duration::from_secs(60);

/// Where ends are written: storage and the Kafka producers.
#[derive(Clone)]
pub struct LogEnds {
    sinks: LogSinks,
    scratch: PathBuf,
}

impl LogEnds {
    /// `scratch`: a folder for the stored log being appended to (created here).
    pub fn new(
        storage: Arc<dyn Storage>,
        kafka: Option<Arc<KafkaProducers>>,
        scratch: PathBuf,
    ) -> std::io::Result<Self> {
        let files = LogFiles::spool(&scratch)?;
        Ok(Self {
            sinks: LogSinks {
                files,
                storage,
                stdout: Stdout::Off,
                max_log_bytes: u64::MAX,
                kafka,
            },
            scratch,
        })
    }
}

/// Starts writing `end` for `job` (as the reconcile wrote it) unless this process already
/// is, or has no storage to write to (a controller made for tests).
pub fn spawn(ctx: Arc<Context>, job: &BuildJob, owed: LogOwed) {
    let Some(ends) = ctx.log_ends.clone() else {
        return;
    };
    let uid = job.uid().unwrap_or_default();
    {
        let mut ending = lock(&ctx.ending_logs);
        // Bounded: forgetting costs at most a repeated end (by a reconcile that read the
        // BuildJob before its record), nothing else.
        if ending.len() >= ENDING_MAX && !ending.contains(&uid) {
            ending.clear();
        }
        if !ending.insert(uid.clone()) {
            return;
        }
    }
    let job = job.clone();
    let senders = ctx.senders.clone();
    senders.spawn(async move {
        let name = job.name_any();
        let work = AssertUnwindSafe(async {
            write(&ctx, &ends, &job, &owed).await;
            record(&ctx, &job).await
        })
        .catch_unwind();
        // The term ends (a shutdown, a lost Lease): stop, before the Lease can go to the
        // next leader, which writes what is not recorded (the stored end at most once, see
        // `append_lines`).
        let done = tokio::select! {
            biased;
            () = ctx.term.cancelled() => {
                tracing::info!(job = %name, "stopped writing the end of the build's log: no longer the leader; the next one writes it");
                lock(&ctx.ending_logs).remove(&uid);
                return;
            }
            done = work => done,
        };
        // Written and recorded: the uid stays, so a reconcile that read the BuildJob before
        // the record does not write the end again. Otherwise the re-check tries again.
        match done {
            Ok(true) => {}
            Ok(false) => {
                lock(&ctx.ending_logs).remove(&uid);
            }
            Err(_) => {
                lock(&ctx.ending_logs).remove(&uid);
                tracing::error!(job = %name, "the writer of a build log's end panicked; the next reconcile tries again");
            }
        }
    });
}

/// Copies the worker's log from its pod when owed, then writes the end (when owed) to Kafka
/// (when the build names brokers) and the stored log, once a worker still stopping has
/// stopped.
async fn write(ctx: &Context, ends: &LogEnds, job: &BuildJob, owed: &LogOwed) {
    let pod = job.status.as_ref().and_then(|s| s.pod_name.as_deref());
    if let Some(pod) = pod {
        wait_for_worker(ctx, job, pod).await;
    }
    if owed.copy_pod_log {
        match pod {
            Some(pod) => {
                copy_with_retries(ctx, ends, job, pod).await;
                delete_if_held(ctx, job, pod).await;
            }
            None => {
                tracing::error!(job = %job.name_any(), "the worker's log is not in storage and its pod is unknown; it is lost")
            }
        }
    }
    // A leader that lost its Lease may still be here: the end goes to this BuildJob's log
    // only while it owes it (not to a later build's log of the same number).
    if let Some(end) = &owed.end {
        if still_owed(ctx, job, |s| s.log_ended == Some(false)).await != Some(false) {
            write_end(ends, job, end).await;
        }
    }
}

/// Whether `job` (this very BuildJob: its uid, not a later one of the same name) still owes
/// what `owes` reads in its status; `None` when the API could not say.
async fn still_owed(
    ctx: &Context,
    job: &BuildJob,
    owes: fn(&super::crd::BuildJobStatus) -> bool,
) -> Option<bool> {
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &job.namespace()?);
    let now = jobs.get_opt(&job.name_any()).await.ok()?;
    Some(now.is_some_and(|now| now.uid() == job.uid() && now.status.as_ref().is_some_and(owes)))
}

/// Deletes `pod` when its worker has ended but another container (a sidecar a mutating
/// webhook injected) keeps it running: `decide` left it for the copy of its log.
async fn delete_if_held(ctx: &Context, job: &BuildJob, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let Ok(Some(p)) = pods.get_opt(pod).await else {
        return;
    };
    let going = p.metadata.deletion_timestamp.is_some();
    if !owned_by(&p, job) || pod_ended(&p) || going {
        return;
    }
    let params = kube::api::DeleteParams::background().preconditions(kube::api::Preconditions {
        uid: p.uid(),
        resource_version: None,
    });
    match pods.delete(pod, &params).await {
        Ok(_) => {
            tracing::info!(job = %job.name_any(), pod, "deleted the worker pod a sidecar kept running, after copying its log")
        }
        Err(e) if is_code(&e, 404) || is_code(&e, 409) => {}
        Err(e) => {
            tracing::warn!(job = %job.name_any(), pod, error = %e, "could not delete the worker pod a sidecar keeps running; its activeDeadlineSeconds ends it")
        }
    }
}

/// Copies the worker's log from `pod` into storage, trying again while storage refuses,
/// for COPY_PATIENCE; gives up at once when the pod (and its log) is gone.
async fn copy_with_retries(ctx: &Context, ends: &LogEnds, job: &BuildJob, pod: &str) {
    let name = job.name_any();
    let key = crate::build::log_key(&job.spec.app, &job.spec.app_uuid, job.spec.build_number);
    let prefix = build_prefix(&job.spec.app, job.spec.build_number);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let give_up = tokio::time::Instant::now() + COPY_PATIENCE;
    let mut pause = Duration::from_secs(1);
    loop {
        // A leader that lost its Lease may still be here, or the build was replaced: the
        // copy goes only to the log of this BuildJob, only while it owes it.
        let copied = match still_owed(ctx, job, |s| s.log_copied == Some(false)).await {
            Some(false) => return,
            Some(true) => copy_pod_log(&pods, pod, job, &prefix, ends, &key).await,
            None => Err(CopyError::PodLog("cannot read the BuildJob".into())),
        };
        match copied {
            Ok(bytes) => {
                tracing::info!(job = %name, pod, key, bytes, "copied the worker's log from its pod into storage");
                return;
            }
            Err(CopyError::PodGone) => {
                tracing::error!(job = %name, pod, key, "the worker's log is not in storage and its pod is gone; it is lost");
                return;
            }
            Err(e) if tokio::time::Instant::now() + pause > give_up => {
                tracing::error!(job = %name, pod, key, error = %e, "could not copy the worker's log from its pod into storage; giving up");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %name, pod, key, error = %e, "could not copy the worker's log from its pod into storage yet; trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(COPY_PAUSE_MAX);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("the worker pod is gone")]
    PodGone,
    #[error("reading the worker pod's log: {0}")]
    PodLog(String),
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("scratch file: {0}")]
    Io(#[from] std::io::Error),
}

/// The build's lines of the worker container's log in `pod` (the worker prints them with
/// `prefix`), put under `key` whole, through a scratch file. Returns the bytes put.
async fn copy_pod_log(
    pods: &Api<Pod>,
    pod: &str,
    job: &BuildJob,
    prefix: &str,
    ends: &LogEnds,
    key: &str,
) -> Result<u64, CopyError> {
    // This BuildJob's pod, not one of a later BuildJob of the same name.
    match pods.get_opt(pod).await {
        Ok(Some(p)) if owned_by(&p, job) => {}
        Ok(_) => return Err(CopyError::PodGone),
        Err(e) => return Err(CopyError::PodLog(e.to_string())),
    }
    let params = super::pod::worker_log(false);
    let reader = match pods.log_stream(pod, &params).await {
        Ok(r) => r,
        Err(e) if is_code(&e, 404) => return Err(CopyError::PodGone),
        Err(e) => return Err(CopyError::PodLog(e.to_string())),
    };
    let tmp = tempfile::NamedTempFile::new_in(&ends.scratch)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let mut pieces = filtered(
        reader,
        LineFilter::new(prefix, 0, false),
        Some(super::client::API_CALL_TIMEOUT),
    );
    let mut bytes = 0;
    while let Some(piece) = pieces.next().await {
        let (chunk, _) = piece.map_err(|e| CopyError::PodLog(e.to_string()))?;
        file.write_all(&chunk).await?;
        bytes += chunk.len() as u64;
    }
    file.flush().await?;
    drop(file);
    ends.sinks.storage.put_file(key, tmp.path()).await?;
    Ok(bytes)
}

/// Writes the end to Kafka (when the build names brokers) and the stored log.
async fn write_end(ends: &LogEnds, job: &BuildJob, end: &LogEnd) {
    let name = job.name_any();
    // The sinks name a build by its key, metadata and number; a BuildJob's uuid was
    // checked when it was made (it only shows in the sinks' warnings).
    let build_uuid = uuid::Uuid::parse_str(&job.spec.build_uuid).unwrap_or_default();
    let spec = job.spec.build_spec(build_uuid);
    let failed = end.failed_line();
    let kafka = async {
        if let Some(mut log) = ends.sinks.kafka_only(&spec) {
            log.line(&failed);
            // Waits for delivery at most KAFKA_DELIVERY_TIMEOUT_MS, then warns.
            log.finish().await;
        }
    };
    let stored = async {
        let mut lines = split_lines(&failed);
        lines.push(FINISHED_LINE.to_string());
        let key = spec.log_key();
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=STORE_ATTEMPTS {
            match append_lines(ends.sinks.storage.as_ref(), &ends.scratch, &key, &lines).await {
                Ok(()) => return,
                Err(e) if attempt == STORE_ATTEMPTS => {
                    tracing::error!(job = %name, key, error = %e, "could not append the build's end to its stored log; giving up");
                }
                Err(e) => {
                    tracing::warn!(job = %name, key, error = %e, "could not append the build's end to its stored log yet");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    };
    tokio::join!(kafka, stored);
    tracing::info!(job = %name, line = %failed, "wrote the end of the build's log");
}

/// Waits (at most WORKER_STOP_WAIT) until the worker of `pod` is not running: a worker
/// stopping uploads its stored log whole, which would replace an end appended before.
async fn wait_for_worker(ctx: &Context, job: &BuildJob, pod: &str) {
    let ns = job.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let give_up = tokio::time::Instant::now() + WORKER_STOP_WAIT;
    loop {
        match pods.get_opt(pod).await {
            Ok(p) if !worker_may_run(p.as_ref(), job) => return,
            Ok(_) => {}
            Err(e) => tracing::debug!(pod, error = %e, "cannot read the worker pod yet"),
        }
        if tokio::time::Instant::now() >= give_up {
            tracing::warn!(job = %job.name_any(), pod, "the worker pod is still running; writing the end of the build's log anyway");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `pod` (this BuildJob's) may still have a worker running or about to: it exists,
/// has not ended, and its worker container has not stopped.
pub fn worker_may_run(pod: Option<&Pod>, job: &BuildJob) -> bool {
    let Some(pod) = pod else {
        return false;
    };
    let ours = owned_by(pod, job);
    let status = pod.status.clone().unwrap_or_default();
    let ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let worker = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == WORKER_CONTAINER)
        .and_then(|c| c.state.clone())
        .unwrap_or_default();
    let stopped = worker.terminated.is_some();
    // Being deleted while it cannot start (its image cannot be pulled, …): the kubelet
    // will not try again, so no worker will run. (One still being created may yet start.)
    let never = pod.metadata.deletion_timestamp.is_some()
        && worker.waiting.as_ref().is_some_and(|w| {
            !matches!(
                w.reason.as_deref(),
                None | Some("ContainerCreating" | "PodInitializing")
            )
        });
    ours && !ended && !stopped && !never
}

/// `text` as the build log splits it: one line per `\n` or `\r`, blank ones left out.
fn split_lines(text: &str) -> Vec<String> {
    text.split(['\n', '\r'])
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
    /// The stored log stopped coming part-way (storage's own message names the object).
    #[error("reading the stored log: {0}")]
    Read(std::io::Error),
    #[error("scratch file: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends `lines` to the object under `key` (none: an object of just these lines),
/// streaming it through a file in `scratch`: a stored log may be large.
pub async fn append_lines(
    storage: &dyn Storage,
    scratch: &Path,
    key: &str,
    lines: &[String],
) -> Result<(), AppendError> {
    let tmp = tempfile::NamedTempFile::new_in(scratch)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let ending: String = lines.iter().map(|l| format!("{l}\n")).collect();
    // The log's last bytes: one more than `ending`, to tell a line of its own.
    let mut end_of_log: Vec<u8> = Vec::new();
    if let Some(obj) = storage.get(key).await? {
        let mut body = obj.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(AppendError::Read)?;
            end_of_log.extend_from_slice(&chunk[chunk.len().saturating_sub(ending.len() + 1)..]);
            let extra = end_of_log.len().saturating_sub(ending.len() + 1);
            end_of_log.drain(..extra);
            file.write_all(&chunk).await?;
        }
    }
    // Appended already (a writer stopped between its upload and its record): not twice.
    if let Some(before) = end_of_log.strip_suffix(ending.as_bytes()) {
        if before.is_empty() || before.ends_with(b"\n") {
            return Ok(());
        }
    }
    let mut tail = String::new();
    // A log cut mid-line (a worker killed while writing) still gets the end on its own line.
    if end_of_log.last().is_some_and(|b| *b != b'\n') {
        tail.push('\n');
    }
    tail.push_str(&ending);
    file.write_all(tail.as_bytes()).await?;
    file.flush().await?;
    drop(file);
    storage.put_file(key, tmp.path()).await?;
    Ok(())
}

/// Records `status.logCopied` and `status.logEnded` on the BuildJob (as the writer started
/// from it). `false`: not recorded (given up).
async fn record(ctx: &Context, written: &BuildJob) -> bool {
    let recorded = record_status(ctx, written, "the end of the build's log", |job| {
        let mut st = job.status.clone().unwrap_or_default();
        // Recorded already (or never owed): nothing to write.
        if st.log_ended != Some(false) && st.log_copied != Some(false) {
            return None;
        }
        for owed in [&mut st.log_ended, &mut st.log_copied] {
            if *owed == Some(false) {
                *owed = Some(true);
            }
        }
        Some(st)
    })
    .await;
    if recorded.is_err() {
        tracing::error!(job = %written.name_any(), "gave up recording the end of the build's log; it may be written again");
    }
    recorded.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalStorage;

    async fn read(storage: &dyn Storage, key: &str) -> String {
        let obj = storage.get(key).await.ok().flatten().expect("stored");
        let bytes: Vec<u8> = obj
            .body
            .map(|c| c.map(|b| b.to_vec()).unwrap_or_default())
            .concat()
            .await;
        String::from_utf8(bytes).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_writer_stops_when_its_leadership_term_ends_and_writes_nothing() {
        use crate::operator::decide::{tests::job, LogEnd};
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(LocalStorage::new(dir.path().join("store")).expect("store"));
        let ends = LogEnds::new(storage.clone(), None, dir.path().join("scratch")).expect("ends");
        let (client, mut handle) = crate::operator::mock::client();
        let ctx = Arc::new(
            crate::operator::controller::tests::bare_context(client, vec![]).with_log_ends(ends),
        );
        let mut j = job(Some(crate::operator::crd::Phase::Failed));
        if let Some(st) = j.status.as_mut() {
            st.pod_name = Some("job-worker-0".into());
        }
        let owed = LogOwed {
            copy_pod_log: false,
            end: Some(LogEnd {
                reason: "Cancelled".into(),
                message: "stopped".into(),
            }),
        };
        spawn(ctx.clone(), &j, owed);
        // The writer waits for the worker pod to stop: its read is held unanswered.
        let (req, _answer) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("the writer reads the pod")
            .expect("a request");
        assert!(req.uri().path().contains("/pods/"), "{}", req.uri());
        // The Lease is lost (or the process shuts down): the writer stops, before the next
        // leader can start its own.
        ctx.term.cancel();
        ctx.senders.close();
        tokio::time::timeout(Duration::from_secs(5), ctx.senders.wait())
            .await
            .expect("the writer stopped");
        assert!(
            !lock(&ctx.ending_logs).contains("uid-1"),
            "a later term may write it"
        );
        let key = crate::build::log_key(&j.spec.app, &j.spec.app_uuid, j.spec.build_number);
        assert!(storage.get(&key).await.expect("get").is_none());
    }

    #[tokio::test]
    async fn the_end_is_appended_to_what_is_stored_or_makes_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LocalStorage::new(dir.path().join("store")).expect("store");
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        let end = vec![
            "Build failed (Cancelled): stopped".to_string(),
            "Build finished".into(),
        ];
        // Nothing stored: just the end.
        append_lines(&storage, &scratch, "a-b-1.logs", &end)
            .await
            .expect("append");
        assert_eq!(
            read(&storage, "a-b-1.logs").await,
            "Build failed (Cancelled): stopped\nBuild finished\n"
        );
        // A worker's log, cut mid-line: kept, and the end on lines of its own.
        let worker = dir.path().join("worker.log");
        std::fs::write(&worker, "Step 1/2 : FROM x\nBuild interrupted: stop").expect("write");
        storage.put_file("a-b-2.logs", &worker).await.expect("put");
        append_lines(&storage, &scratch, "a-b-2.logs", &end)
            .await
            .expect("append");
        assert_eq!(
            read(&storage, "a-b-2.logs").await,
            "Step 1/2 : FROM x\nBuild interrupted: stop\nBuild failed (Cancelled): stopped\nBuild finished\n"
        );
        // Appended again (a writer stopped between its upload and its record, and the next
        // leader): the log keeps one end.
        for key in ["a-b-1.logs", "a-b-2.logs"] {
            let before = read(&storage, key).await;
            append_lines(&storage, &scratch, key, &end)
                .await
                .expect("append");
            assert_eq!(read(&storage, key).await, before);
        }
        // A line that only ends like the end is not the end.
        let other = dir.path().join("other.log");
        std::fs::write(
            &other,
            "Not Build failed (Cancelled): stopped\nBuild finished\n",
        )
        .expect("write");
        storage.put_file("a-b-3.logs", &other).await.expect("put");
        append_lines(&storage, &scratch, "a-b-3.logs", &end)
            .await
            .expect("append");
        assert!(read(&storage, "a-b-3.logs")
            .await
            .ends_with("Build finished\nBuild failed (Cancelled): stopped\nBuild finished\n"));
        // Nothing left in the scratch folder.
        assert_eq!(std::fs::read_dir(&scratch).expect("dir").count(), 0);
    }

    /// Storage whose object breaks off after its first chunk (S3 stalling mid-body).
    struct BreaksOff;

    #[async_trait::async_trait]
    impl Storage for BreaksOff {
        async fn put_file(&self, _: &str, _: &Path) -> Result<(), crate::storage::StorageError> {
            Ok(())
        }
        async fn get(
            &self,
            _: &str,
        ) -> Result<Option<crate::storage::Object>, crate::storage::StorageError> {
            let chunks = [
                Ok(bytes::Bytes::from_static(b"Step 1/2\n")),
                Err(std::io::Error::other(
                    "S3 stopped sending the object a-b-1.logs part-way",
                )),
            ];
            Ok(Some(crate::storage::Object {
                len: None,
                body: futures::stream::iter(chunks).boxed(),
            }))
        }
        async fn exists(&self, _: &str) -> Result<bool, crate::storage::StorageError> {
            Ok(true)
        }
        fn describe(&self) -> String {
            "breaks off".into()
        }
    }

    /// A stored log cut short on its way here is said to be that, not a scratch-file error
    /// (nothing is wrong with the controller's disk).
    #[tokio::test]
    async fn a_stored_log_that_breaks_off_is_named_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = append_lines(&BreaksOff, dir.path(), "a-b-1.logs", &["end".into()])
            .await
            .expect_err("cut short");
        assert_eq!(
            err.to_string(),
            "reading the stored log: S3 stopped sending the object a-b-1.logs part-way"
        );
    }

    #[test]
    fn a_multi_line_message_is_split_as_the_build_log_splits_it() {
        assert_eq!(
            split_lines("Build failed (X): a\nb\r\n\nc"),
            ["Build failed (X): a", "b", "c"]
        );
    }
}
