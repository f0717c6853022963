//! The reconciler: a thin shell around `decide` and `worker_pod`. It reads the BuildJob's
//! pod and the queue, asks `decide`, and applies the actions: pods, status (server-side
//! apply on /status, only when it changed), callbacks (sent, then recorded), events, TTL.

use super::crd::{secret_keys, BuildJob, BuildJobStatus, Phase};
use super::decide::{self, Action, CallbackKind, Decision, EventNote, Inputs};
use super::pod::{pod_name, worker_pod, PodError, PodSettings};
use super::{labels, Observer};
use crate::callback::Callbacks;
use crate::secret::Secret;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret as KubeSecret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The one field manager of BuildJob status.
pub const FIELD_MANAGER: &str = "buildshuttle-controller";

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed ({what}): {source}")]
    Kube {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("cannot make the worker pod: {0}")]
    Pod(#[from] PodError),
    #[error("BuildJob {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// Permanent errors wait for the BuildJob (or the configuration) to change; the rest are
    /// retried with a delay.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Pod(_) | Error::NoNamespace(_) => true,
            Error::Kube { source, .. } => {
                matches!(source, kube::Error::Api(s) if s.is_invalid() || s.is_forbidden())
            }
        }
    }
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { what, source }
}

fn is_status(e: &kube::Error, f: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if f(s))
}

/// What the reconciler needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: decide::Settings,
    pub pods: PodSettings,
    pub callbacks: Callbacks,
    /// The controller's cache of BuildJobs (the queue is counted from it).
    pub store: Store<BuildJob>,
    /// Jobs this process started whose status the cache may not show yet, so two
    /// reconciles in a row never over-fill the slots.
    pub starting: Mutex<HashSet<String>>,
    pub observer: Arc<dyn Observer>,
}

impl Context {
    pub fn new(
        client: Client,
        reporter: Reporter,
        settings: decide::Settings,
        pods: PodSettings,
        callbacks: Callbacks,
        store: Store<BuildJob>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            pods,
            callbacks,
            store,
            starting: Mutex::new(HashSet::new()),
            observer,
        }
    }

    /// Tells the observer how many BuildJobs wait and run.
    fn report_queue(&self) {
        let (mut queued, mut running) = (0, 0);
        for j in self.store.state() {
            match j.status.as_ref().and_then(|s| s.phase) {
                Some(p) if p.holds_slot() => running += 1,
                None | Some(Phase::Queued) if !j.spec.cancelled => queued += 1,
                _ => {}
            }
        }
        self.observer.queue(queued, running);
    }

    /// (others holding a slot, queued jobs older than `job`).
    fn queue_position(&self, job: &BuildJob) -> (usize, usize) {
        let name = job.name_any();
        let ns = job.namespace();
        let key = |j: &BuildJob| (j.creation_timestamp().map(|t| t.0), j.name_any());
        let mine = key(job);
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        let all = self.store.state();
        // Forget starts of jobs that are gone (deleted while starting).
        starting.retain(|n| all.iter().any(|j| &j.name_any() == n));
        let (mut running, mut ahead) = (0, 0);
        for other in all {
            let other_name = other.name_any();
            if other_name == name || other.namespace() != ns {
                continue;
            }
            let phase = other.status.as_ref().and_then(|s| s.phase);
            if phase.is_some_and(|p| p != Phase::Queued) {
                // The cache caught up with (or passed) the start.
                starting.remove(&other_name);
            }
            if phase.is_some_and(Phase::holds_slot) || starting.contains(&other_name) {
                running += 1;
            } else if phase.is_none_or(|p| p == Phase::Queued)
                && !other.spec.cancelled
                && key(&other) < mine
            {
                ahead += 1;
            }
        }
        (running, ahead)
    }
}

pub async fn reconcile(job: Arc<BuildJob>, ctx: Arc<Context>) -> Result<Requeue> {
    let name = job.name_any();
    let ns = job
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = job.status.clone().unwrap_or_default();

    let finished = prev.phase.is_some_and(Phase::is_finished);
    let (running, queued_ahead) = ctx.queue_position(&job);
    ctx.report_queue();
    // Still waiting, nothing owed: decide would change nothing, so ask the API nothing (a
    // long queue re-checks often). A pod left by a crash is found by the 409 on creation.
    let still_queued = prev.phase == Some(Phase::Queued)
        && prev.callbacks.pending
        && !job.spec.cancelled
        && running + queued_ahead >= ctx.settings.max_parallel;
    if still_queued {
        return Ok(Requeue::requeue(decide::QUEUED_RECHECK));
    }
    // The facade creates the credentials Secret just after the BuildJob: until it exists,
    // a worker pod would start without credentials and a callback would go without its
    // Authorization. A young job waits for it; an old one goes on without (and fails).
    let mut credentials = None;
    if !finished {
        credentials = read_secret(&ctx.client, &ns, &job.spec.credentials_secret).await?;
        let age = job
            .creation_timestamp()
            .map(|t| Timestamp::now().duration_since(t.0).as_secs())
            .unwrap_or(i64::MAX);
        if credentials.is_none() && age < SECRET_WAIT.as_secs() as i64 {
            tracing::debug!(job = %name, "waiting for the credentials Secret");
            return Ok(Requeue::requeue(Duration::from_secs(2)));
        }
        if credentials.is_none() {
            tracing::warn!(job = %name, secret = %job.spec.credentials_secret, "the credentials Secret is missing; going on without it");
        }
    }
    let pod = if finished {
        None
    } else {
        pods.get_opt(&pod_name(&name, prev.pod_retries))
            .await
            .map_err(kube_err("reading the worker pod"))?
    };
    let Decision {
        mut status,
        actions,
    } = decide::decide(
        &Inputs {
            job: &job,
            pod: pod.as_ref(),
            running,
            queued_ahead,
            now: Timestamp::now(),
        },
        &ctx.settings,
    );

    let mut requeue = None;
    let mut events = Vec::new();
    let mut callbacks = Vec::new();
    let mut delete_job = false;
    for action in actions {
        match action {
            Action::DeletePod { name: pod } => {
                match pods.delete(&pod, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, |s| s.is_not_found()) => {}
                    Err(e) => return Err(kube_err("deleting the worker pod")(e)),
                }
            }
            Action::CreatePod { attempt, .. } => {
                let rejected = match worker_pod(&job, attempt, &ctx.pods) {
                    Err(e @ PodError::NoUid) => return Err(e.into()),
                    Err(e) => Some(e.to_string()),
                    Ok(p) => match pods.create(&PostParams::default(), &p).await {
                        Ok(_) => None,
                        Err(e) if is_status(&e, |s| s.is_already_exists()) => None,
                        // The same pod would be refused again: the build fails.
                        Err(kube::Error::Api(s)) if s.is_invalid() => {
                            Some(format!("the worker pod was refused: {}", s.message))
                        }
                        Err(e) => return Err(kube_err("creating the worker pod")(e)),
                    },
                };
                if let Some(message) = rejected {
                    let (failed, note) = decide::reject(&prev, &message, Timestamp::now());
                    patch_status(&jobs, &name, &failed).await?;
                    publish(&ctx, &job, &note).await;
                    // The next reconcile sees a finished build and sends the callbacks.
                    return Ok(Requeue::requeue(Duration::from_secs(1)));
                }
                ctx.starting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone());
            }
            Action::SendCallback(kind) => callbacks.push(kind),
            Action::RecordEvent(e) => events.push(e),
            Action::Requeue(after) => requeue = Some(after),
            Action::DeleteJob => delete_job = true,
        }
    }

    // The status first: what happened is recorded before anyone is told.
    if status.without_timestamps() != prev.without_timestamps() {
        patch_status(&jobs, &name, &status).await?;
        if status.phase.is_some_and(Phase::is_finished) && !finished {
            let seconds = match (&status.start_time, &status.completion_time) {
                (Some(s), Some(c)) => Duration::try_from(c.0.duration_since(s.0)).ok(),
                _ => None,
            };
            let reason = status
                .condition()
                .map(|c| c.reason.clone())
                .unwrap_or_default();
            ctx.observer
                .build_finished(status.phase == Some(Phase::Succeeded), &reason, seconds);
            ctx.starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        }
    }
    for e in &events {
        publish(&ctx, &job, e).await;
    }
    if !callbacks.is_empty() {
        if finished {
            credentials = read_secret(&ctx.client, &ns, &job.spec.credentials_secret).await?;
        }
        let auth = callback_auth(credentials.as_ref());
        for kind in callbacks {
            send_callback(&ctx, &job, auth.as_ref(), kind).await;
            match kind {
                CallbackKind::Pending => status.callbacks.pending = true,
                CallbackKind::Final(_) => status.callbacks.final_ = true,
            }
            patch_status(&jobs, &name, &status).await?;
        }
    }
    if delete_job {
        tracing::info!(job = %name, "finished BuildJob reached its TTL; deleting it (sources and logs stay in storage)");
        match jobs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, |s| s.is_not_found()) => {}
            Err(e) => return Err(kube_err("deleting the finished BuildJob")(e)),
        }
        return Ok(Requeue::await_change());
    }
    Ok(requeue
        .map(Requeue::requeue)
        .unwrap_or_else(Requeue::await_change))
}

async fn patch_status(jobs: &Api<BuildJob>, name: &str, status: &BuildJobStatus) -> Result<()> {
    let body = serde_json::json!({
        "apiVersion": "buildshuttle.akkeris.io/v1",
        "kind": "BuildJob",
        "status": status,
    });
    jobs.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err("writing the BuildJob status"))?;
    Ok(())
}

/// How long a new BuildJob waits for its credentials Secret.
pub const SECRET_WAIT: Duration = Duration::from_secs(120);

async fn read_secret(client: &Client, ns: &str, secret: &str) -> Result<Option<KubeSecret>> {
    let secrets: Api<KubeSecret> = Api::namespaced(client.clone(), ns);
    secrets
        .get_opt(secret)
        .await
        .map_err(kube_err("reading the credentials Secret"))
}

fn callback_auth(secret: Option<&KubeSecret>) -> Option<Secret> {
    secret
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(secret_keys::CALLBACK_AUTH))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(Secret::new)
}

/// Delivers one callback (with the bounded retries of `Callbacks`). A callback that cannot
/// be delivered is reported as a Warning event and counted as sent, as in local mode.
async fn send_callback(ctx: &Context, job: &BuildJob, auth: Option<&Secret>, kind: CallbackKind) {
    let Some(url) = job.spec.callback.as_deref().filter(|u| !u.is_empty()) else {
        return;
    };
    let status = match kind {
        CallbackKind::Pending => "pending",
        CallbackKind::Final(s) => s,
    };
    if let Err(e) = ctx
        .callbacks
        .deliver(url, auth, job.spec.build_number, status)
        .await
    {
        tracing::warn!(job = %job.name_any(), error = %e, "callback not delivered");
        ctx.observer.callback_failed();
        let note = EventNote {
            warning: true,
            reason: "CallbackFailed".into(),
            note: format!("the {status} callback was not delivered: {e}"),
        };
        publish(ctx, job, &note).await;
    }
}

/// Events are for people; failing to record one never fails a reconcile.
async fn publish(ctx: &Context, job: &BuildJob, e: &EventNote) {
    let ev = Event {
        type_: if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: e.reason.clone(),
        note: Some(e.note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &job.object_ref(&())).await {
        tracing::debug!(job = %job.name_any(), error = %err, "could not record an event");
    }
}

pub fn error_policy(job: Arc<BuildJob>, err: &Error, _ctx: Arc<Context>) -> Requeue {
    if err.is_permanent() {
        tracing::error!(job = %job.name_any(), error = %err, "cannot reconcile this BuildJob until it or the configuration (or RBAC) changes; retrying in 5 minutes");
        Requeue::requeue(Duration::from_secs(300))
    } else {
        tracing::warn!(job = %job.name_any(), error = %err, "reconcile failed; retrying");
        Requeue::requeue(Duration::from_secs(10))
    }
}

/// Runs the controller over BuildJobs in `namespace` and their worker pods (only ours, by
/// label) until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: &str,
    make_ctx: impl FnOnce(Store<BuildJob>) -> Context,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let jobs: Api<BuildJob> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let controller = Controller::new(jobs, watcher::Config::default()).owns(
        pods,
        watcher::Config::default().labels(labels::WORKER_SELECTOR),
    );
    let ctx = Arc::new(make_ctx(controller.store()));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(job = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::CallbacksSent;
    use crate::operator::decide::tests::{ended_pod, job, success_message, JOB};
    use crate::operator::mock::{self, status_error, Expect, Receiver};
    use crate::operator::pod::tests::settings as pod_settings;
    use crate::operator::pod::DockerMode;
    use crate::operator::NoObserver;
    use base64::Engine;
    use http::Method;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::reflector;
    use serde_json::{json, Value};

    const PODS: &str = "/api/v1/namespaces/builds/pods";
    const STATUS: &str = "/apis/buildshuttle.akkeris.io/v1/namespaces/builds/buildjobs/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12/status";

    fn pod_path(attempt: u32) -> String {
        format!("{PODS}/{}", pod_name(JOB, attempt))
    }

    /// What the API server answers to a status patch (the object; its content is not used).
    fn job_json() -> Value {
        serde_json::to_value(job(Some(Phase::Running))).unwrap_or_default()
    }

    fn secret_path() -> String {
        format!("/api/v1/namespaces/builds/secrets/{JOB}-credentials")
    }

    fn secret_json() -> Value {
        let b64 = base64::engine::general_purpose::STANDARD.encode("cb-token");
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{JOB}-credentials"), "namespace": "builds"},
               "data": {"callback_auth": b64}})
    }

    fn context(client: Client, others: Vec<BuildJob>) -> Arc<Context> {
        let (store, mut writer) = reflector::store();
        for j in others {
            writer.apply_watcher_event(&watcher::Event::Apply(j));
        }
        let settings = decide::Settings {
            max_parallel: 2,
            max_pod_retries: 2,
            finished_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(1200),
            stuck_grace: Duration::from_secs(120),
        };
        Arc::new(Context::new(
            client,
            Reporter {
                controller: "buildshuttle".into(),
                instance: Some("test".into()),
            },
            settings,
            pod_settings(DockerMode::Dind),
            Callbacks::new(Duration::from_secs(2)),
            store,
            Arc::new(NoObserver),
        ))
    }

    fn job_with(phase: Option<Phase>, callback: &str, pending_sent: bool) -> BuildJob {
        let mut j = job(phase);
        j.spec.callback = Some(callback.to_string());
        j.metadata.creation_timestamp = Some(Time(Timestamp::now()));
        let mut st = j.status.clone().unwrap_or_default();
        st.callbacks.pending = pending_sent;
        st.start_time = Some(Time(Timestamp::now()));
        j.status = Some(st);
        j
    }

    fn other(name: &str, phase: Phase) -> BuildJob {
        let mut j = job(Some(phase));
        j.metadata.name = Some(name.into());
        j
    }

    async fn play(
        job: BuildJob,
        others: Vec<BuildJob>,
        scenario: Vec<Expect>,
    ) -> (Result<Requeue>, mock::Seen) {
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, others);
        let res = tokio::time::timeout(Duration::from_secs(20), reconcile(Arc::new(job), ctx))
            .await
            .unwrap_or_else(|_| panic!("reconcile hung"));
        let seen = verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        (res, seen)
    }

    fn running_pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name(JOB, 0), "namespace": "builds"},
               "status": {"phase": "Running"}})
    }

    #[tokio::test]
    async fn a_new_job_gets_its_pod_its_status_and_one_pending_callback() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(
                Method::GET,
                pod_path(0),
                404,
                Some(status_error(404, "NotFound")),
            ),
            Expect::new(Method::POST, PODS, 201, None).check(|b| {
                assert_eq!(b["metadata"]["name"], pod_name(JOB, 0));
                assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "BuildJob");
                assert_eq!(b["spec"]["restartPolicy"], "Never");
            }),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json())).check(|b| {
                assert_eq!(b["status"]["phase"], "Pending");
                assert_eq!(b["status"]["callbacks"]["pending"], false);
            }),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json())).check(|b| {
                assert_eq!(b["status"]["callbacks"]["pending"], true);
            }),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["pending"]);
        let got = rx.got.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got[0].0, "cb-token");
        assert_eq!(
            got[0].1,
            json!({"id": 12, "status": "pending", "building": false, "type": "buildshuttle"})
        );
        assert!(
            seen.events.iter().any(|e| e["reason"] == "Started"),
            "{:?}",
            seen.events
        );
    }

    #[tokio::test]
    async fn a_full_queue_queues_without_a_pod() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, true);
        j.status = Some(BuildJobStatus {
            callbacks: CallbacksSent {
                pending: true,
                final_: false,
            },
            ..Default::default()
        });
        let others = vec![other("a-1", Phase::Running), other("b-1", Phase::Pending)];
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(
                Method::GET,
                pod_path(0),
                404,
                Some(status_error(404, "NotFound")),
            ),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json()))
                .check(|b| assert_eq!(b["status"]["phase"], "Queued")),
        ];
        let (res, seen) = play(j, others, scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(rx.statuses().is_empty());
        assert!(seen.events.iter().any(|e| e["reason"] == "Queued"));
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_written() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, true);
        // The status a previous reconcile wrote for a running pod.
        let d = decide::decide(
            &Inputs {
                job: &j,
                pod: serde_json::from_value::<Pod>(running_pod()).ok().as_ref(),
                running: 0,
                queued_ahead: 0,
                now: Timestamp::now(),
            },
            &context(mock::client().0, vec![]).settings,
        );
        j.status = Some(d.status);
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(Method::GET, pod_path(0), 200, Some(running_pod())),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(seen.events.is_empty());
    }

    #[tokio::test]
    async fn a_finished_pod_is_recorded_then_the_final_callback_sent_once() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let msg = success_message();
        let pod = serde_json::to_value(ended_pod("Succeeded", None, 0, "Completed", Some(&msg)))
            .unwrap_or_default();
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(Method::GET, pod_path(0), 200, Some(pod)),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json())).check(|b| {
                assert_eq!(b["status"]["phase"], "Succeeded");
                assert_eq!(b["status"]["image"], "r/a:1.12");
                assert_eq!(b["status"]["digest"], "sha256:abc");
                assert_eq!(
                    b["status"]["callbacks"]["final"], false,
                    "recorded only after delivery"
                );
            }),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json()))
                .check(|b| assert_eq!(b["status"]["callbacks"]["final"], true)),
        ];
        let (res, _) = play(j.clone(), vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"]);

        // The next reconcile (status now recorded) sends nothing and calls nothing.
        let mut done = j;
        done.status = Some(BuildJobStatus {
            phase: Some(Phase::Succeeded),
            completion_time: Some(Time(Timestamp::now())),
            callbacks: CallbacksSent {
                pending: true,
                final_: true,
            },
            ..Default::default()
        });
        let (res, _) = play(done, vec![], vec![]).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"], "never twice");
    }

    #[tokio::test]
    async fn cancel_deletes_the_pod_and_reports_failed() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, true);
        j.spec.cancelled = true;
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(Method::GET, pod_path(0), 200, Some(running_pod())),
            Expect::new(Method::DELETE, pod_path(0), 200, Some(running_pod())),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json())).check(|b| {
                assert_eq!(b["status"]["phase"], "Failed");
                assert_eq!(b["status"]["conditions"][0]["reason"], "Cancelled");
                assert_eq!(b["status"]["conditions"][0]["status"], "False");
            }),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json()))
                .check(|b| assert_eq!(b["status"]["callbacks"]["final"], true)),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["failed"]);
        assert!(seen
            .events
            .iter()
            .any(|e| e["reason"] == "Cancelled" && e["type"] == "Warning"));
    }

    #[tokio::test]
    async fn a_finished_job_past_its_ttl_is_deleted() {
        let mut j = job(Some(Phase::Failed));
        j.status = Some(BuildJobStatus {
            phase: Some(Phase::Failed),
            completion_time: Some(Time(Timestamp::UNIX_EPOCH)),
            callbacks: CallbacksSent {
                pending: true,
                final_: true,
            },
            ..Default::default()
        });
        let path = "/apis/buildshuttle.akkeris.io/v1/namespaces/builds/buildjobs/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12";
        let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200});
        let (res, _) = play(
            j,
            vec![],
            vec![Expect::new(Method::DELETE, path, 200, Some(ok))],
        )
        .await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_pod_the_api_server_refuses_fails_the_build() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(
                Method::GET,
                pod_path(0),
                404,
                Some(status_error(404, "NotFound")),
            ),
            Expect::new(Method::POST, PODS, 422, Some(status_error(422, "Invalid"))),
            Expect::new(Method::PATCH, STATUS, 200, Some(job_json())).check(|b| {
                assert_eq!(b["status"]["phase"], "Failed");
                assert_eq!(b["status"]["conditions"][0]["reason"], "PodRejected");
            }),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(Duration::from_secs(1))));
        assert!(seen.events.iter().any(|e| e["reason"] == "PodRejected"));
    }

    #[tokio::test]
    async fn a_queued_job_behind_a_full_queue_costs_no_api_call() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Queued), &rx.url, true);
        if let Some(s) = j.status.as_mut() {
            s.pod_name = None;
        }
        let others = vec![other("a-1", Phase::Running), other("b-1", Phase::Pending)];
        let (res, seen) = play(j, others, vec![]).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(decide::QUEUED_RECHECK)));
        assert!(seen.events.is_empty());
    }

    #[tokio::test]
    async fn a_new_job_waits_for_its_credentials_secret() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let scenario = vec![Expect::new(
            Method::GET,
            secret_path(),
            404,
            Some(status_error(404, "NotFound")),
        )];
        let (res, seen) = play(j, vec![], scenario).await;
        let action = res.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(action, Requeue::requeue(Duration::from_secs(2)));
        assert!(
            rx.statuses().is_empty(),
            "no callback without its Authorization"
        );
        assert!(seen.events.is_empty());
    }

    #[tokio::test]
    async fn api_errors_are_transient_and_bad_pods_permanent() {
        let j = job_with(Some(Phase::Running), "http://127.0.0.1:9/cb", true);
        let scenario = vec![
            Expect::new(Method::GET, secret_path(), 200, Some(secret_json())),
            Expect::new(
                Method::GET,
                pod_path(0),
                500,
                Some(status_error(500, "InternalError")),
            ),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        let err = res.err().unwrap_or_else(|| panic!("expected an error"));
        assert!(!err.is_permanent(), "{err}");
        assert!(Error::Pod(PodError::NoUid).is_permanent());
    }
}
