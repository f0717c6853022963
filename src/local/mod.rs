//! The embedded executor (local mode): a FIFO queue with at most MAXIMUM_PARALLEL_BUILDS
//! builds running, each run by the pipeline in this process. State is durable under
//! `DATA_DIR/state` (a group-committed journal, see `state`): after a restart, queued builds
//! still run and a build that was running is reported failed ("interrupted") instead of
//! being forgotten.

mod accepting;
mod queue;
mod records;
mod runtime;
pub mod state;

use crate::build::{BuildSpec, FailureReason, Outcome, StageTimings};
use crate::callback::Callbacks;
use crate::executor::{BuildSelector, Executor, ExecutorError};
use crate::logs::LogSinks;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, StageError};
use crate::storage::Object;
use async_trait::async_trait;
use queue::ChunkedQueue;
use records::Records;
use state::{Durability, Phase, Record, Recovered, StateStore};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Settings of the local executor.
pub struct LocalSettings {
    pub data_dir: PathBuf,
    pub max_parallel: usize,
    /// Builds that may wait in the queue; `None`: no limit.
    pub max_queued: Option<usize>,
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct LocalExecutor {
    inner: Arc<Inner>,
    /// The build threads; the last clone dropped stops them (tasks hold `inner`, so it
    /// cannot live there).
    _runtime: Arc<runtime::BuildRuntime>,
}

struct Inner {
    pipeline: Pipeline,
    sinks: LogSinks,
    callbacks: Callbacks,
    state: StateStore,
    /// Records of unfinished builds. Changes are made and queued for the journal under this
    /// lock (so they reach the disk in order) and awaited after it is released.
    records: Mutex<Records>,
    /// Builds whose first `POST /` waits for its journal write. Lock order: `records`, then
    /// this.
    accepting: accepting::Accepting,
    /// Pending callbacks being delivered at once: every queued build owes one, and a slow
    /// receiver must not get a connection (a file descriptor here) per queued build.
    pending_calls: Semaphore,
    /// Pending callbacks owed by queued builds, oldest first, and those being delivered.
    pending: Mutex<PendingCalls>,
    /// Builds that took a slot, or were stopped while queued and are being ended.
    active: Mutex<HashMap<Uuid, Active>>,
    /// Builds waiting for a slot, oldest first. A queued build has no task (the dispatcher
    /// starts one when a slot frees), so a burst of accepted builds costs little memory
    /// beyond its records. Lock order: `waiting`, then `active`.
    waiting: Mutex<ChunkedQueue<Waiting>>,
    /// Builds that left the queue, waited (without a slot) for the build of their number
    /// they replace to end, and now wait for a slot: the dispatcher hands the next free one
    /// to the oldest of them, before any queued build.
    ready: Mutex<VecDeque<oneshot::Sender<OwnedSemaphorePermit>>>,
    /// Wakes the dispatcher when a build joins `waiting` or `ready`.
    wake: Notify,
    semaphore: Arc<Semaphore>,
    seq: AtomicU64,
    /// Counts builds becoming active (`Active::since`).
    activations: AtomicU64,
    draining: AtomicBool,
    max_queued: Option<usize>,
    /// Whether the last `POST /` found the queue full: the warning is logged once when it
    /// fills, not once per refused request.
    full: AtomicBool,
    /// Builds that took a slot and have not yet sent their final callback: a graceful
    /// shutdown waits for these (the `running` gauge drops before the final callback).
    finishing: AtomicU64,
    tasks: TaskTracker,
    /// Where build tasks run (see `runtime`): never on the API's threads.
    builds: tokio::runtime::Handle,
    timeout: Duration,
    workroot: PathBuf,
    metrics: Arc<Metrics>,
}

/// Decrements `Inner::finishing` when dropped (at the end of a build's lifecycle, or if its
/// task dies).
struct Finishing<'a>(&'a AtomicU64);

impl Drop for Finishing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes a build's `Active` entry when its task ends, however it ends (a panic included):
/// a follower of its log then stops, and a build of the same number no longer waits for it.
struct ActiveEntry<'a> {
    active: &'a Mutex<HashMap<Uuid, Active>>,
    id: Uuid,
}

impl Drop for ActiveEntry<'_> {
    fn drop(&mut self) {
        lock(self.active).remove(&self.id);
    }
}

/// How a build's wait for the build of its number it replaces ended.
enum Waited {
    /// That build ended; this one got a slot.
    Slot(OwnedSemaphorePermit),
    /// Stopped or timed out before it started: it ends with this reason and message.
    Ended(FailureReason, String),
    /// The service shuts down: it stays queued for the next start.
    Requeued,
}

/// Queued builds past this many keep their record in the scratch file (see `records`).
const HOT_QUEUE: usize = 2048;

/// A build's "running" journal line is written once it has run this long; one that ends
/// sooner has only its outcome written.
const RUNNING_LINE_AFTER: std::time::Duration = std::time::Duration::from_millis(20);
/// One write or fsync of the build state taking this long means its disk has stopped
/// answering: `/octhc` fails and `POST /` is refused until it answers. Not less: on a busy
/// disk (dockerd writing layers to the same filesystem) one fsync may wait for seconds of
/// other files' data (ext4's ordered mode), and a POST refused then would have succeeded.
const STATE_STALL: Duration = Duration::from_secs(30);

/// Why a build was stopped, set before its token fires; `None` means "stopped by request".
type StopReason = Arc<Mutex<Option<(FailureReason, String)>>>;

/// A queued build: what starting it, stopping it and reporting it active need. Small (32
/// bytes, nothing allocated), since a burst queues hundreds of thousands.
struct Waiting {
    id: Uuid,
    /// `app_id(app, app_uuid)`.
    app: u64,
    build_number: u64,
}

/// The pending callbacks of queued builds. A queued build costs its id here, not a task of
/// its own (a task sending one was ~1.3 KB, ten times the rest of a queued build): at most
/// PENDING_CALLS_AT_ONCE workers take ids in order and deliver them.
#[derive(Default)]
struct PendingCalls {
    queue: VecDeque<Uuid>,
    workers: usize,
    /// Being delivered, each with a receiver that wakes when it is done: a build that ends
    /// meanwhile waits for it, so its final callback goes after.
    in_flight: HashMap<Uuid, watch::Receiver<()>>,
}

/// Ends a pending callback's delivery when dropped (delivered, given up or the task gone).
struct Delivering<'a> {
    pending: &'a Mutex<PendingCalls>,
    id: Uuid,
    _done: watch::Sender<()>,
}

impl Drop for Delivering<'_> {
    fn drop(&mut self) {
        lock(self.pending).in_flight.remove(&self.id);
    }
}

/// A pending-callback worker's place in `PendingCalls::workers`, given back when it leaves
/// (normally under the lock that found the queue empty; on a panic, by this).
struct PendingWorker<'a> {
    pending: &'a Mutex<PendingCalls>,
    left: bool,
}

impl Drop for PendingWorker<'_> {
    fn drop(&mut self) {
        if !self.left {
            lock(self.pending).workers -= 1;
        }
    }
}

/// A mutex's guard; a panic elsewhere while holding it leaves the data usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A build that took a slot (or is being ended after a stop while queued).
struct Active {
    app: u64,
    build_number: u64,
    /// When it became active (a counter): a build waits for the builds of its app and number
    /// that became active before it (never after: no two wait for each other).
    since: u64,
    cancel: CancellationToken,
    /// Why it was cancelled: set before the token fires.
    reason: StopReason,
}

/// Identifies an app in `Waiting` and `Active` by a 64-bit hash of its name and uuid
/// instead of a copy of both: a mix-up needs two live apps whose hashes collide (odds about
/// n²/2⁶⁵).
fn app_id(app: &str, app_uuid: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (app, app_uuid).hash(&mut h);
    h.finish()
}

/// What a build carries from the queue into its run.
struct Ticket {
    id: Uuid,
    /// When it took its slot (the dispatcher's order, whichever task runs first).
    started_at: chrono::DateTime<chrono::Utc>,
    cancel: CancellationToken,
    reason: StopReason,
}

impl LocalExecutor {
    /// Opens the state under `data_dir`, recovers what a previous process left, and starts
    /// the dispatcher.
    pub async fn start(
        settings: LocalSettings,
        pipeline: Pipeline,
        sinks: LogSinks,
        callbacks: Callbacks,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let dir = settings.data_dir.join("state");
        let (state, recovered) = tokio::task::spawn_blocking(move || StateStore::open(dir))
            .await
            .map_err(std::io::Error::other)??;
        // Before any build of this process writes to the spool.
        let leftover_logs = sinks.files.leftovers();
        let workroot = settings.data_dir.join("work");
        // Leftover build folders belong to builds that cannot resume.
        let _ = tokio::fs::remove_dir_all(&workroot).await;
        tokio::fs::create_dir_all(&workroot).await?;
        let semaphore = Arc::new(Semaphore::new(settings.max_parallel));
        let runtime = Arc::new(runtime::BuildRuntime::start()?);
        let inner = Arc::new(Inner {
            pipeline,
            sinks,
            callbacks,
            state,
            records: Mutex::new(Records::new(
                &settings.data_dir.join("state").join("queue.spill"),
            )),
            accepting: accepting::Accepting::default(),
            pending_calls: Semaphore::new(PENDING_CALLS_AT_ONCE),
            pending: Mutex::default(),
            active: Mutex::new(HashMap::new()),
            waiting: Mutex::new(ChunkedQueue::default()),
            ready: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            semaphore,
            seq: AtomicU64::new(0),
            activations: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            max_queued: settings.max_queued,
            full: AtomicBool::new(false),
            finishing: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            builds: runtime.handle().clone(),
            timeout: settings.timeout,
            workroot,
            metrics,
        });
        let exec = Self {
            inner,
            _runtime: runtime,
        };
        exec.inner.supervise(dispatch(exec.inner.clone()));
        exec.recover(recovered).await?;
        // After recovery, which ends (and stores) the logs of builds the last process left
        // running: the rest are finished logs storage refused then.
        let sinks = &exec.inner.sinks;
        sinks.files.store_leftovers(leftover_logs, &sinks.storage);
        Ok(exec)
    }

    /// Builds running, or finished but still sending their final callback.
    fn running(&self) -> u64 {
        self.inner.finishing.load(Ordering::SeqCst)
    }

    async fn recover(&self, recovered: Recovered) -> std::io::Result<()> {
        self.inner.seq.store(recovered.next_seq, Ordering::SeqCst);
        for mut rec in recovered.records {
            let id = rec.spec.build_uuid;
            match rec.phase {
                Phase::Queued => {
                    tracing::info!(build = %id, app = %rec.spec.app, "re-queueing a build accepted before the restart");
                    let line = state::encode(&rec).map_err(std::io::Error::other)?;
                    let cold = self.inner.queue_is_long();
                    self.inner.lock_records().insert(rec.clone(), &line, cold);
                    self.enqueue(rec);
                }
                Phase::Running => {
                    tracing::warn!(build = %id, app = %rec.spec.app, "a build was running when the service stopped; reporting it failed");
                    let outcome = Outcome::failed(
                        FailureReason::Interrupted,
                        "interrupted: the build service stopped while the build was running",
                    );
                    self.inner.append_log_line(&rec.spec, "Build failed (Interrupted): the build service stopped while the build was running").await;
                    rec.phase = Phase::Finished;
                    rec.outcome = Some(outcome);
                    rec.finished_at = Some(chrono::Utc::now());
                    let saved = self.inner.state.save(&rec);
                    self.inner.lock_records().insert(rec, &[], false);
                    saved.await.map_err(std::io::Error::other)?;
                    let inner = self.inner.clone();
                    self.inner
                        .supervise(async move { inner.send_callbacks(id).await });
                }
                Phase::Finished if !rec.final_sent || !rec.pending_sent => {
                    self.inner.lock_records().insert(rec, &[], false);
                    let inner = self.inner.clone();
                    self.inner
                        .supervise(async move { inner.send_callbacks(id).await });
                }
                Phase::Finished => {}
            }
        }
        Ok(())
    }

    /// Queues the build; its pending callback goes out now.
    fn enqueue(&self, rec: Record) {
        let id = rec.spec.build_uuid;
        if !rec.pending_sent && rec.spec.callback.is_some() {
            self.inner.queue_pending(id);
        }
        self.inner.metrics.queued.inc();
        self.inner.lock_waiting().push_back(Waiting {
            id,
            app: app_id(&rec.spec.app, &rec.spec.app_uuid),
            build_number: rec.spec.build_number,
        });
        self.inner.wake.notify_one();
    }

    /// Stops accepting builds, lets running builds finish within `grace`, then stops the
    /// rest and reports them interrupted. Queued builds stay queued for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        while self.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let running: Vec<_> = self.inner.running_tokens();
        for (cancel, reason) in running {
            if let Ok(mut r) = reason.lock() {
                *r = Some((
                    FailureReason::Interrupted,
                    "interrupted: the build service shut down before the build finished".into(),
                ));
            }
            cancel.cancel();
        }
        // Let the stopped builds record their outcome and send their callbacks (bounded).
        let wait = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.running() > 0 && tokio::time::Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How many pending callbacks are delivered at once (the rest wait their turn).
const PENDING_CALLS_AT_ONCE: usize = 32;

/// How often a build checks whether the build of the same number it replaces has ended.
const SAME_NUMBER_POLL: Duration = Duration::from_millis(50);

/// The longest wait between two tries to write a build's outcome.
const OUTCOME_WRITE_RETRY_MAX: Duration = Duration::from_secs(15);

impl Inner {
    /// Makes a new build known (under the records lock) and queues its journal line; the
    /// returned future resolves once the line is on disk.
    fn accept_locked(
        &self,
        records: &mut Records,
        rec: &mut Record,
        cold: bool,
    ) -> Result<
        (
            impl std::future::Future<Output = Result<(), state::StateError>> + Send + 'static,
            accepting::First,
        ),
        ExecutorError,
    > {
        // Taken under the lock, so seq order is journal order.
        rec.seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let line = state::encode(rec).map_err(|e| {
            tracing::error!(error = %e, "cannot encode the build's state");
            ExecutorError::Unavailable("build state cannot be written".into())
        })?;
        records.insert(rec.clone(), &line, cold);
        let first = self.accepting.begin(rec.spec.build_uuid);
        let saved = self
            .state
            .save_line(rec.spec.build_uuid, false, line, Durability::Synced);
        Ok((saved, first))
    }

    /// A `POST /` of a build already known: `200` once it is on disk (at once, unless its
    /// first `POST /` still waits for the journal write, whose answer it then shares).
    async fn duplicate(
        &self,
        id: Uuid,
        pending: Option<tokio::sync::watch::Receiver<Option<bool>>>,
    ) -> Result<(), ExecutorError> {
        if let Some(rx) = pending {
            if !accepting::answer(rx).await {
                return Err(ExecutorError::Unavailable(
                    "build state cannot be written".into(),
                ));
            }
        }
        tracing::info!(build = %id, "build already accepted; not starting it again");
        Ok(())
    }

    /// Spawns a task whose panic is logged rather than lost (the build it served would
    /// otherwise never report).
    fn supervise(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        use futures::FutureExt;
        // One task, not a task awaiting another: a burst starts thousands of these.
        let supervised = async move {
            if std::panic::AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("a build task died; its build is reported on the next start");
            }
        };
        self.tasks.spawn_on(supervised, &self.builds);
    }

    /// Builds that took a slot (queued ones stay queued across a shutdown).
    fn running_tokens(&self) -> Vec<(CancellationToken, StopReason)> {
        let Ok(active) = self.active.lock() else {
            return Vec::new();
        };
        active
            .values()
            .map(|a| (a.cancel.clone(), a.reason.clone()))
            .collect()
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, ChunkedQueue<Waiting>> {
        lock(&self.waiting)
    }

    fn lock_ready(
        &self,
    ) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<OwnedSemaphorePermit>>> {
        lock(&self.ready)
    }

    /// Refuses a new build while `max_queued` builds wait. Checked before the build is
    /// written anywhere, so a refused build leaves nothing behind; requests in flight at
    /// once may each pass it, so the queue can exceed the limit by at most that many.
    fn check_room(&self) -> Result<(), ExecutorError> {
        let Some(max) = self.max_queued else {
            return Ok(());
        };
        let queued = self.lock_waiting().len();
        if queued < max {
            if self.full.swap(false, Ordering::Relaxed) {
                tracing::info!(queued, "the build queue has room again");
            }
            return Ok(());
        }
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                queued,
                "the build queue is full (MAX_QUEUED_BUILDS); new builds get 503 until it drains"
            );
        }
        self.metrics.refused_queue_full.inc();
        Err(ExecutorError::QueueFull(queued))
    }

    /// Whether a build queued now waits behind HOT_QUEUE others (its record then waits in
    /// the scratch file).
    fn queue_is_long(&self) -> bool {
        self.lock_waiting().len() >= HOT_QUEUE
    }

    /// Makes a queued build active (to run, or to be ended after a stop).
    fn activate(
        &self,
        active: &mut HashMap<Uuid, Active>,
        w: &Waiting,
    ) -> (CancellationToken, StopReason) {
        let (cancel, reason) = (CancellationToken::new(), StopReason::default());
        let a = Active {
            app: w.app,
            build_number: w.build_number,
            since: self.activations.fetch_add(1, Ordering::SeqCst),
            cancel: cancel.clone(),
            reason: reason.clone(),
        };
        active.insert(w.id, a);
        (cancel, reason)
    }

    /// The oldest queued build, now active.
    fn next_waiting(&self) -> Option<Ticket> {
        let mut waiting = self.lock_waiting();
        let mut active = self.active.lock().ok()?;
        let w = waiting.pop_front()?;
        let (cancel, reason) = self.activate(&mut active, &w);
        self.metrics.queued.dec();
        Some(Ticket {
            id: w.id,
            started_at: chrono::Utc::now(),
            cancel,
            reason,
        })
    }

    /// The records map; a panic elsewhere while holding it leaves it usable.
    fn lock_records(&self) -> std::sync::MutexGuard<'_, Records> {
        lock(&self.records)
    }

    /// Changes a build's record and writes it; false only when the write failed (a build
    /// no longer held, or a record that cannot be encoded, has nothing to write again).
    async fn update(&self, id: Uuid, durability: Durability, f: impl FnOnce(&mut Record)) -> bool {
        let saved = {
            let mut records = self.lock_records();
            match records.change(&id, f) {
                None => return true,
                Some(Ok((final_sent, line))) => {
                    self.state.save_line(id, final_sent, line, durability)
                }
                Some(Err(e)) => {
                    tracing::error!(build = %id, error = %e, "could not write the build's state");
                    return true;
                }
            }
        };
        match saved.await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(build = %id, error = %e, "could not write the build's state under DATA_DIR");
                false
            }
        }
    }

    /// `update`, written again (after 1 s, doubling up to OUTCOME_WRITE_RETRY_MAX) until it
    /// is on disk (a full disk), logging `failing` before each wait.
    async fn update_until_written(
        &self,
        id: Uuid,
        durability: Durability,
        failing: &str,
        f: impl FnOnce(&mut Record),
    ) {
        let mut saved = self.update(id, durability, f).await;
        let mut wait = Duration::from_secs(1);
        while !saved {
            tracing::error!(build = %id, retry_in_s = wait.as_secs(), "{failing}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(OUTCOME_WRITE_RETRY_MAX);
            saved = self.update(id, durability, |_| {}).await;
        }
    }

    /// Ends the log of a build that will not run (any more) with `line`, and stores it.
    async fn append_log_line(&self, spec: &BuildSpec, line: &str) {
        self.sinks
            .files
            .append_and_store(&spec.log_key(), line, &self.sinks.storage)
            .await;
        self.kafka_last_line(spec, line);
    }

    /// Sends `line` and `Build finished` to the build's Kafka topic, if it names brokers.
    fn kafka_last_line(&self, spec: &BuildSpec, line: &str) {
        if let Some(mut log) = self.sinks.kafka_only(spec) {
            // Delivery may wait on a dead broker for KAFKA_DELIVERY_TIMEOUT_MS: not inline.
            let line = line.to_string();
            let deliver = async move {
                log.line(&line);
                log.finish().await;
            };
            self.tasks.spawn_on(deliver, &self.builds);
        }
    }

    /// Runs a build that got a slot, then records its outcome and sends its callbacks.
    async fn lifecycle(self: Arc<Self>, ticket: Ticket, permit: OwnedSemaphorePermit) {
        let _entry = ActiveEntry {
            active: &self.active,
            id: ticket.id,
        };
        let Some(rec) = self.record(ticket.id) else {
            return;
        };
        // TIMEOUT_IN_MS counts from here, the wait for a build this one replaces included.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (permit, started_at) = if self.earlier_of_same_number(ticket.id) {
            // A build of the same number that it replaces is still ending (stopped when this
            // one was accepted): its log and tags go first. That can take minutes (its log's
            // upload to a slow S3): the slot serves other builds meanwhile.
            drop(permit);
            match self.wait_for_earlier(&ticket, deadline).await {
                Waited::Slot(permit) => (permit, chrono::Utc::now()),
                Waited::Ended(reason, message) => {
                    return Box::pin(self.end_waiting(&rec, reason, message)).await;
                }
                Waited::Requeued => return,
            }
        } else {
            (permit, ticket.started_at)
        };
        self.finishing.fetch_add(1, Ordering::SeqCst);
        // Counts this build as finishing until its final callback went (or it was dropped).
        let finishing = Finishing(&self.finishing);
        self.metrics.running.inc();
        let mut timings = StageTimings {
            queued: Some(ms_since(rec.accepted_at)),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        // Boxed (here and below): the large futures (pipeline, callbacks) are only
        // allocated while they run.
        let (outcome, flush) = Box::pin(self.run(
            &rec.spec,
            &ticket,
            rec.accepted_at,
            started_at,
            deadline,
            &mut timings,
        ))
        .await;
        self.metrics.running.dec();
        drop(permit);
        self.metrics
            .build_finished(&outcome, Some(started.elapsed().as_secs_f64()));
        let started = Some(started_at);
        Box::pin(self.finish(&rec, outcome, timings, flush, started)).await;
        drop(finishing);
    }

    /// Waits, holding no slot, until the builds of its number that became active before it
    /// have ended, then for a slot (handed over before any queued build's). A stop ends the
    /// wait at once, and so does the build's deadline.
    async fn wait_for_earlier(&self, ticket: &Ticket, deadline: tokio::time::Instant) -> Waited {
        let slot = async {
            while self.earlier_of_same_number(ticket.id) {
                tokio::time::sleep(SAME_NUMBER_POLL).await;
            }
            if self.draining.load(Ordering::SeqCst) {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            self.lock_ready().push_back(tx);
            self.wake.notify_one();
            // An error: the dispatcher stopped (the service shuts down).
            rx.await.ok()
        };
        tokio::select! {
            slot = slot => slot.map_or(Waited::Requeued, Waited::Slot),
            () = ticket.cancel.cancelled() => match stop_reason(&ticket.reason) {
                // Shutting down: it never started, so it stays queued for the next start.
                (FailureReason::Interrupted, _) => Waited::Requeued,
                (reason, message) => Waited::Ended(reason, format!("{message} before it started")),
            },
            () = tokio::time::sleep_until(deadline) => Waited::Ended(
                FailureReason::Timeout,
                format!(
                    "waited longer than TIMEOUT_IN_MS ({} ms) for the build of the same number it replaces to end",
                    self.timeout.as_millis()
                ),
            ),
        }
    }

    /// Ends a build stopped (or timed out) while it waited for the build of its number it
    /// replaces. That build still owns the number's stored log (it is storing it): this
    /// one's last line goes to Kafka only.
    async fn end_waiting(&self, rec: &Record, reason: FailureReason, message: String) {
        let timings = StageTimings {
            queued: Some(ms_since(rec.accepted_at)),
            ..Default::default()
        };
        let line = format!("Build failed ({}): {message}", reason.as_str());
        self.kafka_last_line(&rec.spec, &line);
        let outcome = Outcome::failed(reason, message);
        Box::pin(self.finish(rec, outcome, timings, None, None)).await;
    }

    /// Stops the matching builds that took a slot and, with `queued`, the queued ones too,
    /// except `keep`, for `why` (by request when `None`); returns how many. Without `queued`
    /// it costs as many steps as builds run, not as many as wait.
    fn stop_matching(
        self: &Arc<Self>,
        which: &BuildSelector,
        queued: bool,
        keep: Option<Uuid>,
        why: Option<(FailureReason, String)>,
    ) -> usize {
        let app = app_id(&which.app, &which.app_uuid);
        let wanted = |id: &Uuid, a: u64, n: u64| {
            a == app && which.build_number.is_none_or(|b| b == n) && Some(*id) != keep
        };
        let mut ending = Vec::new();
        let mut n = 0;
        {
            let mut waiting = queued.then(|| self.lock_waiting());
            let Ok(mut active) = self.active.lock() else {
                return 0;
            };
            for (id, a) in active
                .iter()
                .filter(|(id, a)| wanted(id, a.app, a.build_number))
            {
                n += 1;
                if let (Some(why), Ok(mut reason)) = (&why, a.reason.lock()) {
                    reason.get_or_insert_with(|| why.clone());
                }
                tracing::info!(build = %id, "stopping the build");
                a.cancel.cancel();
            }
            // A queued build has no task: it leaves the queue and a task ends it (active
            // meanwhile, so it is still reported active until its final line is written).
            if let Some(waiting) = waiting.as_mut() {
                waiting.retain_mut(|w| {
                    if !wanted(&w.id, w.app, w.build_number) {
                        return true;
                    }
                    self.activate(&mut active, w);
                    ending.push(w.id);
                    false
                });
            }
        }
        n += ending.len();
        for id in ending {
            let inner = self.clone();
            let why = why.clone().unwrap_or_else(stopped_by_request);
            self.supervise(async move { inner.end_unstarted(id, why).await });
        }
        n
    }

    /// Whether a build of the same app and number as `id` became active before it and has
    /// not ended (its log is still being written, under the same name).
    fn earlier_of_same_number(&self, id: Uuid) -> bool {
        let Ok(active) = self.active.lock() else {
            return false;
        };
        let Some(me) = active.get(&id) else {
            return false;
        };
        active.iter().any(|(other, a)| {
            *other != id
                && a.app == me.app
                && a.build_number == me.build_number
                && a.since < me.since
        })
    }

    /// Ends a build stopped while it was queued.
    async fn end_unstarted(self: Arc<Self>, id: Uuid, (r, m): (FailureReason, String)) {
        let _entry = ActiveEntry {
            active: &self.active,
            id,
        };
        let Some(rec) = self.record(id) else {
            return;
        };
        self.metrics.queued.dec();
        let timings = StageTimings {
            queued: Some(ms_since(rec.accepted_at)),
            ..Default::default()
        };
        let line = format!("Build failed ({}): {m} before it started", r.as_str());
        // An earlier build of this number may still be storing the number's log: as in
        // `end_waiting`, this one's last line then goes to Kafka only. Otherwise the line
        // is stored beside the callbacks, after the outcome is on disk: an upload to a
        // slow storage must not leave a stopped build `Queued` in the journal, to run
        // after a restart.
        let store_line: Option<futures::future::BoxFuture<'static, ()>> =
            if self.earlier_of_same_number(id) {
                self.kafka_last_line(&rec.spec, &line);
                None
            } else {
                let (me, spec) = (self.clone(), rec.spec.clone());
                Some(Box::pin(
                    async move { me.append_log_line(&spec, &line).await },
                ))
            };
        let outcome = Outcome::failed(r, format!("{m} before it started"));
        Box::pin(self.finish(&rec, outcome, timings, store_line, None)).await;
    }

    /// Records the outcome, then sends the callbacks (the final one after the pending one)
    /// beside the log's flush.
    async fn finish(
        &self,
        rec: &Record,
        outcome: Outcome,
        mut timings: StageTimings,
        flush_log: Option<futures::future::BoxFuture<'static, ()>>,
        started_at: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let spec = &rec.spec;
        let id = spec.build_uuid;
        timings
            .total
            .get_or_insert_with(|| ms_since(rec.accepted_at));
        self.metrics.observe_stages(&timings, &[]);
        tracing::info!(build = %id, app = %spec.app, number = spec.build_number, result = outcome.callback_status(), "build finished");
        // On disk before any callback: lost in a power cut, the build would run again after
        // its final callback had gone. A full disk holds the callbacks until it has room.
        self.update_until_written(
            id,
            Durability::Synced,
            "the build's outcome is not on disk; its callbacks wait until it is",
            |r| {
                r.phase = Phase::Finished;
                // Not recorded yet when the build ended before its "running" line was due.
                r.started_at = r.started_at.or(started_at);
                r.outcome = Some(outcome);
                r.finished_at = Some(chrono::Utc::now());
                // The pending callback's time may already be recorded: keep it.
                r.timings = StageTimings {
                    callback_pending: r.timings.callback_pending,
                    ..timings
                };
            },
        )
        .await;
        // The log's upload and Kafka delivery run beside the final callback, never before it.
        let callbacks = Box::pin(self.send_callbacks(id));
        // Active until its log is stored: a follower reads it to its end, and a build that
        // reuses its number opens a log of the same name only then.
        let flushed = async {
            if let Some(flush) = flush_log {
                flush.await;
            }
            self.remove_active(id);
        };
        tokio::join!(flushed, callbacks);
    }

    /// Runs the build; returns its outcome and the flushing of its log (to run beside the
    /// final callback), `None` when no log could be opened.
    async fn run(
        &self,
        spec: &BuildSpec,
        ticket: &Ticket,
        accepted_at: chrono::DateTime<chrono::Utc>,
        started_at: chrono::DateTime<chrono::Utc>,
        deadline: tokio::time::Instant,
        timings: &mut StageTimings,
    ) -> (Outcome, Option<futures::future::BoxFuture<'static, ()>>) {
        let id = spec.build_uuid;
        // Recorded beside the build rather than before it, not synced, and only once it has
        // run RUNNING_LINE_AFTER (below): lost in a crash or a power cut, or never written,
        // the build runs again after the restart.
        let running = self.update(id, Durability::Written, |r| {
            r.phase = Phase::Running;
            r.started_at = Some(started_at);
        });
        let mut log = match self.sinks.open(spec) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(build = %id, error = %e, "could not open the build log");
                let failed =
                    Outcome::failed(FailureReason::Internal, "could not open the build log");
                return (failed, None);
            }
        };
        log.line(&format!(
            "Build {} of {} started ({})",
            spec.build_number,
            spec.app_key(),
            spec.build_uuid
        ));
        let workdir = self.workroot.join(id.to_string());
        // Dropping the pipeline future closes the connection to dockerd, which cancels the
        // build and removes its container.
        let build = async {
            tokio::select! {
                o = self.pipeline.run(spec, &mut log, &workdir, timings) => o,
                _ = tokio::time::sleep_until(deadline) => {
                    let msg = format!("the build ran longer than TIMEOUT_IN_MS ({} ms)", self.timeout.as_millis());
                    Outcome::failed(FailureReason::Timeout, msg)
                }
                _ = ticket.cancel.cancelled() => {
                    let (r, m) = stop_reason(&ticket.reason);
                    Outcome::failed(r, m)
                }
            }
        };
        // A build that ends sooner (sources that fail at once) is recorded once, by its outcome:
        // one journal line and one wake-up of the journal's writer fewer. Once due, the
        // record update always completes, even when the build is stopped.
        let outcome = {
            let mut build = std::pin::pin!(build);
            tokio::select! {
                biased;
                outcome = &mut build => outcome,
                () = tokio::time::sleep(RUNNING_LINE_AFTER) => {
                    let (_, outcome) = tokio::join!(running, build);
                    outcome
                }
            }
        };
        if let Outcome::Failed { reason, message } = &outcome {
            if matches!(
                reason,
                FailureReason::Timeout | FailureReason::Cancelled | FailureReason::Interrupted
            ) {
                log.line(&format!("Build failed ({}): {message}", reason.as_str()));
            }
        }
        timings.total = Some(ms_since(accepted_at));
        log.line(&timings.summary());
        let flush = log.finish();
        // Cleaning up (the build folder, the local tags) runs beside the final callback too.
        let tidy = self.pipeline.tidy(spec, &outcome);
        let flush = async move {
            let cleanup = async {
                // Sources that failed before their first byte made no folder. One stat here
                // spares those builds a trip through the blocking pool (two thread wake-ups).
                if std::fs::symlink_metadata(&workdir).is_ok() {
                    let _ = tokio::fs::remove_dir_all(&workdir).await;
                }
                flush.await;
            };
            tokio::join!(cleanup, tidy);
        };
        (outcome, Some(Box::pin(flush)))
    }

    fn remove_active(&self, id: Uuid) {
        if let Ok(mut a) = self.active.lock() {
            a.remove(&id);
        }
    }

    fn record(&self, id: Uuid) -> Option<Record> {
        self.lock_records().get(&id)
    }

    /// One callback; a delivery given up after its retries is counted and logged once.
    async fn deliver(&self, spec: &BuildSpec, status: &'static str, gave_up: &str) {
        let Some(url) = &spec.callback else { return };
        let auth = spec.callback_auth.as_ref();
        if let Err(e) = self
            .callbacks
            .deliver(url, auth, spec.build_number, status)
            .await
        {
            self.metrics.callback_failures.inc();
            tracing::warn!(build = %spec.build_uuid, error = %e, "{gave_up}");
        }
    }

    /// Queues the pending callback of a build just queued, and starts a worker for it if
    /// fewer than PENDING_CALLS_AT_ONCE run.
    fn queue_pending(self: &Arc<Self>, id: Uuid) {
        let start = {
            let mut p = lock(&self.pending);
            p.queue.push_back(id);
            let start = p.workers < PENDING_CALLS_AT_ONCE;
            p.workers += usize::from(start);
            start
        };
        if start {
            let inner = self.clone();
            self.tasks
                .spawn_on(async move { inner.pending_worker().await }, &self.builds);
        }
    }

    /// Delivers queued pending callbacks, oldest first, until none is left.
    async fn pending_worker(self: Arc<Self>) {
        let mut me = PendingWorker {
            pending: &self.pending,
            left: false,
        };
        loop {
            let next = {
                let mut p = lock(&self.pending);
                let next = p.queue.pop_front();
                if next.is_none() {
                    p.workers -= 1;
                    me.left = true;
                }
                next
            };
            let Some(id) = next else { return };
            Box::pin(self.send_pending(id)).await;
        }
    }

    /// Delivers the build's pending callback unless it was delivered; if it is being
    /// delivered, waits for that instead.
    async fn send_pending(&self, id: Uuid) {
        let claimed = {
            let mut p = lock(&self.pending);
            match p.in_flight.get(&id) {
                Some(done) => Err(done.clone()),
                None => {
                    let (tx, rx) = watch::channel(());
                    p.in_flight.insert(id, rx);
                    Ok(tx)
                }
            }
        };
        let _delivering = match claimed {
            Ok(tx) => Delivering {
                pending: &self.pending,
                id,
                _done: tx,
            },
            Err(mut done) => {
                // Ends when the other delivery's sender is dropped.
                let _ = done.changed().await;
                return;
            }
        };
        let Ok(_slot) = self.pending_calls.acquire().await else {
            return;
        };
        let Some(rec) = self.record(id) else {
            return;
        };
        if rec.pending_sent {
            return;
        }
        self.deliver(&rec.spec, "pending", "pending callback not delivered")
            .await;
        let took = rec
            .spec
            .callback
            .is_some()
            .then(|| ms_since(rec.accepted_at));
        // Lost in a power cut, the pending callback goes again after the restart.
        self.update(id, Durability::Written, |r| {
            r.pending_sent = true;
            r.timings.callback_pending = took;
        })
        .await;
        self.observe_callback(StageTimings {
            callback_pending: took,
            ..Default::default()
        });
    }

    fn observe_callback(&self, t: StageTimings) {
        self.metrics.observe_stages(&t, &[]);
    }

    /// Sends whatever callbacks the record still owes: pending first, then the final one.
    async fn send_callbacks(&self, id: Uuid) {
        self.send_pending(id).await;
        let Some(rec) = self.record(id) else {
            return;
        };
        let Some(outcome) = rec.outcome.as_ref().filter(|_| !rec.final_sent) else {
            return;
        };
        let started = std::time::Instant::now();
        self.deliver(
            &rec.spec,
            outcome.callback_status(),
            "final callback not delivered; giving up",
        )
        .await;
        let took = rec
            .spec
            .callback
            .is_some()
            .then(|| crate::build::elapsed_ms(started));
        self.observe_callback(StageTimings {
            callback_final: took,
            ..Default::default()
        });
        // Lost in a power cut, the final callback goes again after the restart (the
        // outcome it reports is on disk).
        // A failed write is taken back out of the journal, whose last line of this build
        // then still holds its credentials and says its final callback is owed (sent again
        // after a restart): written again until it is on disk, as the outcome is.
        self.update_until_written(
            id,
            Durability::Written,
            "the build's final callback is not recorded on disk; trying again",
            |r| {
                r.final_sent = true;
                r.timings.callback_final = took;
                // Nothing needs the credentials any more: they do not stay on disk.
                r.spec = r.spec.scrubbed();
            },
        )
        .await;
        // Done with it: the state file stays (idempotent POST, restart), memory does not grow.
        self.lock_records().remove(&id);
    }
}

/// Milliseconds from `since` to now (0 if the clock went back).
fn ms_since(since: chrono::DateTime<chrono::Utc>) -> u64 {
    u64::try_from((chrono::Utc::now() - since).num_milliseconds()).unwrap_or(0)
}

/// Why a build was stopped (by request unless a reason was set).
fn stop_reason(reason: &StopReason) -> (FailureReason, String) {
    reason
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or_else(stopped_by_request)
}

fn stopped_by_request() -> (FailureReason, String) {
    (FailureReason::Cancelled, "stopped by request".into())
}

/// Starts queued builds in submission order as slots free up. A build that waited for the
/// build of its number it replaces gets the next free slot first. While the service drains,
/// nothing more starts: queued builds stay queued for the next start.
async fn dispatch(inner: Arc<Inner>) {
    loop {
        let Ok(mut permit) = inner.semaphore.clone().acquire_owned().await else {
            return;
        };
        loop {
            if inner.draining.load(Ordering::SeqCst) {
                // Their wait ends: they stay queued too.
                inner.lock_ready().clear();
                return;
            }
            let ready = inner.lock_ready().pop_front();
            if let Some(ready) = ready {
                match ready.send(permit) {
                    Ok(()) => break,
                    // Stopped meanwhile: the slot goes to the next one.
                    Err(back) => {
                        permit = back;
                        continue;
                    }
                }
            }
            if let Some(ticket) = inner.next_waiting() {
                let i = inner.clone();
                inner.supervise(async move { i.lifecycle(ticket, permit).await });
                break;
            }
            inner.wake.notified().await;
        }
    }
}

impl LocalExecutor {
    /// The end of a build's acceptance: the `200` waits for the fsync of its record's batch
    /// (an accepted build survives a SIGKILL that follows the answer), then it is queued.
    async fn settle(
        &self,
        id: Uuid,
        rec: Record,
        saved: impl std::future::Future<Output = Result<(), state::StateError>>,
        first: accepting::First,
    ) -> Result<(), ExecutorError> {
        let saved = saved.await;
        if let Err(e) = saved {
            // Both under the records' lock: a duplicate that found the record between the
            // two would find no acceptance under way, take the build for saved and answer
            // 200 for a build that is then dropped.
            {
                let mut records = self.inner.lock_records();
                records.remove(&id);
                first.done(false);
            }
            tracing::error!(error = %e, "cannot write build state under DATA_DIR");
            return Err(ExecutorError::Unavailable(
                "build state cannot be written".into(),
            ));
        }
        first.done(true);
        tracing::info!(build = %id, app = %rec.spec.app, number = rec.spec.build_number, "build accepted");
        // A new build of a number already in use (controller-api numbers builds by count, so
        // a number comes back after a build is deleted) replaces the old one, as the legacy
        // shuttle did: a running one is stopped, and this one starts after it ended. A queued
        // one runs first (looking through the queue would cost every POST the queue's
        // length), and this one after it.
        let same_number = BuildSelector {
            app: rec.spec.app.clone(),
            app_uuid: rec.spec.app_uuid.clone(),
            build_number: Some(rec.spec.build_number),
        };
        let why = (
            FailureReason::Cancelled,
            format!("replaced by build {id}, which has the same number"),
        );
        self.inner
            .stop_matching(&same_number, false, Some(id), Some(why));
        self.enqueue(rec);
        Ok(())
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn submit(&self, mut spec: BuildSpec) -> Result<(), ExecutorError> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(ExecutorError::Unavailable(
                "the service is shutting down".into(),
            ));
        }
        let id = spec.build_uuid;
        let known = {
            let records = self.inner.lock_records();
            records
                .contains(&id)
                .then(|| self.inner.accepting.join(&id))
        };
        if known.is_some() || self.inner.state.is_done(&id) {
            return self.inner.duplicate(id, known.flatten()).await;
        }
        self.inner.check_room()?;
        // A disk that has stopped answering would hold this request until it answers again
        // (for ever, for a lost volume): refuse it now, as a disk that fails is.
        if self.inner.state.stalled(STATE_STALL).is_some() {
            return Err(ExecutorError::Unavailable(
                "build state cannot be written".into(),
            ));
        }
        // A data: payload goes to storage now; the state keeps a reference, not megabytes.
        // Storage that fails or hangs refuses the build (503) within a bounded time: it
        // is not acknowledged without its only copy of the sources.
        let staged = self
            .inner
            .pipeline
            .stage_inline_sources(&mut spec, &self.inner.workroot)
            .await;
        if let Err(e) = staged {
            tracing::error!(build = %id, app = %spec.app, error = %e, "cannot store the build's data: sources; refusing the build");
            let why = match e {
                StageError::TimedOut(_) => "storage did not take the build's sources in time",
                StageError::Store(_) => "storage refused the build's sources",
            };
            return Err(ExecutorError::NotReady(format!("{why}; try again later.")));
        }
        let mut rec = Record {
            seq: 0,
            // Without a callback URL there is nothing to send (and nothing to record later).
            pending_sent: spec.callback.is_none(),
            spec,
            phase: Phase::Queued,
            outcome: None,
            final_sent: false,
            accepted_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            timings: StageTimings::default(),
        };
        let cold = self.inner.queue_is_long();
        let accepted = {
            let mut records = self.inner.lock_records();
            // Known by now (a duplicate that arrived beside this one and was staged first),
            // or finished and forgotten already.
            if records.contains(&id) || self.inner.state.is_done(&id) {
                Err(self.inner.accepting.join(&id))
            } else {
                Ok(self.inner.accept_locked(&mut records, &mut rec, cold))
            }
        };
        let (saved, first) = match accepted {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(e)) => return Err(e),
            Err(pending) => return self.inner.duplicate(id, pending).await,
        };
        // The build is known now, so a retried `POST /` is answered as a duplicate, and
        // only this can queue the build or take it back.
        let this = self.clone();
        crate::executor::accept_to_the_end(
            id,
            async move { this.settle(id, rec, saved, first).await },
        )
        .await
    }

    fn health(&self) -> Result<(), String> {
        if self.inner.state.failing() {
            return Err(
                "the build state cannot be written under DATA_DIR (is the disk full?)".into(),
            );
        }
        match self.inner.state.stalled(STATE_STALL) {
            Some(d) => Err(format!(
                "the build state under DATA_DIR has been waiting {} s for one write to its disk (a stalled disk or a lost volume?); new builds are refused until it answers",
                d.as_secs()
            )),
            None => Ok(()),
        }
    }

    async fn stop(&self, which: BuildSelector) -> Result<usize, ExecutorError> {
        Ok(self.inner.stop_matching(&which, true, None, None))
    }

    async fn log(
        &self,
        app: &str,
        app_uuid: &str,
        build_number: u64,
        offset: u64,
    ) -> Result<Option<Object>, ExecutorError> {
        let key = crate::build::log_key(app, app_uuid, build_number);
        if let Some(path) = self.inner.sinks.files.path(&key) {
            if let Ok(file) = tokio::fs::File::open(&path).await {
                return Ok(Some(crate::storage::file_object(file, offset).await));
            }
        }
        let obj = self
            .inner
            .sinks
            .storage
            .get_from(&key, offset)
            .await
            .map_err(|e| ExecutorError::Unavailable(e.to_string()))?;
        // A queued build is known but has written nothing yet (as in Kubernetes mode).
        if obj.is_none() && self.is_active(app, app_uuid, build_number).await {
            return Ok(Some(Object {
                len: Some(0),
                body: futures::StreamExt::boxed(futures::stream::empty()),
            }));
        }
        Ok(obj)
    }

    async fn is_active(&self, app: &str, app_uuid: &str, build_number: u64) -> bool {
        let app = app_id(app, app_uuid);
        // Both locks at once: a build moving from the queue to a slot is seen in one of them.
        let waiting = self.inner.lock_waiting();
        let Ok(active) = self.inner.active.lock() else {
            return false;
        };
        active
            .values()
            .any(|a| a.app == app && a.build_number == build_number)
            || waiting
                .iter()
                .any(|w| w.app == app && w.build_number == build_number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_build_costs_40_bytes_in_the_queue() {
        assert!(std::mem::size_of::<Waiting>() <= 40);
    }

    #[test]
    fn apps_are_told_apart_by_name_and_uuid_not_their_joined_key() {
        assert_eq!(app_id("a", "b-c"), app_id("a", "b-c"));
        assert_ne!(app_id("a-b", "c"), app_id("a", "b-c"));
        assert_ne!(app_id("a", "b"), app_id("a", "c"));
    }

    /// Local files, except that storing a log panics (a bug anywhere in a build's task).
    struct PanicOnLogUpload(crate::storage::LocalStorage);

    #[async_trait]
    impl crate::storage::Storage for PanicOnLogUpload {
        async fn put_file(
            &self,
            key: &str,
            _path: &std::path::Path,
        ) -> Result<(), crate::storage::StorageError> {
            panic!("a bug while storing {key}")
        }
        async fn put_file_durable(
            &self,
            key: &str,
            path: &std::path::Path,
        ) -> Result<(), crate::storage::StorageError> {
            self.0.put_file_durable(key, path).await
        }
        async fn get(&self, key: &str) -> Result<Option<Object>, crate::storage::StorageError> {
            self.0.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, crate::storage::StorageError> {
            self.0.exists(key).await
        }
        fn describe(&self) -> String {
            "panicking".into()
        }
    }

    /// An executor on `dir` whose dockerd is a closed port (every build fails at once),
    /// keeping logs and sources in `storage` (its files under `dir/store`), its logs
    /// spooled in `dir/spool` first (as with S3) when `spool`.
    async fn executor(
        dir: &std::path::Path,
        storage: Arc<dyn crate::storage::Storage>,
        spool: bool,
    ) -> LocalExecutor {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from(["buildshuttle", "serve"])
            .unwrap_or_else(|e| panic!("{e}"));
        let crate::config::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = Arc::new(args.build.validate().unwrap_or_else(|e| panic!("{e}")));
        let docker = bollard::Docker::connect_with_http(
            "http://127.0.0.1:9",
            1,
            bollard::API_DEFAULT_VERSION,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sinks = LogSinks {
            files: if spool {
                crate::logs::LogFiles::spool(dir.join("spool")).unwrap()
            } else {
                crate::logs::LogFiles::new(dir.join("store")).unwrap()
            },
            storage: storage.clone(),
            stdout: crate::logs::Stdout::Off,
            max_log_bytes: 1 << 20,
            kafka: None,
        };
        LocalExecutor::start(
            LocalSettings {
                data_dir: dir.to_path_buf(),
                max_parallel: 2,
                max_queued: None,
                timeout: Duration::from_secs(600),
            },
            Pipeline::new(docker, storage, config),
            sinks,
            Callbacks::new(Duration::from_secs(1)),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    }

    fn local_storage(dir: &std::path::Path) -> crate::storage::LocalStorage {
        crate::storage::LocalStorage::new(dir.join("store")).unwrap()
    }

    /// Local files, except that reading sources and storing a log never end (a hung S3).
    struct HungStorage(crate::storage::LocalStorage);

    #[async_trait]
    impl crate::storage::Storage for HungStorage {
        async fn put_file(
            &self,
            key: &str,
            path: &std::path::Path,
        ) -> Result<(), crate::storage::StorageError> {
            if key.ends_with(".logs") {
                std::future::pending::<()>().await;
            }
            self.0.put_file(key, path).await
        }
        async fn put_file_durable(
            &self,
            key: &str,
            path: &std::path::Path,
        ) -> Result<(), crate::storage::StorageError> {
            self.0.put_file_durable(key, path).await
        }
        async fn get(&self, key: &str) -> Result<Option<Object>, crate::storage::StorageError> {
            if !key.ends_with(".logs") {
                std::future::pending::<()>().await;
            }
            self.0.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, crate::storage::StorageError> {
            self.0.exists(key).await
        }
        fn describe(&self) -> String {
            "hung".into()
        }
    }

    /// A queued build stopped: its outcome is on disk before its log's last line is stored
    /// (a slow storage would otherwise leave it `Queued`, to run after a restart).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_queued_build_is_recorded_before_its_log_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let exec = executor(
            dir.path(),
            Arc::new(HungStorage(local_storage(dir.path()))),
            true,
        )
        .await;
        // Two builds hold both slots (reading their sources for ever); the third waits.
        let specs: Vec<BuildSpec> = (1..=3)
            .map(|n| {
                let mut s = crate::build::tests::spec();
                s.build_uuid = Uuid::new_v4();
                s.build_number = n;
                s
            })
            .collect();
        for s in &specs {
            exec.submit(s.clone()).await.unwrap();
        }
        let queued = &specs[2];
        until("two builds run", || exec.running() == 2).await;
        let stopped = exec
            .stop(BuildSelector {
                app: queued.app.clone(),
                app_uuid: queued.app_uuid.clone(),
                build_number: Some(3),
            })
            .await
            .unwrap();
        assert_eq!(stopped, 1);
        until("the stopped build's outcome is recorded", || {
            // (Without a callback to send, a finished record is let go at once.)
            exec.inner
                .record(queued.build_uuid)
                .is_none_or(|r| r.phase == Phase::Finished && r.outcome.is_some())
        })
        .await;
    }

    /// A `POST /` whose client went away while its journal write was pending (hyper drops
    /// the request's future): the build still runs, and a retried `POST /` is a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_whose_client_hung_up_while_it_was_saved_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let exec = executor(dir.path(), Arc::new(local_storage(dir.path())), false).await;
        let spec = crate::build::tests::spec();
        let id = spec.build_uuid;
        let mut post = Box::pin(exec.submit(spec.clone()));
        // Polled until it waits for the journal write (its data: archive staged), then
        // dropped.
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if futures::poll!(post.as_mut()).is_ready() {
                panic!("answered before its write could have been synced");
            }
            if exec.inner.lock_records().contains(&id) {
                break;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        assert!(exec.inner.lock_records().contains(&id), "accepted");
        drop(post);
        // The client tries again: the same build, answered 200.
        exec.submit(spec).await.unwrap();
        let ended = || exec.inner.record(id).is_none_or(|r| r.outcome.is_some());
        until("the build runs and ends", ended).await;
    }

    /// A `POST /` whose journal write fails: a duplicate arriving meanwhile never finds the
    /// record without the acceptance under way (it would answer 200 for a dropped build).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duplicate_of_a_build_whose_write_failed_is_never_told_it_was_saved() {
        let dir = tempfile::tempdir().unwrap();
        let exec = executor(dir.path(), Arc::new(local_storage(dir.path())), false).await;
        let spec = crate::build::tests::spec();
        let id = spec.build_uuid;
        let mut rec = Record {
            seq: 0,
            pending_sent: true,
            final_sent: false,
            phase: Phase::Queued,
            outcome: None,
            spec,
            accepted_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            timings: StageTimings::default(),
        };
        let (_, first) = {
            let mut records = exec.inner.lock_records();
            exec.inner
                .accept_locked(&mut records, &mut rec, false)
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let failed = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(state::StateError::WriterStopped)
        };
        let settling = {
            let exec = exec.clone();
            tokio::spawn(async move { exec.settle(id, rec, failed, first).await })
        };
        // What a duplicate sees, looked at under the records' lock while the write fails.
        let seen = tokio::task::spawn_blocking({
            let exec = exec.clone();
            move || {
                std::thread::sleep(Duration::from_millis(50));
                let records = exec.inner.lock_records();
                std::thread::sleep(Duration::from_millis(300));
                (
                    records.contains(&id),
                    exec.inner.accepting.join(&id).is_some(),
                )
            }
        })
        .await
        .unwrap();
        assert_ne!(seen, (true, false), "known, and no acceptance to wait for");
        assert!(settling.await.unwrap().is_err());
        assert!(!exec.inner.lock_records().contains(&id));
    }

    /// The write that records a build's final callback fails (a full disk): it is written
    /// again, so neither its credentials nor a callback still owed stay on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_of_the_final_callbacks_record_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let exec = executor(dir.path(), Arc::new(local_storage(dir.path())), false).await;
        let state = dir.path().join("state");
        // The receiver fills the "disk" as the final callback arrives, for 300 ms.
        use crate::local::state::tests::file_size_limit;
        let full = {
            let state = state.clone();
            move || {
                let biggest = std::fs::read_dir(&state)
                    .unwrap()
                    .flatten()
                    .filter_map(|f| f.metadata().ok().map(|m| m.len()))
                    .max()
                    .unwrap_or(0);
                file_size_limit(Some(biggest));
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_millis(300));
                    file_size_limit(None);
                });
            }
        };
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move |body: String| async move {
                if !body.contains("pending") {
                    full();
                }
                "ok"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut spec = crate::build::tests::spec();
        spec.callback = Some(format!("http://{addr}/cb"));
        let id = spec.build_uuid;
        exec.submit(spec).await.unwrap();
        until("the final callback is recorded", || {
            exec.inner.record(id).is_none()
        })
        .await;
        // On disk as done (a restart sends nothing again), scrubbed; the journal's earlier
        // lines of it go at the next compaction.
        let done = std::fs::read_to_string(state.join("done.log")).unwrap_or_default();
        let line = done
            .lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("not recorded as done: {done}"));
        assert!(
            !line.contains("cb-token") && !line.contains("regpass"),
            "{line}"
        );
    }

    /// A build whose task panics stops counting as active: a follower of its log ends, and
    /// a later build of its number runs instead of waiting for it for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_whose_task_panics_leaves_its_number_free() {
        let dir = tempfile::tempdir().unwrap();
        // The build fails at once, then its log's upload panics.
        let exec = executor(
            dir.path(),
            Arc::new(PanicOnLogUpload(local_storage(dir.path()))),
            false,
        )
        .await;
        let first = crate::build::tests::spec();
        let mut second = crate::build::tests::spec();
        second.build_uuid = Uuid::new_v4();
        // Its outcome recorded (and, with no callback to send, its record let go).
        let ended = |id: Uuid| exec.inner.record(id).is_none_or(|r| r.outcome.is_some());
        exec.submit(first.clone()).await.unwrap();
        until("the first build ends", || ended(first.build_uuid)).await;
        let (app, app_uuid, n) = (&first.app, &first.app_uuid, first.build_number);
        let start = std::time::Instant::now();
        while exec.is_active(app, app_uuid, n).await {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the build whose task panicked still counts as active"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exec.submit(second.clone()).await.unwrap();
        until("a later build of that number runs", || {
            ended(second.build_uuid)
        })
        .await;
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(20), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
