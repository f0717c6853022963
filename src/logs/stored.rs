//! The stored log: lines appended to a spool file while the build runs (readable at once
//! through the logs route), handed to storage when it ends.

use super::later::Later;
use super::Sink;
use crate::storage::Storage;
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the logs of running builds are spooled. In local mode with local storage, the spool
/// folder is the store itself, so handing over is a no-op. With remote storage (S3) the spool
/// is a separate folder and a log leaves it once stored.
#[derive(Clone, Debug)]
pub struct LogFiles {
    dir: PathBuf,
    remove_when_stored: bool,
    /// Until when a finished log storage refused is tried again (`with_store_retries`).
    retry_until: Option<tokio::time::Instant>,
    /// Where a log storage refused is stored later (`store_refused_later`).
    later: Option<Arc<Later>>,
}

impl LogFiles {
    /// Spool folder that is also the store: logs stay where they are.
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            remove_when_stored: false,
            retry_until: None,
            later: None,
        })
    }

    /// Spool folder in front of remote storage: a log file is removed once it is stored, so
    /// the folder holds only running builds (and logs whose upload failed).
    pub fn spool(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        Ok(Self {
            remove_when_stored: true,
            ..Self::new(dir)?
        })
    }

    /// A finished log that storage refuses for a while (a 5xx, throttling, a connection that
    /// fails) is tried again (STORE_RETRIES), no pause starting after `until`. For a
    /// Kubernetes worker, whose spool goes with its pod; local mode keeps a log storage
    /// refused in its spool and serves it from there.
    pub fn with_store_retries(mut self, until: tokio::time::Instant) -> Self {
        self.retry_until = Some(until);
        self
    }

    /// A finished log that storage refused stays in the spool (served from there) and is
    /// stored later, in the background (see `later`): for a long-lived service (local mode
    /// with S3), whose spool outlives the build.
    pub fn store_refused_later(mut self) -> Self {
        self.later = Some(Arc::default());
        self
    }

    /// Appends `line` to the spooled log of `key` and stores it: the end of a build that
    /// ends without running (stopped while queued, interrupted by a restart). Left alone
    /// while a build of the same key writes its log, which is then the key's.
    pub async fn append_and_store(&self, key: &str, line: &str, storage: &Arc<dyn Storage>) {
        let Some(path) = self.path(key) else { return };
        if let Some(later) = &self.later {
            if !later.try_writing(key) {
                tracing::info!(
                    key,
                    line,
                    "a running build writes this log; the line goes to Kafka only"
                );
                return;
            }
        }
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            tracing::warn!(key, error = %e, "could not write a line to the spooled log");
        }
        if let Some(later) = &self.later {
            later.written(key);
        }
        // A no-op when the spool is the store.
        if self.remove_when_stored {
            hand_over(key, &path, storage, true, None, self.later.as_ref()).await;
        }
    }

    /// The logs a previous process left in the spool, to store (`store_leftovers`) once
    /// they are whole: read before this process's builds write there. None unless logs are
    /// stored later.
    pub fn leftovers(&self) -> Vec<String> {
        match &self.later {
            Some(_) => Later::leftovers(&self.dir),
            None => Vec::new(),
        }
    }

    /// Stores `keys` (from `leftovers`) in the background, starting at once, each unless a
    /// build is writing it or it is stored already.
    pub fn store_leftovers(&self, keys: Vec<String>, storage: &Arc<dyn Storage>) {
        let Some(later) = &self.later else { return };
        for key in keys {
            if let Some(path) = self.path(&key) {
                later.store(key, path, storage.clone(), std::time::Duration::ZERO);
            }
        }
    }

    /// The spool path of a log key, or `None` for a key that is not a plain name.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        crate::storage::check_key(key).ok()?;
        Some(self.dir.join(key))
    }
}

/// What a capped stored log keeps of its end (the outcome and the timings are there).
const TAIL_BYTES: usize = 64 * 1024;

pub struct StoredLog {
    key: String,
    path: PathBuf,
    file: Option<std::fs::File>,
    storage: Arc<dyn Storage>,
    failed_writes: u64,
    remove_when_stored: bool,
    retry_until: Option<tokio::time::Instant>,
    /// Told the file is written by `finish`, which takes it, or on drop (an unfinished log).
    later: Option<Arc<Later>>,
    /// Bytes written to the file, and what it may hold before only the tail is kept.
    written: u64,
    max: u64,
    /// Past `max`: the latest lines (at most TAIL_BYTES), written at the end after a note
    /// saying how much was left out.
    tail: VecDeque<String>,
    tail_bytes: usize,
    left_out: (u64, u64),
}

impl StoredLog {
    /// Starts (truncates) the spool file for `key`.
    pub fn create(
        files: &LogFiles,
        key: &str,
        storage: Arc<dyn Storage>,
        max: u64,
    ) -> std::io::Result<Self> {
        let path = files
            .path(key)
            .ok_or_else(|| std::io::Error::other(format!("log key {key:?} is not a plain name")))?;
        // Before the file is truncated: a retry of an older log under this key lets it be.
        if let Some(later) = &files.later {
            later.writing(key);
        }
        let file = std::fs::File::create(&path).inspect_err(|_| {
            if let Some(later) = &files.later {
                later.written(key);
            }
        })?;
        Ok(Self {
            key: key.to_string(),
            path,
            file: Some(file),
            storage,
            failed_writes: 0,
            remove_when_stored: files.remove_when_stored,
            retry_until: files.retry_until,
            later: files.later.clone(),
            written: 0,
            max,
            tail: VecDeque::new(),
            tail_bytes: 0,
            left_out: (0, 0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StoredLog {
    fn append(&mut self, line: &str) {
        // One write per line, unbuffered: the logs route reads the file while the build runs.
        if let Some(f) = &mut self.file {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            match f.write_all(&buf) {
                Ok(()) => self.written += buf.len() as u64,
                Err(_) => self.failed_writes += 1,
            }
        }
    }

    /// Writes the kept tail, after a line saying what was left out before it.
    fn end_tail(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        let (lines, bytes) = self.left_out;
        if lines > 0 {
            let note = format!(
                "[{lines} lines ({bytes} bytes) left out here: the stored log keeps its first MAX_LOG_BYTES ({}) and its last {} KiB]",
                self.max,
                TAIL_BYTES / 1024
            );
            self.append(&note);
        }
        while let Some(line) = self.tail.pop_front() {
            self.append(&line);
        }
    }
}

impl Sink for StoredLog {
    fn write_line(&mut self, line: &str) {
        if self.tail.is_empty() && self.written + (line.len() as u64) < self.max {
            return self.append(line);
        }
        self.tail_bytes += line.len() + 1;
        self.tail.push_back(line.to_string());
        while self.tail_bytes > TAIL_BYTES && self.tail.len() > 1 {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.len() + 1;
                self.left_out.0 += 1;
                self.left_out.1 += old.len() as u64 + 1;
            }
        }
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        // The whole log is in the file before the build counts as ended: a follower that
        // then reads to the end gets the outcome and `Build finished`, kept tail included.
        self.end_tail();
        drop(self.file.take());
        if self.failed_writes > 0 {
            tracing::warn!(key = %self.key, lines = self.failed_writes, "lines could not be written to the stored log");
        }
        let later = self.later.take();
        if let Some(later) = &later {
            later.written(&self.key);
        }
        Box::pin(async move {
            hand_over(
                &self.key,
                &self.path,
                &self.storage,
                self.remove_when_stored,
                self.retry_until,
                later.as_ref(),
            )
            .await;
        })
    }
}

impl Drop for StoredLog {
    /// A log dropped unfinished (its build's task panicked) lets its key go, so the file can
    /// be stored later.
    fn drop(&mut self) {
        if let Some(later) = &self.later {
            later.written(&self.key);
        }
    }
}

/// The pauses before each further try to store a finished log, once the storage client's own
/// attempts (five, within seconds) have failed. A worker pod's spool goes with the pod, so a
/// log not stored is lost: an outage of storage of up to about a minute is waited out. The
/// build's end (and its final callback) waits that long only while storage fails.
const STORE_RETRIES: [std::time::Duration; 4] = [
    std::time::Duration::from_secs(4),
    std::time::Duration::from_secs(8),
    std::time::Duration::from_secs(16),
    std::time::Duration::from_secs(32),
];

/// No further try starts once this long has passed since the first: a storage that hangs
/// (each of the client's attempts waits S3_TIMEOUT_SECONDS) is not waited on again.
const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(90);

/// Puts the spool file in storage and, when the spool is not the store, removes it. With
/// `retry_until`, a refusal worth trying again is, after each of STORE_RETRIES. With `later`,
/// a log still refused is stored later, in the background.
async fn hand_over(
    key: &str,
    path: &Path,
    storage: &Arc<dyn Storage>,
    remove: bool,
    retry_until: Option<tokio::time::Instant>,
    later: Option<&Arc<Later>>,
) {
    let started = tokio::time::Instant::now();
    let mut pauses = STORE_RETRIES.iter();
    loop {
        match storage.put_file(key, path).await {
            // Readers fall back from the spool to storage, which now has the whole log.
            Ok(()) if remove => {
                if let Err(e) = tokio::fs::remove_file(path).await {
                    tracing::warn!(key, error = %e, "could not remove the spooled log after storing it");
                }
                return;
            }
            Ok(()) => return,
            Err(e) => match pauses.next().filter(|p| {
                let at = tokio::time::Instant::now() + **p;
                e.is_transient()
                    && started.elapsed() + **p <= STORE_PATIENCE
                    && retry_until.is_some_and(|until| at <= until)
            }) {
                Some(pause) => {
                    tracing::warn!(key, error = %e, "could not store the build log; trying again in {pause:?}");
                    tokio::time::sleep(*pause).await;
                }
                // The spool file stays, so the log is still served from this host.
                None if !path.exists() => {
                    tracing::warn!(key, error = %e, "could not store the build log: its spool file is gone");
                    return;
                }
                None => {
                    tracing::warn!(key, error = %e, "could not store the build log; it stays in the local spool");
                    if let Some(later) = later {
                        later.store(
                            key.to_string(),
                            path.to_owned(),
                            storage.clone(),
                            super::later::FIRST_PAUSE,
                        );
                    }
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage that refuses the first `refusals` puts (each after `takes`), then stores
    /// (nothing: it counts).
    struct Refusing {
        refusals: std::sync::atomic::AtomicU32,
        puts: std::sync::atomic::AtomicU32,
        takes: std::time::Duration,
        transient: bool,
    }

    #[async_trait::async_trait]
    impl Storage for Refusing {
        async fn put_file(&self, key: &str, _: &Path) -> Result<(), crate::storage::StorageError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.puts.fetch_add(1, SeqCst);
            tokio::time::sleep(self.takes).await;
            let left = self.refusals.load(SeqCst);
            if left == 0 {
                return Ok(());
            }
            self.refusals.store(left - 1, SeqCst);
            Err(crate::storage::StorageError::S3 {
                op: "PutObject",
                key: key.into(),
                message: "503 SlowDown".into(),
                transient: self.transient,
            })
        }
        async fn get(
            &self,
            _: &str,
        ) -> Result<Option<crate::storage::Object>, crate::storage::StorageError> {
            Ok(None)
        }
        async fn exists(&self, _: &str) -> Result<bool, crate::storage::StorageError> {
            Ok(false)
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    /// A finished log in a spool folder of its own (kept while the folder is).
    fn spooled() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-b-1.logs");
        std::fs::write(&path, "Build finished\n").unwrap();
        (dir, path)
    }

    /// `hand_over` as a worker's log has it (retries until `until`, nothing stored later).
    async fn retried(path: &Path, storage: &Arc<Refusing>, until: Option<tokio::time::Instant>) {
        let storage: Arc<dyn Storage> = storage.clone();
        hand_over("a-b-1.logs", path, &storage, true, until, None).await;
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
    }

    fn refusing(refusals: u32) -> Refusing {
        Refusing {
            refusals: refusals.into(),
            puts: 0.into(),
            takes: std::time::Duration::ZERO,
            transient: true,
        }
    }

    /// Storage down for a while when a build ends: the log is stored once it is back (a
    /// worker pod's spool goes with the pod), after the pauses so far; then the spool goes.
    #[tokio::test(start_paused = true)]
    async fn a_log_is_stored_once_storage_is_back_within_the_retries() {
        let (_dir, path) = spooled();
        let storage = Arc::new(refusing(3));
        let started = tokio::time::Instant::now();
        retried(&path, &storage, Some(far())).await;
        assert_eq!(storage.puts.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(
            started.elapsed(),
            STORE_RETRIES[..3].iter().sum::<std::time::Duration>()
        );
        assert!(!path.exists(), "stored, so the spool file goes");
    }

    /// Storage that hangs (each put ends only at the client's timeouts): not tried again
    /// once STORE_PATIENCE has passed, so the build's end waits no longer than before.
    #[tokio::test(start_paused = true)]
    async fn a_log_storage_hangs_on_is_not_tried_again_past_the_patience() {
        let (_dir, path) = spooled();
        let storage = Arc::new(Refusing {
            takes: std::time::Duration::from_secs(600),
            ..refusing(u32::MAX)
        });
        retried(&path, &storage, Some(far())).await;
        assert_eq!(storage.puts.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(path.exists());
    }

    /// Tried once: a log with no retries asked for (local mode, which serves its spool), a
    /// refusal that will not change (AccessDenied), and one whose pause would end past
    /// `retry_until` (a worker near its pod's deadline).
    #[tokio::test(start_paused = true)]
    async fn a_log_is_tried_once_without_retries_a_refusal_or_time_left() {
        let (_dir, path) = spooled();
        let soon = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        for (storage, until) in [
            (Arc::new(refusing(1)), None),
            (
                Arc::new(Refusing {
                    transient: false,
                    ..refusing(1)
                }),
                Some(far()),
            ),
            (Arc::new(refusing(1)), Some(soon)),
        ] {
            retried(&path, &storage, until).await;
            assert_eq!(storage.puts.load(std::sync::atomic::Ordering::SeqCst), 1);
            assert!(path.exists());
        }
    }

    /// Storage down for longer: given up after the last pause, the spool file kept.
    #[tokio::test(start_paused = true)]
    async fn a_log_storage_never_takes_stays_in_the_spool() {
        let (_dir, path) = spooled();
        let storage = Arc::new(refusing(u32::MAX));
        retried(&path, &storage, Some(far())).await;
        let tries = STORE_RETRIES.len() as u32 + 1;
        assert_eq!(
            storage.puts.load(std::sync::atomic::Ordering::SeqCst),
            tries
        );
        assert!(path.exists());
    }

    /// A build counts as ended once its log is finished: whoever reads the file then (a
    /// follower) must find the end, `Build finished` included, though storing it takes longer.
    #[tokio::test]
    async fn a_finished_build_log_is_whole_in_its_file_before_it_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::new(dir.path().join("logs")).unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(crate::storage::LocalStorage::new(dir.path().join("logs")).unwrap());
        let stored = StoredLog::create(&files, "a-b-1.logs", storage, 1000).unwrap();
        let path = stored.path().to_path_buf();
        let mut log = crate::logs::BuildLog::new(Vec::new()).with_sink(Box::new(stored));
        for i in 0..3000 {
            log.line(&format!("line {i:05}"));
        }
        let storing = log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line 02999\nBuild finished\n"), "{text}");
        storing.await;
    }

    #[tokio::test]
    async fn a_log_past_its_limit_keeps_its_head_and_its_last_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles::new(dir.path().join("logs")).unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(crate::storage::LocalStorage::new(dir.path().join("logs")).unwrap());
        let mut log = Box::new(StoredLog::create(&files, "a-b-1.logs", storage, 1000).unwrap());
        let line = |i: usize| format!("line {i:05} {}", "x".repeat(38));
        for i in 0..3000 {
            log.write_line(&line(i));
        }
        let path = log.path().to_path_buf();
        assert!(
            std::fs::metadata(&path).unwrap().len() <= 1000,
            "capped while running"
        );
        // Written when the log is finished, before storing it (what awaiting does).
        let storing = log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        storing.await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], line(0));
        assert_eq!(*lines.last().unwrap(), line(2999), "the end is kept");
        let note = lines
            .iter()
            .position(|l| l.contains("left out here"))
            .unwrap();
        assert_eq!(lines[note - 1], line(note - 1), "the head, in order");
        let kept_after = lines.len() - note - 1;
        assert!(
            (text.len() as u64) < 1000 + TAIL_BYTES as u64 + 200,
            "{} bytes",
            text.len()
        );
        // Every line is in the head, said left out, or in the tail.
        let left: usize = lines[note]
            .trim_start_matches('[')
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(note + left + kept_after, 3000);
    }
}
