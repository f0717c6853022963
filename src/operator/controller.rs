//! The reconciler: a thin shell around `decide` and `worker_pod`. Every reconcile decides
//! from a BuildJob at least as new as this process's last write of it (the cached copy when
//! it is exactly that write, else a fresh read: the cache lags the controller's own writes)
//! and from its worker pod (the pod watch's copy where a stale one is harmless), asks
//! `decide`, and applies the actions: pods, the finalizer, status (server-side apply on
//! /status carrying the resourceVersion it was computed from, only when it changed). Events
//! are published and callbacks sent (recorded in flight first) off the reconcile path.

use super::crd::{labels, secret_keys, secret_name, BuildJob, BuildJobStatus, Phase, FINALIZER};
use super::decide::{self, Action, CallbackPlan, Decision, EventNote, Inputs};
use super::pod::{pod_name, worker_pod, PodError, PodSettings};
use super::{notify, Observer};
use crate::callback::Callbacks;
use crate::secret::Secret;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret as KubeSecret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{self, Action as Requeue};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::utils::{CancelableJoinHandle, StreamBackoff};
use kube::runtime::watcher::{self, watcher, DefaultBackoff};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;

/// The one field manager of BuildJob status.
pub const FIELD_MANAGER: &str = "buildshuttle-controller";

/// Reconciles running at once: a new leader with many unfinished builds must not hit the
/// API server with all of them at the same moment.
pub const CONCURRENCY: u16 = 16;

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
    #[error("cannot build a JSON patch of the BuildJob's finalizers: {0}")]
    Patch(serde_json::Error),
    /// The BuildJob changed since it was read: read it again (not a failure).
    #[error("the BuildJob changed while it was being reconciled; reading it again")]
    Stale,
}

impl Error {
    /// Permanent errors wait for the BuildJob (or the configuration) to change; the rest are
    /// retried with a growing delay.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Pod(_) | Error::NoNamespace(_) | Error::Patch(_) => true,
            Error::Stale => false,
            Error::Kube { source, .. } => {
                matches!(source, kube::Error::Api(s) if s.is_invalid() || s.is_forbidden())
            }
        }
    }
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| match source {
        kube::Error::Api(s) if s.is_conflict() => Error::Stale,
        source => Error::Kube { what, source },
    }
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
    /// CALLBACK_RETRY_SECONDS: how long one callback is retried before it is given up.
    pub callback_budget: Duration,
    /// This controller's identity (the Lease holder name): recorded on in-flight callbacks.
    pub identity: String,
    /// The controller's cache of BuildJobs (the queue is counted from it).
    pub store: Store<BuildJob>,
    /// Jobs this process started whose status the cache may not show yet, so two
    /// reconciles in a row never over-fill the slots.
    pub starting: Mutex<HashSet<String>>,
    /// BuildJob uids with a callback being sent by this process.
    pub sending: Mutex<HashSet<String>>,
    /// The callbacks in flight this process recorded, started and saw.
    pub(crate) in_flight: notify::InFlightLog,
    /// How long a sender may try (`notify::sender_life`; tests shorten it).
    pub(crate) sender_life: Duration,
    /// The callback senders and log-end writers, across leadership terms: a shutdown
    /// waits for them.
    pub(crate) senders: tokio_util::task::TaskTracker,
    /// Where the end of a log the controller owes is written (`None`: nowhere; tests).
    pub(crate) log_ends: Option<super::logend::LogEnds>,
    /// BuildJob uids whose log end this process is writing, or wrote and recorded.
    pub(crate) ending_logs: Mutex<HashSet<String>>,
    /// Cancelled when this leadership term ends (`run` returns or is dropped: a shutdown,
    /// a lost Lease): the log-end writers it started stop, so the next leader, which
    /// writes whatever is not recorded, is not writing the same end beside them.
    pub(crate) term: tokio_util::sync::CancellationToken,
    /// Consecutive failed reconciles per BuildJob (for backoff).
    failures: Mutex<HashMap<String, u32>>,
    /// What this process wrote to each BuildJob, shared with the facade (see `OwnWrites`).
    own: Arc<OwnWrites>,
    /// The worker pods as the pod watch last saw them (without spec and managedFields),
    /// read instead of the API server where a stale copy is harmless (`run` sets it; unset,
    /// every pod is read fresh).
    pub(crate) pod_cache: Option<Store<Pod>>,
    pub observer: Arc<dyn Observer>,
    /// Whether the installed CRD declares what this version writes: nothing is reconciled
    /// while it does not (its API server would drop part of every status written).
    pub(crate) crd: super::crd_check::CrdCheck,
}

/// What this process itself wrote, kept across leadership terms and shared by the facade
/// (which creates BuildJobs and their Secrets) and the controller (which writes status):
///
/// - the resourceVersion our last write of each BuildJob (by uid) returned. A cached copy
///   carrying that version is the object as we wrote it: the cache has caught up with our
///   own writes, so it serves where a fresh GET would (equality is all the API conventions
///   promise about resourceVersions, and all this needs). A BuildJob the facade just
///   created is decided from the watch's copy of it, with no read.
/// - the callback Authorization of each BuildJob whose own credentials Secret exists and is
///   owned by it (this process created or read it), which does not change: a pod start need
///   not read it again.
#[derive(Default)]
pub struct OwnWrites {
    written: Mutex<HashMap<String, String>>,
    credentials: Mutex<HashMap<String, CallbackSecrets>>,
}

/// Past this many BuildJobs the maps start over (a replica that never leads prunes nothing;
/// forgetting costs a read, nothing else).
const OWN_WRITES_MAX: usize = 16_384;

impl OwnWrites {
    /// Notes the resourceVersion a write of ours returned.
    pub fn wrote(&self, job: &BuildJob) {
        if let (Some(uid), Some(rv)) = (job.uid(), job.resource_version()) {
            insert_bounded(&mut lock(&self.written), uid, rv);
        }
    }

    /// Notes the callback secrets of a BuildJob whose own Secret exists.
    pub fn secret_known(&self, job: &BuildJob, auth: CallbackSecrets) {
        if let Some(uid) = job.uid() {
            insert_bounded(&mut lock(&self.credentials), uid, auth);
        }
    }

    /// Forgets our last write of `job`: a later one may have committed unseen.
    pub(crate) fn unsure(&self, job: &BuildJob) {
        if let Some(uid) = job.uid() {
            lock(&self.written).remove(&uid);
        }
    }

    pub(crate) fn is_last_write(&self, cached: &BuildJob) -> bool {
        let (Some(uid), Some(rv)) = (cached.uid(), cached.resource_version()) else {
            return false;
        };
        lock(&self.written).get(&uid) == Some(&rv)
    }

    pub(crate) fn known_credentials(&self, job: &BuildJob) -> Option<CallbackSecrets> {
        lock(&self.credentials).get(&job.uid()?).cloned()
    }

    fn forget(&self, uid: &str) {
        lock(&self.written).remove(uid);
        lock(&self.credentials).remove(uid);
    }

    /// Keeps only BuildJobs still in the controller's cache, once a map has grown past it
    /// (amortised; `forget` handles the usual ends).
    fn prune(&self, store: &Store<BuildJob>) {
        let cached = store.len();
        let over = |n: usize| n > 2 * cached + 64;
        if !over(lock(&self.written).len()) && !over(lock(&self.credentials).len()) {
            return;
        }
        let live: HashSet<String> = store.state().iter().filter_map(|j| j.uid()).collect();
        lock(&self.written).retain(|uid, _| live.contains(uid));
        lock(&self.credentials).retain(|uid, _| live.contains(uid));
    }
}

fn insert_bounded<V>(map: &mut HashMap<String, V>, uid: String, v: V) {
    if map.len() >= OWN_WRITES_MAX && !map.contains_key(&uid) {
        map.clear();
    }
    map.insert(uid, v);
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        reporter: Reporter,
        settings: decide::Settings,
        pods: PodSettings,
        callbacks: Callbacks,
        callback_budget: Duration,
        store: Store<BuildJob>,
        observer: Arc<dyn Observer>,
        own: Arc<OwnWrites>,
    ) -> Self {
        let identity = reporter
            .instance
            .clone()
            .unwrap_or_else(|| reporter.controller.clone());
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            pods,
            callbacks,
            callback_budget,
            identity,
            store,
            starting: Mutex::new(HashSet::new()),
            sending: Mutex::new(HashSet::new()),
            in_flight: notify::InFlightLog::default(),
            sender_life: notify::sender_life(callback_budget),
            senders: tokio_util::task::TaskTracker::new(),
            log_ends: None,
            ending_logs: Mutex::new(HashSet::new()),
            term: tokio_util::sync::CancellationToken::new(),
            failures: Mutex::new(HashMap::new()),
            own,
            pod_cache: None,
            observer,
            crd: super::crd_check::CrdCheck::off(),
        }
    }

    /// Tracks the callback senders in `senders` (`KubernetesMode::shutdown` waits for them).
    pub fn with_senders(mut self, senders: tokio_util::task::TaskTracker) -> Self {
        self.senders = senders;
        self
    }

    /// Writes the log ends the controller owes to `ends` (storage and Kafka).
    pub fn with_log_ends(mut self, ends: super::logend::LogEnds) -> Self {
        self.log_ends = Some(ends);
        self
    }

    /// Reconciles nothing while `check` finds the installed CRD stale.
    pub fn with_crd_check(mut self, check: super::crd_check::CrdCheck) -> Self {
        self.crd = check;
        self
    }

    /// Notes the resourceVersion a write of ours returned.
    pub(crate) fn wrote(&self, job: &BuildJob) {
        self.own.wrote(job);
        self.own.prune(&self.store);
    }

    fn forget(&self, job: &BuildJob) {
        if let Some(uid) = job.uid() {
            self.own.forget(&uid);
            self.in_flight.forget(&uid);
            lock(&self.ending_logs).remove(&uid);
        }
    }

    /// Notes the callback secrets of a BuildJob whose own Secret was read.
    pub(crate) fn credentials_read(&self, job: &BuildJob, auth: CallbackSecrets) {
        self.own.secret_known(job, auth);
        self.own.prune(&self.store);
    }

    /// `Some(auth)` if this BuildJob's own Secret was read (or created) before.
    pub(crate) fn known_credentials(&self, job: &BuildJob) -> Option<CallbackSecrets> {
        self.own.known_credentials(job)
    }

    /// The pod cache's view of pod `name`: `None` without a cache, `Some(None)` if the
    /// watch has not seen it.
    fn cached_pod(&self, ns: &str, name: &str) -> Option<Option<Arc<Pod>>> {
        let cache = self.pod_cache.as_ref()?;
        Some(cache.get(&ObjectRef::new(name).within(ns)))
    }

    /// Whether `cached` is exactly the object our last write of it returned.
    pub(crate) fn is_our_last_write(&self, cached: &BuildJob) -> bool {
        self.own.is_last_write(cached)
    }

    /// (others holding a slot, queued jobs older than `job`), and tells the observer how
    /// many BuildJobs wait and run. It runs on every reconcile (queued re-checks
    /// included), so it is one pass over the cache that copies and hashes nothing, plus a
    /// look-up per job this process is starting.
    fn queue_position(&self, job: &BuildJob) -> (usize, usize) {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        let ns = job.metadata.namespace.as_deref();
        let key = |j: &BuildJob| j.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let mine = (key(job), name);
        let waits = |j: &BuildJob| {
            j.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_none_or(|p| p == Phase::Queued)
        };
        let ahead_of_me = |j: &BuildJob| {
            waits(j)
                && !j.spec.cancelled
                && j.metadata.deletion_timestamp.is_none()
                && (key(j), j.metadata.name.as_deref().unwrap_or_default()) < mine
        };
        let (mut running, mut ahead) = (0, 0);
        let (mut all_queued, mut all_running) = (0, 0);
        for other in self.store.state() {
            let phase = other.status.as_ref().and_then(|s| s.phase);
            match phase {
                Some(p) if p.holds_slot() => all_running += 1,
                None | Some(Phase::Queued) if !other.spec.cancelled => all_queued += 1,
                _ => {}
            }
            if other.metadata.name.as_deref() == Some(name)
                || other.metadata.namespace.as_deref() != ns
            {
                continue;
            }
            if phase.is_some_and(Phase::holds_slot) {
                running += 1;
            } else if ahead_of_me(&other) {
                ahead += 1;
            }
        }
        self.observer.queue(all_queued, all_running);
        // Jobs this process started that the cache still shows waiting hold a slot too.
        let mut starting = lock(&self.starting);
        starting.retain(|n| {
            let mut r = ObjectRef::new(n);
            r.namespace = ns.map(str::to_string);
            let Some(other) = self.store.get(&r) else {
                return false; // gone (deleted while starting)
            };
            if !waits(&other) {
                return false; // the cache caught up with (or passed) the start
            }
            if n != name {
                running += 1;
                if ahead_of_me(&other) {
                    ahead -= 1;
                }
            }
            true
        });
        (running, ahead)
    }

    /// How long a callback recorded in flight by another sender is trusted, from when this
    /// process first saw the record (`notify::takeover_after`).
    pub fn callback_takeover_after(&self) -> Duration {
        self.sender_life + notify::TAKEOVER_MARGIN
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where one reconcile's time went, step by step (logged at debug under the target
/// `buildshuttle::reconcile_timing`, for benches/kube_scale.sh).
pub(crate) struct Laps {
    last: std::time::Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new(start: std::time::Instant) -> Self {
        Laps {
            last: start,
            steps: Vec::new(),
        }
    }

    /// Ends the step `what` now.
    fn lap(&mut self, what: &'static str) {
        let now = std::time::Instant::now();
        self.steps.push((what, now - self.last));
        self.last = now;
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (what, d) in &self.steps {
            out.push_str(&format!("{what}={} ", d.as_micros()));
        }
        out
    }
}

pub async fn reconcile(cached: Arc<BuildJob>, ctx: Arc<Context>) -> Result<Requeue> {
    let started = std::time::Instant::now();
    let mut laps = Laps::new(started);
    let res = reconcile_inner(cached.clone(), ctx.clone(), &mut laps).await;
    let took = started.elapsed();
    ctx.observer.reconciled(took.as_secs_f64());
    laps.lap("end");
    tracing::debug!(target: "buildshuttle::reconcile_timing", job = %cached.name_any(), total_us = took.as_micros() as u64, ok = res.is_ok(), steps = %laps.render(), "reconcile timing");
    if res.is_ok() {
        lock(&ctx.failures).remove(&cached.name_any());
    }
    res
}

async fn reconcile_inner(
    cached: Arc<BuildJob>,
    ctx: Arc<Context>,
    laps: &mut Laps,
) -> Result<Requeue> {
    let name = cached.name_any();
    // On a CRD older than this version (applied while leading), no side effect: the status
    // it records would lose fields. `crd_check` logs why; the check sees the fix.
    if ctx.crd.refusal().is_some() {
        tracing::debug!(job = %name, "not reconciled: the BuildJob CRD installed is stale");
        return Ok(Requeue::requeue(super::crd_check::RECHECK));
    }
    let ns = cached
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &ns);

    // Still waiting, nothing owed: decide would change nothing, so ask the API nothing (a
    // long queue re-checks often). The cached copy is enough to know that much.
    let cached_status = cached.status.clone().unwrap_or_default();
    let may_start = {
        let prev = &cached_status;
        let (running, queued_ahead) = ctx.queue_position(&cached);
        let stopping = cached.spec.cancelled || cached.metadata.deletion_timestamp.is_some();
        let room = running + queued_ahead < ctx.settings.max_parallel;
        let still_queued =
            prev.phase == Some(Phase::Queued) && prev.callbacks.pending && !stopping && !room;
        laps.lap("cache");
        if still_queued {
            return Ok(Requeue::requeue(ctx.settings.queued_recheck));
        }
        room && !stopping && prev.phase.is_none_or(|p| p == Phase::Queued)
    };

    // Decide from a copy at least as new as this controller's last write of the BuildJob,
    // never from an older one: the cache may not have seen that write yet, and acting on
    // what came before it would repeat side effects. The cached copy qualifies when it is
    // exactly what our last write returned; otherwise it is read fresh. At the same time
    // (names from the cached copy, checked against the one decided from): the worker pod,
    // and the credentials Secret when the cached copy says a pod is about to start.
    let from_cache = ctx.is_our_last_write(&cached);
    let guess_pod = (!cached_status.phase.is_some_and(Phase::is_finished))
        .then(|| pod_name(&name, cached_status.pod_retries));
    // The pod watch's copy where that is harmless: a pod it has (it may lag the API
    // server; checked again below before anything it would make irreversible), or its
    // "no such pod" for a job that holds no slot (no pod is counted on yet, and creating one
    // that exists answers AlreadyExists). A job holding a slot, or whose pod this process
    // created (`starting`), reads a pod the watch has not seen (it may just be created).
    let counts_on_pod = |holds_slot: bool| holds_slot || lock(&ctx.starting).contains(&name);
    let cached_holds_slot = cached_status.phase.is_some_and(Phase::holds_slot);
    let pod_from_cache = guess_pod
        .as_ref()
        .and_then(|p| ctx.cached_pod(&ns, p))
        .filter(|p| p.is_some() || !counts_on_pod(cached_holds_slot));
    let known_auth = ctx.known_credentials(&cached);
    let (job, pod, secret) = tokio::join!(
        async {
            if from_cache {
                Ok(Some(cached.clone()))
            } else {
                let job = jobs.get_opt(&name).await;
                job.map(|j| j.map(Arc::new))
                    .map_err(kube_err("reading the BuildJob"))
            }
        },
        async {
            match (&guess_pod, &pod_from_cache) {
                (Some(_), Some(p)) => Ok(p.clone()),
                (Some(p), None) => read_pod(&pods, p).await,
                (None, _) => Ok(None),
            }
        },
        async {
            if may_start && known_auth.is_none() {
                fetch_secret(&ctx.client, &ns, &name).await.map(Some)
            } else {
                Ok(None)
            }
        },
    );
    let Some(mut job) = job? else {
        return Ok(Requeue::await_change());
    };
    laps.lap(if from_cache { "read_cached" } else { "read" });
    let prev = job.status.clone().unwrap_or_default();
    let (running, queued_ahead) = ctx.queue_position(&job);
    let finished = prev.phase.is_some_and(Phase::is_finished);
    let holds_slot = prev.phase.is_some_and(Phase::holds_slot);

    // Whether `pod` is the pod watch's copy.
    let mut pod_cached = false;
    let mut pod = if finished {
        None
    } else {
        let want = pod_name(&name, prev.pod_retries);
        let usable = guess_pod.as_ref() == Some(&want)
            && pod_from_cache
                .as_ref()
                .is_none_or(|p| p.is_some() || !counts_on_pod(holds_slot));
        if usable {
            pod_cached = pod_from_cache.is_some();
            pod?
        } else {
            let pod = read_pod(&pods, &want).await;
            laps.lap("get_pod");
            pod?
        }
    };
    if let Some(p) = pod.as_deref().filter(|p| !owned_by(p, &job)) {
        remove_foreign_pod(&pods, p, ctx.settings.lost_pod_grace).await?;
        return Ok(Requeue::requeue(Duration::from_secs(2)));
    }
    let now = Timestamp::now();
    let decide_with = |pod: Option<&Pod>| {
        decide::decide(
            &Inputs {
                job: &job,
                pod,
                running,
                queued_ahead,
                now,
            },
            &ctx.settings,
        )
    };
    let mut decision = decide_with(pod.as_deref());
    // Ending the build or deleting its pod is decided from the pod as the API server has
    // it, unless the watch's copy has ended (an ended pod's status does not change).
    let irreversible = (decision.status.phase.is_some_and(Phase::is_finished) && !finished)
        || decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::DeletePod { .. }));
    if pod_cached && irreversible && !pod.as_deref().is_some_and(pod_ended) {
        pod = read_pod(&pods, &pod_name(&name, prev.pod_retries)).await?;
        laps.lap("get_pod");
        if let Some(p) = pod.as_deref().filter(|p| !owned_by(p, &job)) {
            remove_foreign_pod(&pods, p, ctx.settings.lost_pod_grace).await?;
            return Ok(Requeue::requeue(Duration::from_secs(2)));
        }
        decision = decide_with(pod.as_deref());
    }
    let Decision {
        mut status,
        actions,
    } = decision;

    // One callback at a time, in order (pending before the final one): whether this
    // controller may send it now (nobody else is at it).
    let owed = actions.iter().find_map(|a| match a {
        Action::SendCallback(kind) => Some(*kind),
        _ => None,
    });
    let job_uid = uid(&job);
    let recorded = status.callbacks.in_flight.as_ref();
    let seen_for = ctx
        .in_flight
        .seen_for(&job_uid, recorded, tokio::time::Instant::now());
    let plan = owed.map(|kind| {
        let here = decide::SenderHere {
            running: lock(&ctx.sending).contains(&job_uid),
            unstarted: recorded.is_some_and(|f| ctx.in_flight.unstarted(&job_uid, f)),
            seen_for,
        };
        let plan = decide::callback_plan(
            &status.callbacks,
            &ctx.identity,
            here,
            ctx.callback_takeover_after(),
        );
        (kind, plan)
    });
    laps.lap("decide");

    // The credentials Secret: its name comes from the BuildJob's name (never from the
    // spec), and only a Secret this BuildJob owns is used. The facade creates it just after
    // the BuildJob, so a young BuildJob waits for it; an old one goes on without (and
    // fails). A pod start needs it here; a callback's sender reads it (off this path)
    // unless it is at hand.
    let starts_pod = actions
        .iter()
        .any(|a| matches!(a, Action::CreatePod { .. }));
    let age = job
        .creation_timestamp()
        .map(|t| Timestamp::now().duration_since(t.0).as_secs())
        .unwrap_or(i64::MAX);
    let waits_for_secret = !finished
        && age < SECRET_WAIT.as_secs() as i64
        && job.metadata.deletion_timestamp.is_none()
        && !job.spec.cancelled;
    let mut auth = notify::Auth::Read {
        wait: waits_for_secret,
    };
    if let Some(a) = ctx.known_credentials(&job) {
        auth = notify::Auth::Known(a);
    } else if starts_pod {
        let secret = match secret? {
            Some(prefetched) => prefetched,
            None => {
                let s = fetch_secret(&ctx.client, &ns, &name).await?;
                laps.lap("get_secret");
                s
            }
        };
        let credentials = owned_secret(secret, &job);
        if credentials.is_none() && waits_for_secret {
            tracing::debug!(job = %name, "waiting for the credentials Secret");
            return Ok(Requeue::requeue(Duration::from_secs(2)));
        }
        let a = callback_secrets(credentials.as_ref());
        match credentials {
            Some(_) => ctx.credentials_read(&job, a.clone()),
            None => {
                tracing::warn!(job = %name, secret = %secret_name(&name), "the credentials Secret is missing (or not owned by this BuildJob); going on without it")
            }
        }
        auth = notify::Auth::Known(a);
    }

    let mut requeue = None;
    let mut events = Vec::new();
    let mut end_log = None;
    let mut delete_job = false;
    let mut remove_finalizer = false;
    for action in actions {
        match action {
            Action::AddFinalizer => {
                job = Arc::new(add_finalizer(&ctx, &jobs, &job).await?);
                laps.lap("add_finalizer");
            }
            Action::RemoveFinalizer => remove_finalizer = true,
            Action::DeletePod {
                name: pod_to_go,
                force,
            } => {
                let mut params = if force {
                    DeleteParams::background().grace_period(0)
                } else {
                    DeleteParams::background()
                };
                // Only the pod this was decided from: a pod of that name made since (for a
                // BuildJob of that name made since) is not this one's to delete.
                params.preconditions = pod
                    .as_deref()
                    .filter(|p| p.name_any() == pod_to_go)
                    .and_then(|p| p.metadata.uid.clone())
                    .map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    });
                match pods.delete(&pod_to_go, &params).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, |s| s.is_not_found() || s.code == 409) => {}
                    Err(e) => return Err(kube_err("deleting the worker pod")(e)),
                }
                laps.lap("delete_pod");
            }
            Action::CreatePod { attempt, .. } => {
                let created = create_pod(&ctx, &pods, &job, attempt).await?;
                laps.lap("create_pod");
                match created {
                    Created::Yes => {
                        lock(&ctx.starting).insert(name.clone());
                        // Each pod gets the whole budget of refusals (a later re-creation
                        // is refused for its own reasons).
                        status.admission_retries = 0;
                        status.last_admission_refusal = None;
                        let ms = since_created(&job, Timestamp::now());
                        status.timings_mut().pod_created_ms = ms;
                    }
                    Created::Foreign => return Ok(Requeue::requeue(Duration::from_secs(2))),
                    Created::RetryLater(message) => {
                        // A quota may free up: try again a few times, the build still
                        // waiting as it was (no slot held without a pod). The time goes
                        // into status because this very write triggers the next reconcile
                        // at once, which must wait out the rest of the backoff (`decide`).
                        let mut st = prev.clone();
                        st.admission_retries += 1;
                        st.last_admission_refusal = Some(Time(Timestamp::now()));
                        write_status(&ctx, &jobs, &job, &st).await?;
                        let note = EventNote {
                            warning: true,
                            reason: "PodRefused".into(),
                            note: format!(
                                "the worker pod was refused (try {} of {}): {message}",
                                st.admission_retries, ctx.settings.max_admission_retries
                            ),
                        };
                        publish_later(&ctx, &job, vec![note]);
                        let wait = decide::admission_backoff(st.admission_retries);
                        return Ok(Requeue::requeue(wait));
                    }
                    Created::Refused(message) => {
                        let (failed, note) = decide::reject(&prev, &message, Timestamp::now());
                        write_status(&ctx, &jobs, &job, &failed).await?;
                        publish_later(&ctx, &job, vec![note]);
                        // The next reconcile sees a finished build and sends the callbacks.
                        return Ok(Requeue::requeue(Duration::from_millis(200)));
                    }
                }
            }
            Action::SendCallback(_) => {}
            Action::RecordEvent(e) => events.push(e),
            Action::Requeue(after) => requeue = Some(after),
            Action::DeleteJob => delete_job = true,
            Action::EndLog(end) => end_log = Some(end),
        }
    }

    // Record who sends the callback before the first byte goes out, in the same status
    // write as what happened.
    let mut send = None;
    match plan {
        Some((kind, CallbackPlan::Send)) => {
            status.callbacks.in_flight = Some(super::crd::CallbackInFlight {
                status: notify::status_word(kind).into(),
                by: ctx.identity.clone(),
                since: Time(now),
            });
            send = Some(kind);
        }
        Some((_, CallbackPlan::Wait(d))) => {
            requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)))
        }
        Some((_, CallbackPlan::InProgress)) | None => {}
    }

    // The status first: what happened is recorded before anyone is told. The sender's life
    // counts from before that write, which anyone else must see before counting a takeover.
    let deadline = tokio::time::Instant::now() + ctx.sender_life;
    if let (Some(_), Some(f)) = (send, &status.callbacks.in_flight) {
        // Before the write: its answer may be lost while it commits.
        ctx.in_flight.writing(&job_uid, f);
    }
    let mut written = None;
    if status.without_timestamps() != prev.without_timestamps() {
        written = Some(write_status(&ctx, &jobs, &job, &status).await?);
        laps.lap("write_status");
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
            if let Some(t) = &status.timings {
                ctx.observer.stages(&t.stages);
            }
            lock(&ctx.starting).remove(&name);
        }
    }
    publish_later(&ctx, &job, events);
    if let Some(kind) = send {
        // The sender starts from the object as written (it records the delivery on it).
        notify::spawn(
            ctx.clone(),
            written.as_ref().unwrap_or(&job),
            auth,
            kind,
            deadline,
        );
    }
    if let Some(end) = end_log {
        // Off this path, as a callback: it may wait for a worker to stop, storage, Kafka.
        // Its record triggers the next reconcile; the re-check covers a writer that died.
        super::logend::spawn(ctx.clone(), written.as_ref().unwrap_or(&job), end);
        requeue = Some(requeue.map_or(LOG_END_RECHECK, |r: Duration| r.min(LOG_END_RECHECK)));
    }
    if remove_finalizer {
        drop_finalizer(&ctx, &jobs, &job).await?;
        laps.lap("drop_finalizer");
        if job.metadata.deletion_timestamp.is_some() {
            ctx.forget(&job);
            return Ok(Requeue::await_change());
        }
        // A finished BuildJob still waits for its TTL (or is past it: deleted below).
    }
    if delete_job {
        tracing::info!(job = %name, "finished BuildJob reached its TTL; deleting it (sources and logs stay in storage)");
        // This BuildJob, not one of its name made since (a build number used again).
        let params = DeleteParams::background().preconditions(Preconditions {
            uid: job.metadata.uid.clone(),
            resource_version: None,
        });
        match jobs.delete(&name, &params).await {
            Ok(_) => {}
            Err(e) if is_status(&e, |s| s.is_not_found() || s.code == 409) => {}
            Err(e) => return Err(kube_err("deleting the finished BuildJob")(e)),
        }
        ctx.forget(&job);
        return Ok(Requeue::await_change());
    }
    Ok(requeue
        .map(Requeue::requeue)
        .unwrap_or_else(Requeue::await_change))
}

/// How soon a BuildJob whose log end is owed is looked at again (its writer records it
/// sooner, which triggers a reconcile of its own).
const LOG_END_RECHECK: Duration = Duration::from_secs(60);

fn uid(job: &BuildJob) -> String {
    job.uid().unwrap_or_default()
}

fn since_created(job: &BuildJob, now: Timestamp) -> Option<u64> {
    let created = job.creation_timestamp()?.0;
    u64::try_from(now.duration_since(created).as_millis()).ok()
}

async fn read_pod(pods: &Api<Pod>, name: &str) -> Result<Option<Arc<Pod>>> {
    let pod = pods.get_opt(name).await;
    pod.map(|p| p.map(Arc::new))
        .map_err(kube_err("reading the worker pod"))
}

/// Whether a pod has ended (Succeeded or Failed are final).
pub(super) fn pod_ended(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

/// Whether `pod` belongs to this BuildJob (not to an earlier one of the same name).
pub(super) fn owned_by(pod: &Pod, job: &BuildJob) -> bool {
    let uid = job.uid();
    pod.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == uid.as_ref())
}

/// A pod with our name that an earlier BuildJob of the same name left: never adopted.
async fn remove_foreign_pod(pods: &Api<Pod>, pod: &Pod, lost_pod_grace: Duration) -> Result<()> {
    let name = pod.name_any();
    // Deleted already, and still there long past its grace period: its node is gone and
    // will never confirm. Forced, as for the build's own pod (`decide`), or a BuildJob of
    // this name would wait for it for ever.
    let lost = matches!(
        decide::classify(Some(pod), Timestamp::now(), lost_pod_grace),
        decide::PodState::Terminating { overdue: true }
    );
    if lost {
        tracing::warn!(pod = %name, "a worker pod of an earlier BuildJob with this name is still terminating long past its grace period (its node is gone); deleting it at once");
    } else {
        tracing::warn!(pod = %name, "a worker pod of an earlier BuildJob with this name is in the way; deleting it");
    }
    let mut params = DeleteParams::background();
    if lost {
        params = params.grace_period(0);
    }
    if let Some(uid) = pod.uid() {
        params = params.preconditions(kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
    }
    match pods.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, |s| s.is_not_found() || s.is_conflict()) => Ok(()),
        Err(e) => Err(kube_err("deleting a foreign worker pod")(e)),
    }
}

enum Created {
    Yes,
    /// A pod of that name belongs to someone else; it is being removed.
    Foreign,
    /// Refused for a reason that may pass (a quota): try again later.
    RetryLater(String),
    /// Refused for good (admission, Pod Security, an invalid spec): the build fails.
    Refused(String),
}

async fn create_pod(
    ctx: &Context,
    pods: &Api<Pod>,
    job: &BuildJob,
    attempt: u32,
) -> Result<Created> {
    let p = match worker_pod(job, attempt, &ctx.pods) {
        Err(e @ PodError::NoUid) => return Err(e.into()),
        Err(e) => return Ok(Created::Refused(e.to_string())),
        Ok(p) => p,
    };
    match pods.create(&PostParams::default(), &p).await {
        Ok(_) => Ok(Created::Yes),
        Err(e) if is_status(&e, |s| s.is_already_exists()) => {
            let existing = pods
                .get_opt(&p.name_any())
                .await
                .map_err(kube_err("reading the worker pod"))?;
            match existing {
                Some(other) if !owned_by(&other, job) => {
                    remove_foreign_pod(pods, &other, ctx.settings.lost_pod_grace).await?;
                    Ok(Created::Foreign)
                }
                _ => Ok(Created::Yes),
            }
        }
        Err(kube::Error::Api(s)) if refuses_the_pod(&s) => {
            let message = format!("the worker pod was refused: {}", s.message);
            let quota = s.message.contains("exceeded quota");
            let retries = job.status.as_ref().map_or(0, |s| s.admission_retries);
            if quota && retries < ctx.settings.max_admission_retries {
                Ok(Created::RetryLater(message))
            } else {
                Ok(Created::Refused(message))
            }
        }
        Err(e) => Err(kube_err("creating the worker pod")(e)),
    }
}

/// Whether the API server's answer to a pod create refuses this pod (no retry makes the
/// same pod acceptable), judged by the HTTP code: an admission webhook's denial comes as
/// 400 with no reason, or with only the code it chose. Not: 404 (the namespace is gone),
/// 409 (handled as AlreadyExists or a conflict), 429 (throttled), 401 and 408 (the
/// controller's credentials or the connection, not the pod): those are retried.
fn refuses_the_pod(s: &kube::core::Status) -> bool {
    match s.code {
        404 | 409 | 429 | 401 | 408 => false,
        400..=499 => true,
        // No code in the answer: only its reason tells.
        0 => s.is_forbidden() || s.is_invalid(),
        _ => false,
    }
}

/// Server-side apply of the whole status, with the resourceVersion of the BuildJob it was
/// computed from: if anything wrote since, the API server answers 409 and the reconcile
/// starts over from a fresh read instead of overwriting newer facts.
pub(crate) async fn write_status(
    ctx: &Context,
    jobs: &Api<BuildJob>,
    job: &BuildJob,
    status: &BuildJobStatus,
) -> Result<BuildJob> {
    let body = serde_json::json!({
        "apiVersion": "buildshuttle.akkeris.io/v1",
        "kind": "BuildJob",
        "metadata": {"resourceVersion": job.resource_version()},
        "status": status,
    });
    let written = jobs
        .patch_status(
            &job.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|e| {
            // No answer (a reset connection, a timeout, a 5xx): the write may have
            // committed, so no copy is known to be our last write until one is read.
            if !is_status(&e, |s| (400..500).contains(&s.code) && s.code != 408) {
                ctx.own.unsure(job);
            }
            kube_err("writing the BuildJob status")(e)
        })?;
    ctx.wrote(&written);
    Ok(written)
}

/// Records a status change on the BuildJob `written` (as a reconcile wrote it), off the
/// reconcile path: `change` makes the new status from the current object, `None` when
/// there is nothing (left) to record. Retries on conflicts (other writers) and API errors;
/// `what` names the change in warnings. `Ok(Some(status))`: written; `Ok(None)`: nothing to
/// record (`change` said so, or the BuildJob is gone or replaced by a new one of the same
/// name); `Err(())`: given up.
pub(crate) async fn record_status(
    ctx: &Context,
    written: &BuildJob,
    what: &str,
    change: impl Fn(&BuildJob) -> Option<BuildJobStatus>,
) -> std::result::Result<Option<BuildJobStatus>, ()> {
    let (name, ns, uid) = (
        written.name_any(),
        written.namespace().unwrap_or_default(),
        written.uid().unwrap_or_default(),
    );
    let jobs: Api<BuildJob> = Api::namespaced(ctx.client.clone(), &ns);
    let mut delay = Duration::from_millis(100);
    // A copy that is exactly our last write serves (as in the reconcile): the one the
    // reconcile wrote, or the cache's. After a conflict, someone else wrote since: read.
    let mut conflict = false;
    for _ in 0..30 {
        let ours = if conflict {
            None
        } else if ctx.is_our_last_write(written) {
            Some(written.clone())
        } else {
            ctx.store
                .get(&ObjectRef::new(&name).within(&ns))
                .filter(|j| ctx.is_our_last_write(j))
                .map(|j| BuildJob::clone(&j))
        };
        let read = match ours {
            Some(j) => Ok(Some(j)),
            None => jobs.get_opt(&name).await,
        };
        match read {
            Ok(Some(job)) if job.uid().as_deref() == Some(uid.as_str()) => {
                let Some(st) = change(&job) else {
                    return Ok(None);
                };
                match write_status(ctx, &jobs, &job, &st).await {
                    Ok(_) => return Ok(Some(st)),
                    Err(Error::Stale) => {
                        conflict = true;
                        continue;
                    }
                    Err(e) => tracing::warn!(job = %name, error = %e, "cannot record {what} yet"),
                }
            }
            // Gone, or replaced by a new BuildJob of the same name: nothing to record.
            Ok(_) => return Ok(None),
            Err(e) => tracing::warn!(job = %name, error = %e, "cannot record {what} yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    Err(())
}

async fn add_finalizer(ctx: &Context, jobs: &Api<BuildJob>, job: &BuildJob) -> Result<BuildJob> {
    let rv = job.resource_version().unwrap_or_default();
    let patch = if job.metadata.finalizers.is_none() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Patch)?;
    let written = jobs
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .map_err(|e| match e {
            // A failed `test` (the object changed) is 422 Invalid or 409: read again.
            kube::Error::Api(s) if s.is_invalid() || s.is_conflict() => Error::Stale,
            e => kube_err("adding the finalizer")(e),
        })?;
    ctx.wrote(&written);
    Ok(written)
}

async fn drop_finalizer(ctx: &Context, jobs: &Api<BuildJob>, job: &BuildJob) -> Result<()> {
    let Some(i) = job.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]))
    .map_err(Error::Patch)?;
    match jobs
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(written) => {
            ctx.wrote(&written);
            Ok(())
        }
        Err(e) if is_status(&e, |s| s.is_not_found()) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_invalid() || s.is_conflict() => Err(Error::Stale),
        Err(e) => Err(kube_err("removing the finalizer")(e)),
    }
}

/// How long a new BuildJob waits for its credentials Secret.
pub const SECRET_WAIT: Duration = Duration::from_secs(120);

/// The BuildJob's credentials Secret, if it exists (whoever owns it).
pub(crate) async fn fetch_secret(
    client: &Client,
    ns: &str,
    job: &str,
) -> Result<Option<KubeSecret>> {
    let secrets: Api<KubeSecret> = Api::namespaced(client.clone(), ns);
    secrets
        .get_opt(&secret_name(job))
        .await
        .map_err(kube_err("reading the credentials Secret"))
}

/// `secret` if this BuildJob owns it.
pub(crate) fn owned_secret(secret: Option<KubeSecret>, job: &BuildJob) -> Option<KubeSecret> {
    let uid = job.uid();
    secret.filter(|s| {
        let ours = s
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref());
        if !ours {
            tracing::warn!(job = %job.name_any(), secret = %s.name_any(), "ignoring a credentials Secret that this BuildJob does not own");
        }
        ours
    })
}

/// What a callback takes from the BuildJob's credentials Secret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallbackSecrets {
    /// The whole URL, when the spec holds it without its userinfo and query.
    pub url: Option<Secret>,
    /// The Authorization value.
    pub auth: Option<Secret>,
}

pub(crate) fn callback_secrets(secret: Option<&KubeSecret>) -> CallbackSecrets {
    let value = |key: &str| {
        secret
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(Secret::new)
    };
    CallbackSecrets {
        url: value(secret_keys::CALLBACK),
        auth: value(secret_keys::CALLBACK_AUTH),
    }
}

/// The API server refuses event notes over 1024 bytes.
pub const EVENT_NOTE_BYTES: usize = 1024;

/// `note` cut to at most `max` bytes, on a character boundary.
pub fn cut_note(note: &str, max: usize) -> String {
    if note.len() <= max {
        return note.to_string();
    }
    let mut end = max;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_string()
}

/// Events are for people; failing to record one never fails a reconcile.
pub(crate) async fn publish(ctx: &Context, job: &ObjectReference, e: &EventNote) {
    let ev = Event {
        type_: if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: e.reason.clone(),
        note: Some(cut_note(&e.note, EVENT_NOTE_BYTES)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, job).await {
        let name = job.name.as_deref().unwrap_or_default();
        tracing::warn!(job = %name, error = %err, "could not record an event");
    }
}

/// Publishes `events` (in order) off the reconcile's path: they are for people, and the
/// reconcile has nothing to wait for (a failure is only logged either way).
pub(crate) fn publish_later(ctx: &Arc<Context>, job: &BuildJob, events: Vec<EventNote>) {
    if events.is_empty() {
        return;
    }
    // Only the reference: many may wait at once when the API server is slow.
    let (ctx, job) = (ctx.clone(), job.object_ref(&()));
    tokio::spawn(async move {
        for e in &events {
            publish(&ctx, &job, e).await;
        }
    });
}

/// The oldest queued BuildJobs, as many as slots are free by the watch cache: the ones a
/// slot freed just now may go to. Each still checks its own place in the queue.
fn queued_to_wake(store: &Store<BuildJob>, max_parallel: usize) -> Vec<ObjectRef<BuildJob>> {
    let mut running = 0;
    let mut queued = Vec::new();
    for j in store.state() {
        match j.status.as_ref().and_then(|s| s.phase) {
            Some(p) if p.holds_slot() => running += 1,
            None | Some(Phase::Queued)
                if !j.spec.cancelled && j.metadata.deletion_timestamp.is_none() =>
            {
                queued.push(j)
            }
            _ => {}
        }
    }
    let free = max_parallel.saturating_sub(running);
    let key = |j: &Arc<BuildJob>| {
        (
            j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            j.metadata.name.clone(),
        )
    };
    queued.sort_by_cached_key(key);
    queued
        .iter()
        .take(free)
        .map(|j| ObjectRef::from_obj(j.as_ref()))
        .collect()
}

/// Per-BuildJob exponential backoff with jitter, so throttled retries do not fire in
/// lockstep; a permanent error waits long (until the object or the setup changes).
pub fn error_policy(job: Arc<BuildJob>, err: &Error, ctx: Arc<Context>) -> Requeue {
    if matches!(err, Error::Stale) {
        return Requeue::requeue(Duration::from_millis(100));
    }
    let n = {
        let mut f = lock(&ctx.failures);
        let n = f.entry(job.name_any()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n, err.is_permanent(), fastrand::f64());
    if err.is_permanent() {
        tracing::error!(job = %job.name_any(), error = %err, "cannot reconcile this BuildJob until it or the configuration (or RBAC) changes; retrying in {delay:?}");
    } else {
        tracing::warn!(job = %job.name_any(), error = %err, "reconcile failed; retrying in {delay:?}");
    }
    Requeue::requeue(delay)
}

/// The delay after the `n`th consecutive failure: 1 s doubling to 5 min (permanent errors:
/// 5 min), times a jitter factor in [0.5, 1.5) from `unit` in [0, 1).
pub fn backoff(n: u32, permanent: bool, unit: f64) -> Duration {
    let base = if permanent {
        300.0
    } else {
        (2f64.powi(n.saturating_sub(1).min(9) as i32)).min(300.0)
    };
    Duration::from_secs_f64(base * (0.5 + unit))
}

/// A pod as the pod cache keeps it: what `decide` reads (metadata but managedFields, and
/// status), not the spec.
fn slim_pod(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
}

/// A BuildJob as the cache keeps it: managedFields are for the API server (status goes by
/// server-side apply of the whole status, never from them).
fn slim_job(job: &mut BuildJob) {
    job.metadata.managed_fields = None;
}

/// Runs the controller over BuildJobs in `namespace` and their worker pods (only ours, by
/// label) until `shutdown` resolves. `watch_failing` is set while BuildJobs or pods cannot
/// be listed or watched (CRD missing, RBAC), for `/octhc`.
/// `client` serves the watches (`Clients::streams`); the reconciler's calls go through the
/// context's client.
pub async fn run(
    client: Client,
    namespace: &str,
    instance: Option<&str>,
    make_ctx: impl FnOnce(Store<BuildJob>) -> Context,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    watch_failing: Arc<AtomicBool>,
) {
    let jobs: Api<BuildJob> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    // Only this installation's BuildJobs and pods when INSTANCE_NAME is set.
    let (mut job_watch, mut pod_selector) = (
        watcher::Config::default(),
        labels::WORKER_SELECTOR.to_string(),
    );
    if let Some(s) = labels::instance_selector(instance) {
        job_watch = job_watch.labels(&s);
        pod_selector = format!("{pod_selector},{s}");
    }
    // What `Controller::new(jobs).owns(pods)` wires, except that the pod watch also fills a
    // cache the reconciler reads (Controller keeps it to itself): a BuildJob is reconciled
    // when it or one of its pods changes.
    let (job_store, job_writer) = reflector::store();
    let (pod_store, pod_writer) = reflector::store();
    // A BuildJob that finished frees its slot: wake the queued ones then, rather than at
    // their next re-check. (The reflector has stored the event when it is seen here.)
    let (wake_tx, wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    let job_changes = reflector(job_writer, watcher(jobs, job_watch).modify(slim_job))
        .applied_objects()
        .inspect(move |j| {
            let finished = j.as_ref().ok().and_then(|j| j.status.as_ref()?.phase);
            if finished.is_some_and(Phase::is_finished) {
                // Full: a wake is pending already and will see this one too.
                let _ = wake_tx.try_send(());
            }
        });
    let pod_changes = reflector(
        pod_writer,
        watcher(pods, watcher::Config::default().labels(&pod_selector)).modify(slim_pod),
    )
    .touched_objects();
    let mut triggers = futures::stream::SelectAll::new();
    triggers.push(controller::trigger_self(job_changes, ()).boxed());
    triggers.push(controller::trigger_owners(pod_changes, (), ()).boxed());
    let mut ctx = make_ctx(job_store.clone());
    ctx.pod_cache = Some(pod_store);
    let ctx = Arc::new(ctx);
    let _term = ctx.term.clone().drop_guard();
    let (wake_store, max_parallel) = (job_store.clone(), ctx.settings.max_parallel);
    let wakes = futures::stream::unfold(wake_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    })
    .flat_map(move |()| futures::stream::iter(queued_to_wake(&wake_store, max_parallel)))
    .map(|r| Ok::<_, watcher::Error>(controller::ReconcileRequest::from(r)));
    triggers.push(wakes.boxed());
    // Cleared by anything that shows the watches work again: a reconcile, or a probe list.
    let failing = watch_failing.clone();
    let probing = Arc::new(AtomicBool::new(false));
    let probe_api: Api<BuildJob> = Api::namespaced(ctx.client.clone(), namespace);
    controller::applier(
        |job, ctx| {
            CancelableJoinHandle::spawn(
                reconcile(job, ctx).in_current_span(),
                &tokio::runtime::Handle::current(),
            )
        },
        error_policy,
        ctx,
        job_store,
        // No new reconcile once shutdown begins; running ones finish.
        StreamBackoff::new(triggers, DefaultBackoff::default()).take_until(shutdown),
        controller::Config::default().concurrency(CONCURRENCY),
    )
    .for_each(|res| {
            let failing = failing.clone();
            let (probing, probe_api) = (probing.clone(), probe_api.clone());
            async move {
                match res {
                    Ok((obj, _)) => {
                        failing.store(false, Ordering::Relaxed);
                        tracing::debug!(job = %obj.name, "reconciled")
                    }
                    Err(controller::Error::QueueError(e)) => {
                        failing.store(true, Ordering::Relaxed);
                        tracing::error!(error = %e, "cannot watch BuildJobs or worker pods (is the CRD installed, and may this service account list and watch them?)");
                        // With no BuildJob to reconcile, nothing else would notice the fix.
                        if !probing.swap(true, Ordering::Relaxed) {
                            tokio::spawn(async move {
                                let one = kube::api::ListParams::default().limit(1);
                                while failing.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_secs(2)).await;
                                    if probe_api.list(&one).await.is_ok() {
                                        failing.store(false, Ordering::Relaxed);
                                    }
                                }
                                probing.store(false, Ordering::Relaxed);
                            });
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            }
        })
        .await;
    // Not leading any more: this replica's health no longer depends on the watches.
    watch_failing.store(false, Ordering::Relaxed);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::operator::crd::{CallbackInFlight, CallbacksSent};
    use crate::operator::decide::tests::{ended_pod, job, success_message, JOB};
    use crate::operator::mock::{self, status_error, Expect, Receiver};
    use crate::operator::pod::tests::settings as pod_settings;
    use crate::operator::pod::DockerMode;
    use crate::operator::NoObserver;
    use base64::Engine;
    use http::Method;
    use kube::runtime::reflector;
    use serde_json::{json, Value};

    const PODS: &str = "/api/v1/namespaces/builds/pods";
    const JOB_PATH: &str = "/apis/buildshuttle.akkeris.io/v1/namespaces/builds/buildjobs/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12";
    const STATUS: &str = "/apis/buildshuttle.akkeris.io/v1/namespaces/builds/buildjobs/myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333-12/status";

    fn pod_path(attempt: u32) -> String {
        format!("{PODS}/{}", pod_name(JOB, attempt))
    }

    /// The read of the first worker pod, which does not exist yet.
    fn no_pod_yet() -> Expect {
        Expect::new(
            Method::GET,
            pod_path(0),
            404,
            Some(status_error(404, "NotFound")),
        )
    }

    /// The read of the BuildJob's own credentials Secret.
    fn its_secret() -> Expect {
        Expect::new(Method::GET, secret_path(), 200, Some(secret_json("uid-1")))
    }

    fn secret_path() -> String {
        format!("/api/v1/namespaces/builds/secrets/{JOB}-credentials")
    }

    fn secret_json(owner_uid: &str) -> Value {
        let b64 = base64::engine::general_purpose::STANDARD.encode("cb-token");
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": format!("{JOB}-credentials"), "namespace": "builds",
                            "ownerReferences": [{"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJob", "name": JOB, "uid": owner_uid}]},
               "data": {"callback_auth": b64}})
    }

    fn owned_pod(phase: &str, owner_uid: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name(JOB, 0), "namespace": "builds", "uid": "pod-uid-0",
                            "ownerReferences": [{"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJob", "name": JOB, "uid": owner_uid}]},
               "status": {"phase": phase}})
    }

    fn settings() -> decide::Settings {
        decide::Settings {
            max_parallel: 2,
            max_pod_retries: 2,
            finished_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(1200),
            stuck_grace: Duration::from_secs(120),
            pending_limit: Duration::from_secs(600),
            max_admission_retries: 2,
            lost_pod_grace: Duration::from_secs(60),
            queued_recheck: decide::QUEUED_RECHECK,
        }
    }

    fn context(client: Client, others: Vec<BuildJob>) -> Arc<Context> {
        Arc::new(bare_context(client, others))
    }

    /// A context for tests, with `others` in its BuildJob cache.
    pub(crate) fn bare_context(client: Client, others: Vec<BuildJob>) -> Context {
        let (store, mut writer) = reflector::store();
        for j in others {
            writer.apply_watcher_event(&watcher::Event::Apply(j));
        }
        Context::new(
            client,
            Reporter {
                controller: "buildshuttle".into(),
                instance: Some("test".into()),
            },
            settings(),
            pod_settings(DockerMode::Dind),
            Callbacks::new(Duration::from_secs(2)),
            Duration::from_secs(2),
            store,
            Arc::new(NoObserver),
            Arc::new(OwnWrites::default()),
        )
    }

    /// A BuildJob as the API server holds it: uid, resourceVersion, our finalizer.
    fn job_with(phase: Option<Phase>, callback: &str, pending_sent: bool) -> BuildJob {
        let mut j = job(phase);
        j.spec.callback = Some(callback.to_string());
        j.metadata.creation_timestamp = Some(Time(Timestamp::now()));
        j.metadata.resource_version = Some("1".into());
        j.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let mut st = j.status.clone().unwrap_or_default();
        st.callbacks.pending = pending_sent;
        st.start_time = Some(Time(Timestamp::now()));
        j.status = Some(st);
        j
    }

    fn as_json(j: &BuildJob) -> Value {
        serde_json::to_value(j).unwrap_or_default()
    }

    fn with_rv(j: &BuildJob, rv: &str) -> BuildJob {
        let mut j = j.clone();
        j.metadata.resource_version = Some(rv.into());
        j
    }

    /// `j` as a new job's reconcile writes it (version `rv`): Pending, its pending callback
    /// in flight.
    fn starting(j: &BuildJob, rv: &str) -> BuildJob {
        let mut s = with_rv(j, rv);
        s.status = Some(BuildJobStatus {
            phase: Some(Phase::Pending),
            callbacks: CallbacksSent {
                in_flight: Some(CallbackInFlight {
                    status: "pending".into(),
                    by: "test".into(),
                    since: Time(Timestamp::now()),
                }),
                ..Default::default()
            },
            ..Default::default()
        });
        s
    }

    /// Waits (at most 2 s) for the callback senders `ctx` started to let go.
    async fn until_sent(ctx: &Context) {
        for _ in 0..200 {
            if lock(&ctx.sending).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn other(name: &str, phase: Phase) -> BuildJob {
        let mut j = job(Some(phase));
        j.metadata.name = Some(name.into());
        j
    }

    /// The notify task's call: the status marking `kind` sent, written on the object as the
    /// reconcile wrote it (no read).
    fn recorded(after: &BuildJob, check: impl Fn(&Value) + Send + 'static) -> Vec<Expect> {
        vec![Expect::new(Method::PATCH, STATUS, 200, Some(as_json(after))).check(check)]
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

    #[tokio::test]
    async fn on_a_stale_crd_nothing_is_reconciled() {
        use crate::operator::crd_check::{CrdCheck, CrdState, RECHECK};
        let (client, handle) = mock::client();
        // No API call: no read, no pod, no status write.
        let verifier = mock::verify(handle, vec![]);
        let ctx = Arc::try_unwrap(context(client, vec![]))
            .unwrap_or_else(|_| panic!("one owner"))
            .with_crd_check(CrdCheck::fixed(CrdState::Stale(vec![
                "status.logEnded".into()
            ])));
        let j = job_with(None, "http://127.0.0.1:9/cb", false);
        let res = reconcile(Arc::new(j), Arc::new(ctx)).await;
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(res.ok(), Some(Requeue::requeue(RECHECK)));
    }

    #[test]
    fn a_freed_slot_wakes_the_oldest_queued_jobs_that_fit() {
        let (store, mut writer) = reflector::store::<BuildJob>();
        let mut add = |name: &str, phase: Option<Phase>, age: i64, cancelled: bool| {
            let mut j = job(phase);
            j.metadata.name = Some(name.into());
            j.metadata.creation_timestamp =
                Some(Time(crate::operator::decide::tests::t(100 - age)));
            j.spec.cancelled = cancelled;
            writer.apply_watcher_event(&watcher::Event::Apply(j));
        };
        add("running", Some(Phase::Running), 50, false);
        add("done", Some(Phase::Succeeded), 60, false);
        add("newer", Some(Phase::Queued), 10, false);
        add("older", Some(Phase::Queued), 20, false);
        add("unseen", None, 5, false);
        add("stopped", Some(Phase::Queued), 30, true);
        let names = |max| -> Vec<String> {
            queued_to_wake(&store, max)
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        assert_eq!(names(1), Vec::<String>::new(), "no slot free");
        assert_eq!(names(2), ["older"]);
        assert_eq!(names(10), ["older", "newer", "unseen"]);
    }

    #[tokio::test]
    async fn a_new_job_gets_its_pod_its_finalizer_its_status_and_one_pending_callback() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        j.metadata.finalizers = None;
        let with_finalizer = {
            let mut f = with_rv(&j, "2");
            f.metadata.finalizers = Some(vec![FINALIZER.into()]);
            f
        };
        let in_flight = starting(&with_finalizer, "3");
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            its_secret(),
            Expect::new(Method::POST, PODS, 201, None).check(|b| {
                assert_eq!(b["metadata"]["name"], pod_name(JOB, 0));
                assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "BuildJob");
                assert_eq!(b["spec"]["restartPolicy"], "Never");
            }),
            Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&with_finalizer))).check(|b| {
                assert_eq!(b[0]["op"], "test", "optimistic: {b}");
                assert_eq!(b[1]["value"][0], FINALIZER);
            }),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&in_flight))).check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "2", "computed from rv 2");
                assert_eq!(b["status"]["phase"], "Pending");
                assert_eq!(b["status"]["callbacks"]["pending"], false);
                assert_eq!(b["status"]["callbacks"]["inFlight"]["status"], "pending");
                assert_eq!(b["status"]["callbacks"]["inFlight"]["by"], "test");
                assert!(b["status"]["timings"]["podCreatedMs"].is_u64(), "{b}");
            }),
        ];
        scenario.extend(recorded(&in_flight, |b| {
            assert_eq!(b["metadata"]["resourceVersion"], "3");
            assert_eq!(b["status"]["callbacks"]["pending"], true);
            assert!(b["status"]["callbacks"].get("inFlight").is_none(), "{b}");
            assert_eq!(b["status"]["phase"], "Pending", "nothing else changes");
        }));
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["pending"]);
        let got = rx.got.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got[0].0, "cb-token");
        assert_eq!(
            got[0].1,
            json!({"id": 12, "status": "pending", "building": false, "type": "buildshuttle"})
        );
        assert!(seen.events.iter().any(|e| e["reason"] == "Started"));
    }

    #[tokio::test]
    async fn a_stale_status_write_sends_nothing_and_reads_again() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            its_secret(),
            Expect::new(Method::POST, PODS, 201, None),
            Expect::new(
                Method::PATCH,
                STATUS,
                409,
                Some(status_error(409, "Conflict")),
            ),
        ];
        let (res, _) = play(j.clone(), vec![], scenario).await;
        let err = res
            .err()
            .unwrap_or_else(|| panic!("a conflict is reported"));
        assert!(matches!(err, Error::Stale), "{err}");
        assert!(rx.statuses().is_empty(), "no callback without its record");
        let ctx = context(mock::client().0, vec![]);
        assert_eq!(
            error_policy(Arc::new(j), &err, ctx),
            Requeue::requeue(Duration::from_millis(100))
        );
    }

    #[tokio::test]
    async fn a_callback_another_controller_is_sending_is_not_sent_again() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, false);
        let snapshot = j.clone();
        if let Some(st) = j.status.as_mut() {
            st.callbacks.in_flight = Some(CallbackInFlight {
                status: "pending".into(),
                by: "the-old-leader".into(),
                since: Time(Timestamp::now()),
            });
            st.conditions = decide::decide(
                &Inputs {
                    job: &snapshot,
                    pod: serde_json::from_value::<Pod>(owned_pod("Running", "uid-1"))
                        .ok()
                        .as_ref(),
                    running: 0,
                    queued_ahead: 0,
                    now: Timestamp::now(),
                },
                &settings(),
            )
            .status
            .conditions;
        }
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        let action = res.unwrap_or_else(|e| panic!("{e}"));
        assert!(rx.statuses().is_empty());
        // It looks again once the other sender's whole budget (2 s + 60 s) has passed.
        assert!(action != Requeue::await_change(), "{action:?}");
    }

    #[tokio::test]
    async fn a_full_queue_queues_without_a_pod() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, true);
        j.status = Some(BuildJobStatus {
            callbacks: CallbacksSent {
                pending: true,
                ..Default::default()
            },
            ..Default::default()
        });
        let others = vec![other("a-1", Phase::Running), other("b-1", Phase::Pending)];
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&j)))
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
        let d = decide::decide(
            &Inputs {
                job: &j,
                pod: serde_json::from_value::<Pod>(owned_pod("Running", "uid-1"))
                    .ok()
                    .as_ref(),
                running: 0,
                queued_ahead: 0,
                now: Timestamp::now(),
            },
            &settings(),
        );
        j.status = Some(d.status);
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(seen.events.is_empty());
    }

    /// The job's worker pod, ended Succeeded, and the job as the reconcile records it
    /// (version 2): Succeeded, its final callback in flight.
    fn succeeded_pod_and_its_record(j: &BuildJob) -> (serde_json::Value, BuildJob) {
        let msg = success_message();
        let mut pod =
            serde_json::to_value(ended_pod("Succeeded", None, 0, "Completed", Some(&msg)))
                .unwrap_or_default();
        pod["metadata"]["ownerReferences"] =
            owned_pod("x", "uid-1")["metadata"]["ownerReferences"].clone();
        let mut done = with_rv(j, "2");
        done.status = Some(BuildJobStatus {
            phase: Some(Phase::Succeeded),
            completion_time: Some(Time(Timestamp::now())),
            callbacks: CallbacksSent {
                pending: true,
                final_: false,
                in_flight: Some(CallbackInFlight {
                    status: "succeeded".into(),
                    by: "test".into(),
                    since: Time(Timestamp::now()),
                }),
            },
            ..Default::default()
        });
        (pod, done)
    }

    #[tokio::test]
    async fn a_finished_pod_is_recorded_then_the_final_callback_sent_once() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let (pod, done) = succeeded_pod_and_its_record(&j);
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::GET, pod_path(0), 200, Some(pod)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done))).check(|b| {
                assert_eq!(b["status"]["phase"], "Succeeded");
                assert_eq!(b["status"]["image"], "r/a:1.12");
                assert_eq!(b["status"]["digest"], "sha256:abc");
                assert_eq!(
                    b["status"]["callbacks"]["final"], false,
                    "recorded after delivery"
                );
                assert_eq!(b["status"]["callbacks"]["inFlight"]["status"], "succeeded");
            }),
        ];
        // The sender reads the credentials Secret (off the reconcile's path).
        scenario.push(Expect::new(
            Method::GET,
            secret_path(),
            200,
            Some(secret_json("uid-1")),
        ));
        scenario.extend(recorded(&done, |b| {
            assert_eq!(b["status"]["callbacks"]["final"], true);
            assert!(b["status"]["timings"]["finalCallbackMs"].is_u64(), "{b}");
        }));
        let (res, _) = play(j.clone(), vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"]);
        let got = rx.got.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got[0].0, "cb-token", "the sender used the Secret it read");

        // The next reconcile (everything recorded) sends nothing and writes no status; the
        // finalizer goes, nothing being owed any more.
        let mut all = done.clone();
        if let Some(st) = all.status.as_mut() {
            st.callbacks.final_ = true;
            st.callbacks.in_flight = None;
        }
        let mut released = with_rv(&all, "4");
        released.metadata.finalizers = None;
        let (res, _) = play(
            all.clone(),
            vec![],
            vec![
                Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&all))),
                Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&released))),
            ],
        )
        .await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"], "never twice");
    }

    #[tokio::test]
    async fn a_job_this_process_created_starts_without_reading_it_or_its_secret() {
        let rx = Receiver::start().await;
        // As the facade creates it: our finalizer, no status.
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let in_flight = starting(&j, "2");
        // No GET of the BuildJob or its Secret: the pod (no pod watch in this test), the
        // pod's creation, the status.
        let mut scenario = vec![
            no_pod_yet(),
            Expect::new(Method::POST, PODS, 201, None),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&in_flight))).check(|b| {
                assert_eq!(
                    b["metadata"]["resourceVersion"], "1",
                    "decided from the creation"
                );
                assert_eq!(b["status"]["phase"], "Pending");
            }),
        ];
        scenario.extend(recorded(&in_flight, |b| {
            assert_eq!(b["status"]["callbacks"]["pending"], true);
        }));
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, vec![]);
        // What the facade notes when it has created the BuildJob and then its Secret.
        ctx.own.wrote(&j);
        ctx.own.secret_known(
            &j,
            CallbackSecrets {
                url: None,
                auth: Some(Secret::new("cb-token")),
            },
        );
        let res = reconcile(Arc::new(j), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        until_sent(&ctx).await;
        drop(ctx);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(rx.statuses(), ["pending"]);
        let got = rx.got.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got[0].0, "cb-token", "the Authorization the facade noted");
    }

    #[tokio::test]
    async fn a_cached_copy_of_our_own_last_write_is_not_read_again_an_older_one_is() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let (pod, done) = succeeded_pod_and_its_record(&j);
        let mut all = with_rv(&done, "3");
        if let Some(st) = all.status.as_mut() {
            st.callbacks.final_ = true;
            st.callbacks.in_flight = None;
        }
        let mut released = with_rv(&all, "4");
        released.metadata.finalizers = None;
        let scenario = vec![
            // The first reconcile has no write of ours to trust: it reads.
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::GET, pod_path(0), 200, Some(pod)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done))),
            // The sender: Secret, then the record on what the reconcile wrote (no read; our
            // last write is then version 3).
            its_secret(),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&all))),
            // Version 3 is what our last write returned: not read again; all is sent, so
            // the finalizer goes (version 4).
            Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&released))),
            // The third reconcile's cached copy (version 2) is older than our last write.
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&released))),
        ];
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, vec![]);
        let res = reconcile(Arc::new(j), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        until_sent(&ctx).await;
        assert!(lock(&ctx.sending).is_empty(), "the callback was recorded");
        let res = reconcile(Arc::new(all), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        let res = reconcile(Arc::new(done), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        drop(ctx);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(rx.statuses(), ["succeeded"], "once");
    }

    /// A pod of this BuildJob as the pod watch would have cached it.
    fn cached(mut pod: Pod) -> Pod {
        pod.metadata.namespace = Some("builds".into());
        pod.metadata.owner_references =
            serde_json::from_value(owned_pod("x", "uid-1")["metadata"]["ownerReferences"].clone())
                .ok();
        pod
    }

    /// `play` with the pod watch's cache holding `pods`.
    async fn play_with_pods(
        job: BuildJob,
        pods: Vec<Pod>,
        scenario: Vec<Expect>,
    ) -> (Result<Requeue>, mock::Seen) {
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let mut ctx = context(client, vec![]);
        let (store, mut writer) = reflector::store();
        for p in pods {
            writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        if let Some(c) = Arc::get_mut(&mut ctx) {
            c.pod_cache = Some(store);
        }
        let res = reconcile(Arc::new(job), ctx).await;
        let seen = verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        (res, seen)
    }

    #[tokio::test]
    async fn an_ended_pod_is_taken_from_the_pod_cache() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let msg = success_message();
        let pod = cached(ended_pod("Succeeded", None, 0, "Completed", Some(&msg)));
        let mut done = with_rv(&j, "2");
        done.status = Some(BuildJobStatus {
            phase: Some(Phase::Succeeded),
            ..Default::default()
        });
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            // No pod read.
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done)))
                .check(|b| assert_eq!(b["status"]["phase"], "Succeeded")),
            its_secret(),
        ];
        scenario.extend(recorded(&done, |_| {}));
        let (res, _) = play_with_pods(j, vec![pod], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"]);
    }

    #[tokio::test]
    async fn a_cached_running_pod_is_read_again_before_the_build_is_ended() {
        // The cache says Running, the API server says it succeeded: a cancel that comes
        // too late does not turn a success into a failure.
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, true);
        j.spec.cancelled = true;
        let msg = success_message();
        let mut ended =
            serde_json::to_value(ended_pod("Succeeded", None, 0, "Completed", Some(&msg)))
                .unwrap_or_default();
        ended["metadata"]["ownerReferences"] =
            owned_pod("x", "uid-1")["metadata"]["ownerReferences"].clone();
        let mut done = with_rv(&j, "2");
        done.status = Some(BuildJobStatus {
            phase: Some(Phase::Succeeded),
            ..Default::default()
        });
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::GET, pod_path(0), 200, Some(ended)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done)))
                .check(|b| assert_eq!(b["status"]["phase"], "Succeeded")),
            its_secret(),
        ];
        scenario.extend(recorded(&done, |_| {}));
        let (res, _) =
            play_with_pods(j, vec![cached(decide::tests::pod("Running"))], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"]);
    }

    #[tokio::test]
    async fn a_pod_the_cache_has_not_seen_is_read_for_a_job_holding_a_slot() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
            // What this fixture lacks (pod name, timings) is filled in.
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&with_rv(&j, "2"))))
                .check(|b| assert_eq!(b["status"]["phase"], "Running")),
        ];
        let (res, _) = play_with_pods(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(rx.statuses().is_empty());
    }

    /// The BuildJob as a simulated API server holds it: each status write applied, one
    /// version later.
    #[derive(Clone)]
    struct Held(Arc<Mutex<BuildJob>>);

    impl Held {
        fn new(j: &BuildJob) -> Self {
            Held(Arc::new(Mutex::new(j.clone())))
        }
        /// Applies a status write's body (as committed at version `rv`).
        fn commit(&self, rv: &'static str) -> impl Fn(&Value) + Send + 'static {
            let held = self.clone();
            move |b: &Value| {
                let status: BuildJobStatus =
                    serde_json::from_value(b["status"].clone()).expect("a status");
                let mut j = lock(&held.0);
                j.status = Some(status);
                j.metadata.resource_version = Some(rv.into());
            }
        }
        fn reply(&self) -> impl Fn(&Value) -> Value + Send + 'static {
            let held = self.clone();
            move |_: &Value| as_json(&lock(&held.0))
        }
    }

    #[tokio::test]
    async fn a_callback_record_whose_answer_was_lost_is_sent_by_the_next_reconcile() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let (pod, _) = succeeded_pod_and_its_record(&j);
        let server = Held::new(&j);
        let pod = Some(pod);
        let resent = Arc::new(Mutex::new(None::<CallbackInFlight>));
        let scenario = vec![
            Expect::new(Method::GET, pod_path(0), 200, pod.clone()),
            // Committed, but the answer is lost: no sender starts.
            Expect::new(Method::PATCH, STATUS, 200, None)
                .check({
                    let commit = server.commit("2");
                    move |b| {
                        assert_eq!(b["status"]["callbacks"]["inFlight"]["by"], "test");
                        commit(b)
                    }
                })
                .lost(),
            // The cached copy was our last write, but a later one may have committed: read.
            Expect::new(Method::GET, JOB_PATH, 200, None).reply(server.reply()),
            // (The pod too, as the cached copy is not finished.)
            Expect::new(Method::GET, pod_path(0), 200, pod),
            // Our record, never started: recorded afresh and sent now, not after a takeover.
            Expect::new(Method::PATCH, STATUS, 200, None)
                .check({
                    let commit = server.commit("3");
                    let resent = resent.clone();
                    move |b| {
                        assert_eq!(b["metadata"]["resourceVersion"], "2");
                        assert_eq!(b["status"]["callbacks"]["inFlight"]["by"], "test");
                        *lock(&resent) =
                            serde_json::from_value(b["status"]["callbacks"]["inFlight"].clone())
                                .ok();
                        commit(b)
                    }
                })
                .reply(server.reply()),
            its_secret(),
            Expect::new(Method::PATCH, STATUS, 200, None)
                .check({
                    let commit = server.commit("4");
                    move |b| {
                        assert_eq!(b["metadata"]["resourceVersion"], "3");
                        assert_eq!(b["status"]["callbacks"]["final"], true);
                        assert!(b["status"]["callbacks"].get("inFlight").is_none(), "{b}");
                        commit(b)
                    }
                })
                .reply(server.reply()),
        ];
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, vec![]);
        ctx.own.wrote(&j);
        let res = reconcile(Arc::new(j.clone()), ctx.clone()).await;
        assert!(res.is_err(), "the write's answer was lost: {res:?}");
        assert!(rx.statuses().is_empty());
        // The watch has not brought the committed write: the same cached copy again.
        let res = reconcile(Arc::new(j.clone()), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        until_sent(&ctx).await;
        // Had its record not been written, the ended sender is still known: never adopted.
        let resent = lock(&resent).clone().expect("the record written afresh");
        assert!(!ctx.in_flight.unstarted(&uid(&j), &resent));
        drop(ctx);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(rx.statuses(), ["succeeded"], "once, at once");
    }

    #[tokio::test]
    async fn a_record_in_flight_elsewhere_is_trusted_from_when_this_process_first_saw_it() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let (_, mut old) = succeeded_pod_and_its_record(&j);
        // Recorded "an hour ago" by the old leader's clock: it says nothing of ours.
        if let Some(f) = old
            .status
            .as_mut()
            .and_then(|s| s.callbacks.in_flight.as_mut())
        {
            f.by = "the-old-leader".into();
            f.since = Time(Timestamp::now() - Duration::from_secs(3600));
        }
        let server = Held::new(&old);
        let scenario = vec![
            // First sight: it waits, writes nothing, sends nothing.
            Expect::new(Method::GET, JOB_PATH, 200, None).reply(server.reply()),
            // A whole takeover wait later (by this process's clock): taken over.
            Expect::new(Method::GET, JOB_PATH, 200, None).reply(server.reply()),
            Expect::new(Method::PATCH, STATUS, 200, None)
                .check({
                    let commit = server.commit("3");
                    move |b| {
                        assert_eq!(b["status"]["callbacks"]["inFlight"]["by"], "test");
                        commit(b)
                    }
                })
                .reply(server.reply()),
            its_secret(),
            Expect::new(Method::PATCH, STATUS, 200, None)
                .check(server.commit("4"))
                .reply(server.reply()),
        ];
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, vec![]);
        let takeover = ctx.callback_takeover_after();
        let res = reconcile(Arc::new(old.clone()), ctx.clone()).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(takeover)));
        assert!(rx.statuses().is_empty());
        ctx.in_flight.backdate(&uid(&old), takeover);
        let res = reconcile(Arc::new(old), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        until_sent(&ctx).await;
        drop(ctx);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        assert_eq!(rx.statuses(), ["succeeded"]);
    }

    #[tokio::test]
    async fn a_sender_stops_at_its_deadline_so_a_takeover_never_overlaps_it() {
        // A receiver that takes the request and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/cb", listener.local_addr().expect("addr"));
        let hung = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let j = job_with(Some(Phase::Running), &url, true);
        let (pod, done) = succeeded_pod_and_its_record(&j);
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::GET, pod_path(0), 200, Some(pod)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done))),
            its_secret(),
        ];
        // Given up (and said so) rather than left to a takeover that would send it again.
        scenario.extend(recorded(&done, |b| {
            assert_eq!(b["status"]["callbacks"]["final"], true);
        }));
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let mut ctx = context(client, vec![]);
        if let Some(c) = Arc::get_mut(&mut ctx) {
            c.sender_life = Duration::from_secs(1);
        }
        assert!(ctx.callback_takeover_after() >= ctx.sender_life + notify::TAKEOVER_MARGIN);
        let started = std::time::Instant::now();
        let res = reconcile(Arc::new(j), ctx.clone()).await;
        assert!(res.is_ok(), "{res:?}");
        until_sent(&ctx).await;
        drop(ctx);
        let seen = verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        // Without the deadline the hung request alone lasts the client's 30 s timeout.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let failed = seen
            .events
            .iter()
            .find(|e| e["reason"] == "CallbackFailed")
            .unwrap_or_else(|| panic!("a CallbackFailed event: {:?}", seen.events));
        assert!(
            failed["note"]
                .as_str()
                .unwrap_or("")
                .contains("ran out of time"),
            "{failed}"
        );
        hung.abort();
    }

    #[tokio::test]
    async fn a_sender_whose_record_conflicts_reads_the_job_again() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let msg = success_message();
        let mut pod =
            serde_json::to_value(ended_pod("Succeeded", None, 0, "Completed", Some(&msg)))
                .unwrap_or_default();
        pod["metadata"]["ownerReferences"] =
            owned_pod("x", "uid-1")["metadata"]["ownerReferences"].clone();
        let mut done = with_rv(&j, "2");
        done.status = Some(BuildJobStatus {
            phase: Some(Phase::Succeeded),
            ..Default::default()
        });
        // Someone else wrote after our status write (version 3).
        let other = with_rv(&done, "3");
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::GET, pod_path(0), 200, Some(pod)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&done))),
            its_secret(),
            Expect::new(
                Method::PATCH,
                STATUS,
                409,
                Some(status_error(409, "Conflict")),
            )
            .check(|b| assert_eq!(b["metadata"]["resourceVersion"], "2")),
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&other))),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&other))).check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "3");
                assert_eq!(b["status"]["callbacks"]["final"], true);
            }),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["succeeded"], "sent once");
    }

    #[tokio::test]
    async fn cancel_deletes_the_pod_and_reports_failed() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, true);
        j.spec.cancelled = true;
        let mut failed = with_rv(&j, "2");
        failed.status = Some(BuildJobStatus {
            phase: Some(Phase::Failed),
            callbacks: CallbacksSent {
                pending: true,
                final_: false,
                in_flight: Some(CallbackInFlight {
                    status: "failed".into(),
                    by: "test".into(),
                    since: Time(Timestamp::now()),
                }),
            },
            ..Default::default()
        });
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
            Expect::new(
                Method::DELETE,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            )
            // Only the pod it was decided from.
            .check(|b| assert_eq!(b["preconditions"]["uid"], "pod-uid-0", "{b}")),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&failed))).check(|b| {
                assert_eq!(b["status"]["phase"], "Failed");
                assert_eq!(b["status"]["conditions"][0]["reason"], "Cancelled");
                assert_eq!(b["status"]["conditions"][0]["status"], "False");
            }),
        ];
        // The sender reads the credentials Secret (off the reconcile's path).
        scenario.push(Expect::new(
            Method::GET,
            secret_path(),
            200,
            Some(secret_json("uid-1")),
        ));
        scenario.extend(recorded(&failed, |b| {
            assert_eq!(b["status"]["callbacks"]["final"], true)
        }));
        let (res, seen) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["failed"]);
        assert!(seen
            .events
            .iter()
            .any(|e| e["reason"] == "Cancelled" && e["type"] == "Warning"));
    }

    #[tokio::test]
    async fn a_deleted_running_job_stops_its_pod_sends_failed_then_lets_go() {
        let rx = Receiver::start().await;
        let mut j = job_with(Some(Phase::Running), &rx.url, true);
        j.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let mut failed = with_rv(&j, "2");
        failed.status = Some(BuildJobStatus {
            phase: Some(Phase::Failed),
            completion_time: Some(Time(Timestamp::now())),
            callbacks: CallbacksSent {
                pending: true,
                final_: false,
                in_flight: Some(CallbackInFlight {
                    status: "failed".into(),
                    by: "test".into(),
                    since: Time(Timestamp::now()),
                }),
            },
            ..Default::default()
        });
        let mut scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
            Expect::new(
                Method::DELETE,
                pod_path(0),
                200,
                Some(owned_pod("Running", "uid-1")),
            ),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&failed))).check(|b| {
                assert_eq!(b["status"]["phase"], "Failed");
                assert_eq!(b["status"]["conditions"][0]["reason"], "Deleted");
            }),
        ];
        // The sender reads the credentials Secret (off the reconcile's path).
        scenario.push(Expect::new(
            Method::GET,
            secret_path(),
            200,
            Some(secret_json("uid-1")),
        ));
        scenario.extend(recorded(&failed, |b| {
            assert_eq!(b["status"]["callbacks"]["final"], true)
        }));
        let (res, _) = play(j, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["failed"]);

        // Once the final callback is recorded, the finalizer goes (and nothing is sent).
        let mut sent = failed.clone();
        if let Some(st) = sent.status.as_mut() {
            st.callbacks.final_ = true;
            st.callbacks.in_flight = None;
        }
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&sent))),
            Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&sent))).check(|b| {
                assert_eq!(b[0]["op"], "test");
                assert_eq!(b[1]["op"], "remove");
                assert_eq!(b[1]["path"], "/metadata/finalizers/0");
            }),
        ];
        let (res, _) = play(sent, vec![], scenario).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(rx.statuses(), ["failed"]);
    }

    #[tokio::test]
    async fn a_callback_sender_is_tracked_until_it_has_recorded_its_callback() {
        let rx = Receiver::start().await;
        let j = starting(&job_with(None, &rx.url, false), "2");
        let mut sent = with_rv(&j, "3");
        if let Some(st) = sent.status.as_mut() {
            st.callbacks.pending = true;
            st.callbacks.in_flight = None;
        }
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&sent))),
        ];
        let (client, handle) = mock::client();
        let verifier = mock::verify(handle, scenario);
        let ctx = context(client, vec![]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        notify::spawn(
            ctx.clone(),
            &j,
            notify::Auth::Known(Default::default()),
            decide::CallbackKind::Pending,
            deadline,
        );
        // What a shutdown waits for: the delivery and its record.
        ctx.senders.close();
        tokio::time::timeout(Duration::from_secs(10), ctx.senders.wait())
            .await
            .unwrap_or_else(|_| panic!("the sender never ended"));
        assert_eq!(rx.statuses(), ["pending"]);
        assert!(lock(&ctx.sending).is_empty());
        drop(ctx);
        verifier
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    #[tokio::test]
    async fn a_finished_job_past_its_ttl_is_deleted() {
        let mut j = job_with(Some(Phase::Failed), "http://127.0.0.1:9/cb", true);
        j.status = Some(BuildJobStatus {
            phase: Some(Phase::Failed),
            completion_time: Some(Time(Timestamp::UNIX_EPOCH)),
            callbacks: CallbacksSent {
                pending: true,
                final_: true,
                in_flight: None,
            },
            ..Default::default()
        });
        let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200});
        let mut released = with_rv(&j, "2");
        released.metadata.finalizers = None;
        let uid = j.metadata.uid.clone().unwrap_or_default();
        assert!(!uid.is_empty());
        let (res, _) = play(
            j.clone(),
            vec![],
            vec![
                Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
                // One still holding the finalizer (from before) lets go of it first.
                Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&released))),
                // This BuildJob, not one of its name made since.
                Expect::new(Method::DELETE, JOB_PATH, 200, Some(ok)).check(move |b| {
                    assert_eq!(b["preconditions"]["uid"], uid, "{b}");
                }),
            ],
        )
        .await;
        assert!(res.is_ok(), "{res:?}");
    }

    #[tokio::test]
    async fn a_finished_job_whose_callbacks_are_sent_lets_go_of_its_finalizer_and_waits_for_its_ttl(
    ) {
        let mut j = job_with(Some(Phase::Succeeded), "http://127.0.0.1:9/cb", true);
        if let Some(st) = j.status.as_mut() {
            st.completion_time = Some(Time(Timestamp::now()));
            st.callbacks.final_ = true;
        }
        let mut released = with_rv(&j, "2");
        released.metadata.finalizers = None;
        let uid = j.metadata.uid.clone().unwrap_or_default();
        assert!(!uid.is_empty());
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(Method::PATCH, JOB_PATH, 200, Some(as_json(&released))).check(|b| {
                assert_eq!(b[0]["op"], "test");
                assert_eq!(b[1]["op"], "remove");
                assert_eq!(b[1]["path"], "/metadata/finalizers/0");
            }),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        let Ok(action) = res else { panic!("{res:?}") };
        assert_ne!(action, Requeue::await_change(), "its TTL is still kept");
        assert_ne!(action, Requeue::requeue(Duration::from_millis(100)));
    }

    #[tokio::test]
    async fn a_pod_admission_refuses_fails_the_build_at_once() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let mut refused = status_error(403, "Forbidden");
        refused["message"] = json!("pods \"x\" is forbidden: violates PodSecurity \"baseline:latest\": privileged (container \"dind\" must not set securityContext.privileged=true)");
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            its_secret(),
            Expect::new(Method::POST, PODS, 403, Some(refused)),
            Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&j))).check(|b| {
                assert_eq!(b["status"]["phase"], "Failed");
                assert_eq!(b["status"]["conditions"][0]["reason"], "PodRejected");
                let msg = b["status"]["conditions"][0]["message"]
                    .as_str()
                    .unwrap_or("");
                assert!(msg.contains("PodSecurity"), "the API's message: {msg}");
            }),
        ];
        let (res, seen) = play(j, vec![], scenario).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(Duration::from_millis(200))));
        assert!(seen.events.iter().any(|e| e["reason"] == "PodRejected"));
    }

    #[tokio::test]
    async fn a_webhook_denial_without_a_reason_fails_the_build_at_once() {
        // A validating webhook's denial: 400 and no reason, or only the code it chose.
        let message = "admission webhook \"x\" denied the request: no";
        let bare_400 = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "code": 400, "reason": "", "message": message});
        let bare_403 = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "code": 403, "message": message});
        for (code, denial) in [(400, bare_400), (403, bare_403)] {
            let rx = Receiver::start().await;
            let mut j = job_with(None, &rx.url, false);
            j.status = None;
            let scenario = vec![
                Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
                no_pod_yet(),
                its_secret(),
                Expect::new(Method::POST, PODS, code, Some(denial)),
                Expect::new(Method::PATCH, STATUS, 200, Some(as_json(&j))).check(move |b| {
                    assert_eq!(b["status"]["phase"], "Failed", "{code}: {b}");
                    assert_eq!(b["status"]["conditions"][0]["reason"], "PodRejected");
                    let msg = b["status"]["conditions"][0]["message"]
                        .as_str()
                        .unwrap_or("");
                    assert!(
                        msg.contains("denied the request"),
                        "the webhook's words: {msg}"
                    );
                }),
            ];
            let (res, seen) = play(j, vec![], scenario).await;
            assert_eq!(
                res.ok(),
                Some(Requeue::requeue(Duration::from_millis(200))),
                "{code}"
            );
            assert!(seen.events.iter().any(|e| e["reason"] == "PodRejected"));
        }
    }

    #[test]
    fn only_answers_about_the_pod_refuse_it() {
        let status = |code: u16, reason: &str| kube::core::Status {
            code,
            reason: reason.into(),
            ..Default::default()
        };
        for (code, reason) in [
            (400, ""),
            (403, ""),
            (403, "Forbidden"),
            (422, "Invalid"),
            (413, ""),
            (0, "Forbidden"),
            (0, "Invalid"),
        ] {
            assert!(refuses_the_pod(&status(code, reason)), "{code} {reason}");
        }
        for (code, reason) in [
            (404, "NotFound"),
            (409, "AlreadyExists"),
            (409, "Conflict"),
            (429, "TooManyRequests"),
            (401, "Unauthorized"),
            (408, "Timeout"),
            (500, "InternalError"),
            (503, ""),
            (0, ""),
        ] {
            assert!(!refuses_the_pod(&status(code, reason)), "{code} {reason}");
        }
    }

    #[tokio::test]
    async fn a_quota_refusal_is_retried_a_bounded_number_of_times() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, true);
        j.status = Some(BuildJobStatus {
            callbacks: CallbacksSent {
                pending: true,
                ..Default::default()
            },
            ..Default::default()
        });
        let mut quota = status_error(403, "Forbidden");
        quota["message"] = json!("pods \"x\" is forbidden: exceeded quota: builds, requested: pods=1, used: pods=10, limited: pods=10");
        let scenario = |q: Value, retries: u32| {
            vec![
                Expect::new(Method::GET, JOB_PATH, 200, None),
                no_pod_yet(),
                its_secret(),
                Expect::new(Method::POST, PODS, 403, Some(q)),
                Expect::new(Method::PATCH, STATUS, 200, None).check(move |b| {
                    if retries < 2 {
                        assert_eq!(b["status"]["admissionRetries"], retries + 1);
                        assert!(b["status"]["lastAdmissionRefusal"].is_string(), "{b}");
                        assert!(b["status"].get("phase").is_none(), "no slot held: {b}");
                    } else {
                        assert_eq!(b["status"]["phase"], "Failed");
                        assert_eq!(b["status"]["conditions"][0]["reason"], "PodRejected");
                    }
                }),
            ]
        };
        for retries in 0..3 {
            let mut jr = j.clone();
            if let Some(st) = jr.status.as_mut() {
                st.admission_retries = retries;
            }
            let mut s = scenario(quota.clone(), retries);
            s[0].response = Some(as_json(&jr));
            s[4].response = Some(as_json(&jr));
            let (res, _) = play(jr, vec![], s).await;
            assert!(res.is_ok(), "{res:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_pod_is_not_tried_again_before_its_backoff() {
        // The reconcile the refusal's own status write triggers: reads, then waits.
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, true);
        // A whole second, as the status (RFC 3339, second precision) keeps it: the rest of
        // the backoff is then known from the test's own clock.
        let refused = Timestamp::from_second(Timestamp::now().as_second()).expect("now");
        let since = || Timestamp::now().duration_since(refused).as_secs_f64();
        j.status = Some(BuildJobStatus {
            callbacks: CallbacksSent {
                pending: true,
                ..Default::default()
            },
            admission_retries: 1,
            last_admission_refusal: Some(Time(refused)),
            ..Default::default()
        });
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            its_secret(),
        ];
        let most = 10.0 - since();
        let (res, _) = play(j, vec![], scenario).await;
        let least = 10.0 - since();
        let after = format!("{:?}", res.ok());
        let secs = after
            .split("requeue_after: Some(")
            .nth(1)
            .and_then(|r| r.split("s)").next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("a requeue: {after}"));
        assert!(
            (least - 0.01..=most + 0.01).contains(&secs),
            "the rest of 10 s ({least:.3}–{most:.3}): {after}"
        );
    }

    #[tokio::test]
    async fn a_pod_of_an_earlier_job_with_the_same_name_is_removed_not_adopted() {
        let rx = Receiver::start().await;
        let j = job_with(Some(Phase::Running), &rx.url, true);
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            Expect::new(
                Method::GET,
                pod_path(0),
                200,
                Some(owned_pod("Succeeded", "uid-old")),
            ),
            Expect::new(
                Method::DELETE,
                pod_path(0),
                200,
                Some(owned_pod("Succeeded", "uid-old")),
            ),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(Duration::from_secs(2))));
        assert!(rx.statuses().is_empty(), "an old pod's success is not ours");
    }

    #[tokio::test]
    async fn a_credentials_secret_the_job_does_not_own_is_not_used() {
        let rx = Receiver::start().await;
        let mut j = job_with(None, &rx.url, false);
        j.status = None;
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            Expect::new(
                Method::GET,
                secret_path(),
                200,
                Some(secret_json("someone-else")),
            ),
        ];
        let (res, _) = play(j, vec![], scenario).await;
        assert_eq!(res.ok(), Some(Requeue::requeue(Duration::from_secs(2))));
        assert!(rx.statuses().is_empty(), "waits as if it were missing");
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
        let scenario = vec![
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
            no_pod_yet(),
            Expect::new(
                Method::GET,
                secret_path(),
                404,
                Some(status_error(404, "NotFound")),
            ),
        ];
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
            Expect::new(Method::GET, JOB_PATH, 200, Some(as_json(&j))),
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

    #[test]
    fn backoff_grows_per_object_with_jitter_and_is_capped() {
        assert_eq!(backoff(1, false, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(4, false, 0.5), Duration::from_secs(8));
        assert_eq!(backoff(40, false, 0.5), Duration::from_secs(300));
        assert_eq!(backoff(1, true, 0.5), Duration::from_secs(300));
        assert!(backoff(4, false, 0.0) < backoff(4, false, 0.99));
        assert_eq!(backoff(4, false, 0.0), Duration::from_secs(4));
    }

    #[test]
    fn event_notes_are_cut_to_1024_bytes_on_a_character_boundary() {
        let note = "é".repeat(600); // 1200 bytes
        let cut = cut_note(&note, EVENT_NOTE_BYTES);
        assert!(cut.len() <= 1024);
        assert_eq!(cut.len(), 1024);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(cut_note("short", EVENT_NOTE_BYTES), "short");
    }
}
