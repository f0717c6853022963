//! The local executor's durable state under `DATA_DIR/state` (files mode 0600: they hold
//! credentials of builds that have not finished).
//!
//! - `journal-{gen}.log`: one JSON line per change of a build's record. One writer thread
//!   appends every change waiting when it wakes in one write and one fsync (group commit),
//!   and each caller awaits the fsync of its batch. A burst of `POST /` therefore costs one
//!   fsync per batch instead of one per build, and no lock is held across the I/O. Changes
//!   whose loss in a power cut costs only a repeat (`Durability::Written`: a build marked
//!   running, a callback marked sent) wait for the write alone, which outlives the process;
//!   the next fsync, or one within LAZY_SYNC, makes them durable. So the fsyncs a `POST /`
//!   queues behind are only those of other acceptances and of finished builds.
//! - `snapshot.log`: the last line of every unfinished build, written by compaction.
//! - `done.log`: one line per build whose final callback is done (credentials scrubbed);
//!   it is what makes a repeated `POST /` idempotent after a restart.
//!
//! Compaction starts a new journal segment and, on a thread of its own, folds the older
//! segments into the snapshot, dropping finished builds. It runs when a segment grows large
//! and shortly after a build finishes, so a finished build's credentials leave the disk
//! within about a second. Replay order is snapshot, then segments by generation; the last
//! line of a build wins. Per-build `{build_uuid}.json` files of earlier versions are folded
//! in at start.

use crate::build::{BuildSpec, Outcome, StageTimings};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Queued,
    Running,
    Finished,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub spec: BuildSpec,
    /// Submission order; the queue runs lowest first.
    pub seq: u64,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Callback deliveries done (or given up); checked before sending, so none repeats.
    #[serde(default)]
    pub pending_sent: bool,
    #[serde(default)]
    pub final_sent: bool,
    pub accepted_at: chrono::DateTime<chrono::Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How long each stage took (filled as the build goes).
    #[serde(default)]
    pub timings: StageTimings,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("cannot write the build state under {dir}: {source} (check that DATA_DIR is writable and not full)")]
    Write {
        dir: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("the build state writer stopped; restart the service")]
    WriterStopped,
    #[error("cannot encode a build record: {0}")]
    Encode(Arc<serde_json::Error>),
}

/// A segment larger than this is compacted even while builds keep arriving.
const SEGMENT_LIMIT: u64 = 16 * 1024 * 1024;
/// How long a finished build's superseded lines (with its credentials) may stay on disk.
const SCRUB_DELAY: Duration = Duration::from_secs(1);
/// No change for this long: the store is idle, and compaction runs at once.
const IDLE: Duration = Duration::from_millis(50);
/// The longest a `Durability::Written` change stays unsynced when no synced batch follows.
const LAZY_SYNC: Duration = Duration::from_millis(20);
/// After a compaction, the next one for scrubbing waits this many times as long as it took,
/// so compaction (which rewrites every queued build's line) takes at most a tenth of a core
/// however long the queue is. Credentials of finished builds stay on disk that much longer
/// under a burst.
const REST_FACTOR: u32 = 9;
const SNAPSHOT: &str = "snapshot.log";
const DONE: &str = "done.log";

struct Op {
    line: Vec<u8>,
    final_sent: bool,
    durability: Durability,
    ack: oneshot::Sender<Result<(), StateError>>,
}

/// What a saved change's future waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsynced): survives a power cut. For what must not be redone or lost: an
    /// accepted build, a build's outcome before its callbacks go.
    Synced,
    /// Written (in the page cache): survives the process being killed, and is synced soon
    /// after. For a change whose loss in a power cut only repeats something: a build marked
    /// running (it runs again), a callback marked sent (it is sent again).
    Written,
}

/// When the writer began the disk work it is doing now; 0 while it waits for changes. A
/// disk that stops answering (a lost network volume, a frozen filesystem) blocks the writer
/// in a system call, so only a watcher from outside can tell.
struct Busy {
    epoch: Instant,
    /// Milliseconds since `epoch`, plus one (0: idle).
    since_ms: AtomicU64,
}

impl Busy {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            since_ms: AtomicU64::new(0),
        }
    }

    /// Marks the writer busy from now, unless it already is (then from then).
    fn enter(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self
            .since_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn leave(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    /// How long the current disk work has taken so far (`None` while idle).
    fn for_how_long(&self) -> Option<std::time::Duration> {
        let since = self.since_ms.load(Ordering::Relaxed).checked_sub(1)?;
        Some(
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(since)),
        )
    }
}

/// Handle to the state; cheap to share. Writes go to the writer thread.
pub struct StateStore {
    /// Held for the store's life: a second process on the same folder would fold away this
    /// one's live journal segment and run its queue too.
    _lock: File,
    tx: mpsc::Sender<Op>,
    /// How many times the writer has fsynced the journal.
    syncs: Arc<AtomicU64>,
    /// Whether the writer's last batch failed (a full disk): `/octhc` says so.
    failing: Arc<AtomicBool>,
    /// Since when the writer has been in its current disk work: a stalled disk.
    busy: Arc<Busy>,
    /// Builds whose final callback is done: a repeated POST of one starts nothing.
    done: Mutex<HashSet<Uuid>>,
}

/// What a previous process left: unfinished builds in submission order, and the next seq.
pub struct Recovered {
    pub records: Vec<Record>,
    pub next_seq: u64,
}

impl StateStore {
    /// Opens (creating) the state folder, replays it, folds it into a fresh snapshot and
    /// starts the writer thread. Blocking: call once at start.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<(Self, Recovered)> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let lock = lock_folder(&dir)?;
        let (done, mut next_seq) = read_done(&dir.join(DONE))?;
        let mut done = done;
        let segments = segments(&dir)?;
        let mut live: HashMap<Uuid, Record> = HashMap::new();
        let mut replay = |path: &Path| -> std::io::Result<()> {
            for_each_line(path, |line| match serde_json::from_slice::<Record>(line) {
                Ok(rec) => {
                    live.insert(rec.spec.build_uuid, rec);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable build record")
                }
            })
        };
        replay(&dir.join(SNAPSHOT))?;
        for (_, path) in &segments {
            replay(path)?;
        }
        // Per-build files of earlier versions: the journal, when it has the build, is newer.
        let legacy = legacy_files(&dir)?;
        for path in &legacy {
            match std::fs::read(path).map(|b| serde_json::from_slice::<Record>(&b)) {
                Ok(Ok(rec)) => {
                    live.entry(rec.spec.build_uuid).or_insert(rec);
                }
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable build record")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable build record")
                }
            }
        }
        // Finished builds move to done.log (durably) before the journal forgets them.
        let mut done_file = open_append(&dir.join(DONE))?;
        end_torn_line(&mut done_file)?;
        let mut moved = false;
        for rec in live.values().filter(|r| r.final_sent) {
            if done.insert(rec.spec.build_uuid) {
                let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
                line.push(b'\n');
                done_file.write_all(&line)?;
                moved = true;
            }
        }
        if moved {
            done_file.sync_data()?;
        }
        live.retain(|id, _| !done.contains(id));
        let mut records: Vec<Record> = live.into_values().collect();
        records.sort_by_key(|r| r.seq);
        next_seq = next_seq.max(records.last().map_or(0, |r| r.seq + 1));

        let snapshot_len = write_snapshot(&dir, |out| {
            for rec in &records {
                out.write_all(&encode(rec).map_err(std::io::Error::other)?)?;
            }
            Ok(())
        })?;
        for path in segments.iter().map(|(_, p)| p).chain(&legacy) {
            remove_if_exists(path)?;
        }
        let gen = segments.last().map_or(1, |(g, _)| g + 1);
        let journal = open_append(&segment_path(&dir, gen))?;
        sync_dir(&dir)?;

        let (tx, rx) = mpsc::channel();
        let syncs = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Busy::new());
        let writer = Writer {
            syncs: syncs.clone(),
            failing: failing.clone(),
            busy: busy.clone(),
            dir: dir.clone(),
            gen,
            journal,
            journal_len: 0,
            done: done_file,
            first_final: None,
            unsynced: None,
            compaction: Arc::new(Compaction {
                snapshot_len: AtomicU64::new(snapshot_len),
                ..Compaction::default()
            }),
        };
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(rx))?;
        let store = Self {
            _lock: lock,
            tx,
            syncs,
            failing,
            busy,
            done: Mutex::new(done),
        };
        Ok((store, Recovered { records, next_seq }))
    }

    /// Whether the last batch of changes could not be written (until one can).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// How long the writer has been inside one write or fsync, when that is `after` or more:
    /// the disk under the state has stopped answering (changes wait for it meanwhile).
    pub fn stalled(&self, after: Duration) -> Option<Duration> {
        self.busy.for_how_long().filter(|d| *d >= after)
    }

    /// How many times the journal has been fsynced since the store opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Whether this build finished (final callback done) in this or an earlier process.
    pub fn is_done(&self, id: &Uuid) -> bool {
        self.done.lock().map(|d| d.contains(id)).unwrap_or(false)
    }

    /// Queues `rec` for the journal now (so calls made in order are written in order) and
    /// returns a future that resolves once it is on disk. Call it under the lock that
    /// orders a build's changes; await it after releasing that lock.
    pub fn save(
        &self,
        rec: &Record,
    ) -> impl std::future::Future<Output = Result<(), StateError>> + Send + 'static {
        let queued = encode(rec).map(|line| {
            self.save_line(
                rec.spec.build_uuid,
                rec.final_sent,
                line,
                Durability::Synced,
            )
        });
        async move { queued?.await }
    }

    /// `save` of a record already encoded (by `encode`), resolving once `durability` holds.
    pub fn save_line(
        &self,
        id: Uuid,
        final_sent: bool,
        line: Vec<u8>,
        durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), StateError>> + Send + 'static {
        let (ack, done) = oneshot::channel();
        if final_sent {
            if let Ok(mut d) = self.done.lock() {
                d.insert(id);
            }
        }
        let op = Op {
            line,
            final_sent,
            durability,
            ack,
        };
        let queued = self.tx.send(op).map_err(|_| StateError::WriterStopped);
        async move {
            queued?;
            done.await.map_err(|_| StateError::WriterStopped)?
        }
    }
}

/// A record as its journal line (newline-terminated).
pub fn encode(rec: &Record) -> Result<Vec<u8>, StateError> {
    let mut line = serde_json::to_vec(rec).map_err(|e| StateError::Encode(Arc::new(e)))?;
    line.push(b'\n');
    Ok(line)
}

struct Writer {
    dir: PathBuf,
    gen: u64,
    journal: File,
    journal_len: u64,
    done: File,
    /// When the oldest final record not yet compacted away was written.
    first_final: Option<Instant>,
    /// Since when the journal holds `Durability::Written` lines no fsync has covered.
    unsynced: Option<Instant>,
    syncs: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    busy: Arc<Busy>,
    compaction: Arc<Compaction>,
}

/// What the writer knows of the compaction thread.
#[derive(Default)]
struct Compaction {
    running: AtomicBool,
    /// The size of the snapshot the last compaction wrote.
    snapshot_len: AtomicU64,
    /// No compaction for scrubbing before this (see REST_FACTOR).
    rest_until: Mutex<Option<Instant>>,
}

impl Compaction {
    fn rested(&self) -> bool {
        self.rest_until
            .lock()
            .map_or(true, |t| t.is_none_or(|t| Instant::now() >= t))
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Op> = Vec::new();
        loop {
            // Busy from here to the wait for changes, and from a change (or a timer) on.
            self.busy.enter();
            // Unsynced lines get their fsync once LAZY_SYNC passes without a synced batch, also
            // while changes keep coming (a receive with no time left would just take the next).
            if self.unsynced.is_some_and(|t| t.elapsed() >= LAZY_SYNC) {
                self.sync_lazy();
            }
            let sync_in = self.unsynced.map(|t| LAZY_SYNC.saturating_sub(t.elapsed()));
            // Quiet for IDLE with finished builds to fold away: compact then, it costs
            // nobody. (A gap between two batches of a burst is not quiet.)
            let compact_in = self.first_final.map(|_| IDLE);
            self.busy.leave();
            let op = match sync_in.into_iter().chain(compact_in).min() {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(op) => op,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.busy.enter();
                        if self.unsynced.is_some() {
                            self.sync_lazy();
                        } else {
                            self.maybe_compact(true);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.sync_lazy();
                        return;
                    }
                },
                None => match rx.recv() {
                    Ok(op) => op,
                    Err(_) => return,
                },
            };
            self.busy.enter();
            batch.push(op);
            // Everything that queued up meanwhile joins this batch (bounded, so acks flow).
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let result = self.commit(&batch).map_err(|e| StateError::Write {
                dir: self.dir.clone(),
                source: Arc::new(e),
            });
            if let Err(e) = &result {
                tracing::error!(error = %e, "build state not written");
            }
            self.failing.store(result.is_err(), Ordering::Relaxed);
            for op in batch.drain(..) {
                let _ = op.ack.send(result.clone());
            }
            // Busy: compact once a finished build's lines are SCRUB_DELAY old, or the segment
            // is large.
            self.maybe_compact(false);
        }
    }

    /// Writes (and, when one asks for it, syncs) a batch; on an error, takes every line of
    /// it back out of the files, since each of its callers hears that it was not saved (a
    /// refused POST must not run after a restart, and a torn line must not join the next).
    fn commit(&mut self, batch: &[Op]) -> std::io::Result<()> {
        let journal_was = self.journal_len;
        let done_was = match batch.iter().any(|o| o.final_sent) {
            true => Some(self.done.metadata()?.len()),
            false => None,
        };
        let result = self.write_batch(batch);
        if result.is_err() {
            let undone = self
                .journal
                .set_len(journal_was)
                .and_then(|()| self.journal.sync_data())
                .and_then(|()| match done_was {
                    Some(len) => self.done.set_len(len),
                    None => Ok(()),
                });
            match undone {
                Ok(()) => self.journal_len = journal_was,
                Err(e) => {
                    tracing::error!(error = %e, dir = %self.dir.display(), "cannot take a failed batch back out of the build state journal");
                    // At least nothing later joins a torn line: continue in a fresh segment.
                    self.rotate_segment();
                }
            }
        }
        result
    }

    fn write_batch(&mut self, batch: &[Op]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(batch.iter().map(|o| o.line.len()).sum());
        let mut done = Vec::new();
        for op in batch {
            buf.extend_from_slice(&op.line);
            if op.final_sent {
                done.extend_from_slice(&op.line);
            }
        }
        self.journal.write_all(&buf)?;
        self.journal_len += buf.len() as u64;
        if !done.is_empty() {
            // Synced by compaction before the journal forgets these builds; until then the
            // journal's own final line is what counts.
            self.done.write_all(&done)?;
        }
        if batch.iter().any(|o| o.durability == Durability::Synced) {
            self.sync()?;
        } else {
            self.unsynced.get_or_insert_with(Instant::now);
        }
        if !done.is_empty() {
            self.first_final.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Fsyncs the journal's data: this batch's lines and the earlier unsynced ones.
    fn sync(&mut self) -> std::io::Result<()> {
        self.journal.sync_data()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.unsynced = None;
        Ok(())
    }

    /// Syncs the lines written as `Durability::Written` that no batch has synced since.
    fn sync_lazy(&mut self) {
        if self.unsynced.is_none() {
            return;
        }
        // Still unsynced after an error: tried again LAZY_SYNC from now (not at once, in a
        // loop of errors); nobody waits for it.
        if let Err(e) = self.sync() {
            self.unsynced = Some(Instant::now());
            tracing::error!(error = %e, dir = %self.dir.display(), "cannot sync the build state journal")
        }
    }

    fn rotate_segment(&mut self) -> bool {
        // Later fsyncs go to the new segment: this one's unsynced lines get theirs now.
        self.sync_lazy();
        let next = self.gen + 1;
        // The new file's folder entry is synced before any line in it is acknowledged.
        match open_append(&segment_path(&self.dir, next)).and_then(|f| {
            sync_dir(&self.dir)?;
            Ok(f)
        }) {
            Ok(f) => {
                self.journal = f;
                self.gen = next;
                self.journal_len = 0;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %self.dir.display(), "cannot start a new build state segment");
                false
            }
        }
    }

    fn maybe_compact(&mut self, idle: bool) {
        let c = self.compaction.clone();
        let due = compaction_due(
            self.first_final.map(|t| t.elapsed()),
            idle,
            c.rested(),
            self.journal_len,
            c.snapshot_len.load(Ordering::SeqCst),
        );
        if !due || c.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let upto = self.gen;
        if !self.rotate_segment() {
            c.running.store(false, Ordering::SeqCst);
            return;
        }
        self.first_final = None;
        let dir = self.dir.clone();
        let shared = c.clone();
        let spawned = std::thread::Builder::new()
            .name("state-compact".into())
            .spawn(move || {
                // Background work: the writer (and so every POST) goes first.
                super::runtime::lower_priority();
                let started = Instant::now();
                match compact(&dir, upto) {
                    Ok(len) => {
                        tracing::debug!(took_ms = started.elapsed().as_millis() as u64, snapshot_bytes = len, "build state compacted");
                        shared.snapshot_len.store(len, Ordering::SeqCst);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, dir = %dir.display(), "build state compaction failed; it is retried later");
                    }
                }
                if let Ok(mut t) = shared.rest_until.lock() {
                    *t = Some(Instant::now() + started.elapsed() * REST_FACTOR);
                }
                shared.running.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            c.running.store(false, Ordering::SeqCst);
        }
    }
}

/// Whether to compact now: to scrub finished builds (`final_age`: how long the oldest
/// uncompacted one has been final) once they are SCRUB_DELAY old or the store is idle, if the
/// last compaction has rested; or because the segment is large. A compaction rewrites the
/// whole snapshot, so "large" means at least the snapshot's size: a long queue then costs
/// each write O(1) amortized instead of O(queue).
fn compaction_due(
    final_age: Option<Duration>,
    idle: bool,
    rested: bool,
    journal_len: u64,
    snapshot_len: u64,
) -> bool {
    let scrub = final_age.is_some_and(|age| idle || age >= SCRUB_DELAY) && rested;
    scrub || journal_len >= SEGMENT_LIMIT.max(snapshot_len)
}

/// Folds the snapshot and every segment up to `upto` into a new snapshot without the
/// finished builds, then removes those segments. Streams: the first pass over the segments
/// keeps only where each build's last line is, the second copies the snapshot's lines of
/// builds the segments do not mention and the segments' last lines, so memory stays small
/// however many builds are queued. Returns the new snapshot's size.
fn compact(dir: &Path, upto: u64) -> std::io::Result<u64> {
    #[derive(Deserialize)]
    struct Head {
        spec: HeadSpec,
        #[serde(default)]
        final_sent: bool,
    }
    #[derive(Deserialize)]
    struct HeadSpec {
        build_uuid: Uuid,
    }
    // Every final line in these segments was appended to done.log before the rotation.
    OpenOptions::new()
        .append(true)
        .open(dir.join(DONE))?
        .sync_data()?;
    let old: Vec<PathBuf> = segments(dir)?
        .into_iter()
        .filter(|(g, _)| *g <= upto)
        .map(|(_, p)| p)
        .collect();
    // Build → where its last line in the segments is (file and offset packed in one u64),
    // or FINISHED. The snapshot holds one line per build, so its builds need no entry: one
    // absent here is copied as it is. This index is the compaction's memory peak, so it
    // covers only what changed since the last compaction (a scrub a second after a build
    // finished: a second's worth), not the whole queue.
    let mut last: HashMap<Uuid, u64> = HashMap::new();
    for (i, path) in old.iter().enumerate() {
        for_each_line_at(path, |at, line| {
            if let Ok(h) = serde_json::from_slice::<Head>(line) {
                let at = if h.final_sent {
                    FINISHED
                } else {
                    position(i, at)
                };
                last.insert(h.spec.build_uuid, at);
            }
        })?;
    }
    let mut keep: Vec<u64> = last.values().copied().filter(|&p| p != FINISHED).collect();
    keep.sort_unstable();
    let len = write_snapshot(dir, |out| {
        let mut result = Ok(());
        for_each_line(&dir.join(SNAPSHOT), |line| {
            let unchanged = serde_json::from_slice::<Head>(line)
                .is_ok_and(|h| !h.final_sent && !last.contains_key(&h.spec.build_uuid));
            if result.is_ok() && unchanged {
                result = out.write_all(line).and_then(|()| out.write_all(b"\n"));
            }
        })?;
        result?;
        drop(last);
        // Segment lines are visited in (file, offset) order, as `keep` is sorted; a
        // position passed without a match (which unchanged files cannot give) is skipped,
        // never waited on.
        let mut next = keep.iter().copied().peekable();
        for (i, path) in old.iter().enumerate() {
            let first = position(i, 0);
            while next.next_if(|&p| p < first).is_some() {}
            if next.peek().is_none_or(|&p| p >> OFFSET_BITS != i as u64) {
                continue;
            }
            let mut result = Ok(());
            for_each_line_at(path, |at, line| {
                let here = position(i, at);
                while next.next_if(|&p| p < here).is_some() {}
                if result.is_ok() && next.next_if_eq(&here).is_some() {
                    result = out.write_all(line).and_then(|()| out.write_all(b"\n"));
                }
            })?;
            result?;
        }
        Ok(())
    })?;
    for path in &old {
        remove_if_exists(path)?;
    }
    Ok(len)
}

/// Bits of a packed position that hold the line's offset (256 TiB); the rest, the file's index.
const OFFSET_BITS: u32 = 48;
/// In compaction's index: the build's last line is final (no packed position is this large).
const FINISHED: u64 = u64::MAX;

/// A line's place among the compacted files: file `i`, byte offset `at`, in one sortable u64.
fn position(i: usize, at: u64) -> u64 {
    ((i as u64) << OFFSET_BITS) | (at & ((1 << OFFSET_BITS) - 1))
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn segment_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("journal-{gen:020}.log"))
}

/// Journal segments, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let gen = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(g) = gen {
            out.push((g, path));
        }
    }
    out.sort();
    Ok(out)
}

fn legacy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") || name.ends_with(".tmp") {
            out.push(path);
        }
    }
    Ok(out)
}

/// Calls `f` with every complete line of `path` (a missing file has none). A torn last
/// line (a write cut short by a crash, never acknowledged) is ignored.
fn for_each_line(path: &Path, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
    for_each_line_at(path, |_, line| f(line))
}

/// Like `for_each_line`, with each line's byte offset in the file.
fn for_each_line_at(path: &Path, mut f: impl FnMut(u64, &[u8])) -> std::io::Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut line = Vec::new();
    let mut at = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            return Ok(());
        }
        line.pop();
        if !line.is_empty() {
            f(at, &line);
        }
        at += n as u64;
    }
}

/// The ids in done.log and the seq after the highest one.
fn read_done(path: &Path) -> std::io::Result<(HashSet<Uuid>, u64)> {
    #[derive(Deserialize)]
    struct Done {
        spec: DoneSpec,
        seq: u64,
    }
    #[derive(Deserialize)]
    struct DoneSpec {
        build_uuid: Uuid,
    }
    let mut ids = HashSet::new();
    let mut next = 0;
    for_each_line(path, |line| {
        if let Ok(d) = serde_json::from_slice::<Done>(line) {
            ids.insert(d.spec.build_uuid);
            next = next.max(d.seq + 1);
        }
    })?;
    Ok((ids, next))
}

/// Takes the folder's lock (`flock` on `lock`), or says who has it. The kernel drops it
/// when the process dies, however it dies.
fn lock_folder(dir: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join("lock"))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{} is in use by another buildshuttle process: give each process its own DATA_DIR",
                    dir.display()
                ),
            ));
        }
        return Err(e);
    }
    Ok(file)
}

/// Ends a line cut short by a crash (done.log is synced only now and then), so what is
/// appended next starts a line of its own instead of joining the fragment, unreadable.
fn end_torn_line(file: &mut File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut last = [0u8];
    if len > 0 && file.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
        file.write_all(b"\n")?;
        file.sync_data()?;
    }
    Ok(())
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true) // for end_torn_line
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Replaces the snapshot atomically with what `fill` writes: temp file (buffered), fsync,
/// rename, fsync of the folder. Returns its size.
fn write_snapshot(
    dir: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let tmp = dir.join(".snapshot.log.tmp");
    let written = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, Paced::new(file));
        fill(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?.file;
        file.sync_data()?;
        file.metadata().map(|m| m.len())
    })();
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            // A half-written snapshot is as large as the disk let it be, when it is full.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dir.join(SNAPSHOT))?;
    sync_dir(dir)?;
    Ok(len)
}

/// How much of a snapshot may be written before it is pushed to the disk.
const PACE_CHUNK: u64 = 1024 * 1024;

/// A file written in order whose data goes to the disk a chunk at a time while it is being
/// written, each chunk waiting for the one before (as RocksDB's `bytes_per_sync`). Without
/// this a compaction leaves tens of MiB dirty and its final fsync floods the disk queue,
/// so every `POST /` waiting on the journal's fsync meanwhile waits behind it.
struct Paced {
    file: File,
    written: u64,
    /// Where the chunk being written starts.
    chunk: u64,
    /// Where the chunk before it (whose writeback was started) starts.
    started: Option<u64>,
}

impl Paced {
    fn new(file: File) -> Self {
        Self {
            file,
            written: 0,
            chunk: 0,
            started: None,
        }
    }

    /// Starts writeback of `[from, to)`; with `wait`, first waits for any already under
    /// way there, and then for this one to finish.
    #[cfg(target_os = "linux")]
    fn sync_range(&self, from: u64, to: u64, wait: bool) {
        use std::os::fd::AsRawFd;
        let mut flags = libc::SYNC_FILE_RANGE_WRITE;
        if wait {
            flags |= libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        }
        let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return;
        };
        // SAFETY: plain syscall on a descriptor this struct owns; no memory is passed.
        // Only a hint: the final fsync is what makes the snapshot durable.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), from, len, flags);
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_range(&self, _from: u64, _to: u64, _wait: bool) {}
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.chunk >= PACE_CHUNK {
            // Wait for the chunk started last time, start this one: the disk is kept busy
            // with at most two chunks of ours.
            if let Some(from) = self.started {
                self.sync_range(from, self.chunk, true);
            }
            self.sync_range(self.chunk, self.written, false);
            self.started = Some(self.chunk);
            self.chunk = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A queued record of a new build (the test spec, with credentials).
    pub(crate) fn rec(seq: u64) -> Record {
        let mut spec = crate::build::tests::spec();
        spec.build_uuid = Uuid::new_v4();
        Record {
            spec,
            seq,
            phase: Phase::Queued,
            outcome: None,
            pending_sent: false,
            final_sent: false,
            accepted_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            timings: StageTimings::default(),
        }
    }

    fn all_state(dir: &Path) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            out.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
        }
        out
    }

    #[test]
    fn compaction_waits_for_its_rest_and_for_a_journal_as_large_as_the_snapshot() {
        let mib = 1024 * 1024;
        let old = Some(SCRUB_DELAY);
        // Scrubbing: a second after a build finished, or when idle; never while resting.
        assert!(compaction_due(old, false, true, 0, 0));
        assert!(compaction_due(Some(Duration::ZERO), true, true, 0, 0));
        assert!(!compaction_due(Some(Duration::ZERO), false, true, 0, 0));
        assert!(!compaction_due(old, true, false, 0, 0));
        assert!(!compaction_due(None, true, true, 0, 0));
        // Size: 16 MiB, or the snapshot's size when that is larger (a long queue).
        assert!(compaction_due(None, false, false, 16 * mib, 0));
        assert!(!compaction_due(None, false, false, 16 * mib, 100 * mib));
        assert!(compaction_due(None, false, false, 100 * mib, 100 * mib));
    }

    #[tokio::test]
    async fn concurrent_saves_are_durable_and_the_last_change_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, rec0) = StateStore::open(dir.path()).unwrap();
        assert!(rec0.records.is_empty());
        let store = Arc::new(store);
        let mut recs: Vec<Record> = (0..200).map(rec).collect();
        let saves: Vec<_> = recs.iter().map(|r| store.save(r)).collect();
        for s in futures::future::join_all(saves).await {
            s.unwrap();
        }
        for r in recs.iter_mut().take(50) {
            r.phase = Phase::Running;
            store.save(r).await.unwrap();
        }
        drop(store);
        let (store, got) = StateStore::open(dir.path()).unwrap();
        assert_eq!(got.records.len(), 200);
        assert_eq!(got.next_seq, 200);
        let running = got
            .records
            .iter()
            .filter(|r| r.phase == Phase::Running)
            .count();
        assert_eq!(running, 50);
        assert!(got.records.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(!store.is_done(&recs[0].spec.build_uuid));
    }

    /// `Written` changes are acknowledged without an fsync of their own, and synced soon
    /// after; a `Synced` one waits for its fsync. Both replay.
    #[tokio::test]
    async fn written_changes_wait_for_no_fsync_and_are_synced_soon_after() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let recs: Vec<Record> = (0..50).map(rec).collect();
        let started = Instant::now();
        for r in &recs {
            let line = encode(r).unwrap();
            store
                .save_line(r.spec.build_uuid, false, line, Durability::Written)
                .await
                .unwrap();
        }
        // One at a time, each alone in its batch: 50 fsyncs if each had its own; here only
        // the lazy ones, at most one per LAZY_SYNC (however slow this machine is).
        let took = started.elapsed();
        let written = store.syncs();
        let lazy_bound = 1 + (took.as_millis() / LAZY_SYNC.as_millis()) as u64;
        assert!(
            written < 50 && written <= lazy_bound,
            "{written} fsyncs for 50 written changes in {took:?}"
        );
        // Synced with no other change to carry them (polled: a loaded machine may run the
        // writer late, and how soon is the benches' business, not this test's).
        let later = synced_within(&store, 1, Duration::from_secs(10)).await;
        assert!(later >= 1, "the written changes were never synced");
        let mut last = recs[49].clone();
        last.phase = Phase::Running;
        store.save(&last).await.unwrap();
        assert!(
            store.syncs() > later,
            "a synced change did not wait for an fsync"
        );
        drop(store);
        let (_store, got) = StateStore::open(dir.path()).unwrap();
        assert_eq!(got.records.len(), 50);
        assert_eq!(got.records[49].phase, Phase::Running);
    }

    /// The journal's fsync count once it reaches `want`, or after `within`.
    async fn synced_within(store: &StateStore, want: u64, within: Duration) -> u64 {
        let start = Instant::now();
        while store.syncs() < want && start.elapsed() < within {
            tokio::time::sleep(LAZY_SYNC).await;
        }
        store.syncs()
    }

    #[tokio::test]
    async fn finished_builds_leave_the_journal_and_their_credentials_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let mut a = rec(0);
        let b = rec(1);
        store.save(&a).await.unwrap();
        store.save(&b).await.unwrap();
        assert!(all_state(dir.path()).contains("regpass"));
        a.phase = Phase::Finished;
        a.final_sent = true;
        a.spec = a.spec.scrubbed();
        store.save(&a).await.unwrap();
        assert!(store.is_done(&a.spec.build_uuid));
        // Compaction runs on its own within about a second; b still needs its credentials.
        let start = Instant::now();
        while all_state(dir.path()).matches("regpass").count() > 1 {
            assert!(start.elapsed() < Duration::from_secs(10), "not compacted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(store);
        let (store, got) = StateStore::open(dir.path()).unwrap();
        let ids: Vec<_> = got.records.iter().map(|r| r.spec.build_uuid).collect();
        assert_eq!(ids, vec![b.spec.build_uuid]);
        assert!(store.is_done(&a.spec.build_uuid), "done survives a restart");
        assert_eq!(got.next_seq, 2);
    }

    /// Files of this (test) process may not grow past `limit` bytes (`None`: no limit).
    pub(crate) fn file_size_limit(limit: Option<u64>) {
        // SAFETY: process-wide settings of this test's own process (nextest runs each test
        // in a process of its own); a write past the limit then fails with EFBIG instead of
        // raising SIGXFSZ.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
            lim.rlim_cur = limit.unwrap_or(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
    }

    #[tokio::test]
    async fn a_batch_that_fails_to_write_leaves_no_line_a_restart_would_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let (kept, refused, later) = (rec(1), rec(2), rec(3));
        store.save(&kept).await.unwrap();
        let (_, segment) = segments(dir.path()).unwrap().pop().unwrap();
        let len = std::fs::metadata(&segment).unwrap().len();
        // The next line gets 100 bytes in, then the disk is "full".
        file_size_limit(Some(len + 100));
        assert!(store.save(&refused).await.is_err(), "refused");
        assert!(store.failing(), "said so");
        file_size_limit(None);
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            len,
            "taken back out"
        );
        store.save(&later).await.unwrap();
        assert!(!store.failing(), "until a batch is written");
        drop(store);
        let (_, got) = StateStore::open(dir.path()).unwrap();
        let ids: Vec<_> = got.records.iter().map(|r| r.spec.build_uuid).collect();
        assert_eq!(ids, vec![kept.spec.build_uuid, later.spec.build_uuid]);
    }

    #[tokio::test]
    async fn a_final_line_whose_done_log_write_fails_is_not_final_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        // done.log larger than the journal will be, so a size limit can fail its write
        // alone, after the journal's line is complete.
        std::fs::write(dir.path().join(DONE), "padding\n".repeat(1024)).unwrap();
        let (store, _) = StateStore::open(dir.path()).unwrap();
        let mut a = rec(1);
        store.save(&a).await.unwrap();
        let (_, segment) = segments(dir.path()).unwrap().pop().unwrap();
        let len = std::fs::metadata(&segment).unwrap().len();
        a.phase = Phase::Finished;
        a.final_sent = true;
        file_size_limit(Some(len * 3));
        assert!(store.save(&a).await.is_err(), "refused");
        file_size_limit(None);
        drop(store);
        let (store, got) = StateStore::open(dir.path()).unwrap();
        assert!(!store.is_done(&a.spec.build_uuid));
        assert_eq!(got.records.len(), 1);
        assert!(!got.records[0].final_sent);
    }

    #[test]
    fn a_second_store_on_the_same_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = StateStore::open(dir.path()).unwrap();
        let err = StateStore::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string()
                .contains("in use by another buildshuttle process"),
            "{err}"
        );
        drop(first);
        assert!(StateStore::open(dir.path()).is_ok());
    }

    #[test]
    fn a_line_torn_at_the_end_of_done_log_does_not_swallow_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut finished = rec(7);
        finished.final_sent = true;
        std::fs::write(dir.path().join(DONE), br#"{"spec":{"bu"#).unwrap();
        std::fs::write(segment_path(dir.path(), 1), encode(&finished).unwrap()).unwrap();
        // The first open moves the finished build to done.log and drops the segment.
        drop(StateStore::open(dir.path()).unwrap());
        let (store, recovered) = StateStore::open(dir.path()).unwrap();
        assert!(store.is_done(&finished.spec.build_uuid));
        assert!(recovered.records.is_empty());
    }

    #[test]
    fn compaction_keeps_each_unfinished_builds_last_line_in_journal_order() {
        let dir = tempfile::tempdir().unwrap();
        // A journal line, newline included.
        let line = |r: &Record| encode(r).unwrap();
        let (a, b, c, d, e) = (rec(1), rec(2), rec(3), rec(4), rec(5));
        let mut a_running = a.clone();
        a_running.phase = Phase::Running;
        let mut b_done = b.clone();
        b_done.final_sent = true;
        let mut e_done = e.clone();
        e_done.final_sent = true;
        std::fs::write(dir.path().join(DONE), b"").unwrap();
        // The snapshot: a (changed since), d (untouched), e (finished since).
        std::fs::write(
            dir.path().join(SNAPSHOT),
            [line(&a), line(&d), line(&e)].concat(),
        )
        .unwrap();
        std::fs::write(
            segment_path(dir.path(), 1),
            [line(&b), line(&a_running), line(&c), line(&e_done)].concat(),
        )
        .unwrap();
        std::fs::write(segment_path(dir.path(), 2), line(&b_done)).unwrap();
        let len = compact(dir.path(), 2).unwrap();
        let snapshot = std::fs::read(dir.path().join(SNAPSHOT)).unwrap();
        assert_eq!(snapshot, [line(&d), line(&a_running), line(&c)].concat());
        assert_eq!(len, snapshot.len() as u64);
        assert!(!segment_path(dir.path(), 1).exists() && !segment_path(dir.path(), 2).exists());
        assert_eq!(position(1, 5) >> OFFSET_BITS, 1);
        assert!(position(0, u64::from(u32::MAX)) < position(1, 0));
    }

    #[test]
    fn a_snapshot_larger_than_a_few_paced_chunks_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Odd-sized writes, so chunk boundaries fall mid-write.
        let piece: Vec<u8> = (0..70_001u32).map(|i| (i % 251) as u8).collect();
        let pieces = (3 * PACE_CHUNK as usize) / piece.len() + 1;
        let len = write_snapshot(dir.path(), |out| {
            for _ in 0..pieces {
                out.write_all(&piece)?;
            }
            Ok(())
        })
        .unwrap();
        let written = std::fs::read(dir.path().join(SNAPSHOT)).unwrap();
        assert_eq!(len, written.len() as u64);
        assert_eq!(written, piece.repeat(pieces));
    }

    #[test]
    fn a_torn_last_line_and_old_per_build_files_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        let queued = rec(7);
        let mut finished = rec(3);
        finished.final_sent = true;
        finished.phase = Phase::Finished;
        for r in [&queued, &finished] {
            std::fs::write(
                dir.path().join(format!("{}.json", r.spec.build_uuid)),
                serde_json::to_vec(r).unwrap(),
            )
            .unwrap();
        }
        // A crash mid-append leaves a line without its newline: never acknowledged.
        let torn = serde_json::to_string(&rec(9)).unwrap();
        std::fs::write(segment_path(dir.path(), 4), &torn[..torn.len() / 2]).unwrap();
        let (store, got) = StateStore::open(dir.path()).unwrap();
        let ids: Vec<_> = got.records.iter().map(|r| r.spec.build_uuid).collect();
        assert_eq!(ids, vec![queued.spec.build_uuid]);
        assert!(store.is_done(&finished.spec.build_uuid));
        assert_eq!(got.next_seq, 8);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".json")), "{names:?}");
        assert!(
            names.contains(&format!("journal-{:020}.log", 5)),
            "{names:?}"
        );
    }
}
