//! Finished logs that storage refused, stored later. A local-mode service with S3 keeps such
//! a log in its spool (and serves it from there); without this it would stay on this host
//! for good. A task per log tries again in the background, the pause doubling from
//! `FIRST_PAUSE` to `LONGEST_PAUSE` (give or take a tenth, so logs refused together do not
//! come back together), `UPLOADS_AT_ONCE` at a time, until storage takes it; a restart
//! tries the spool's leftovers at once (`Later::leftovers`).
//!
//! The spool file of a key may be written again meanwhile (a build of the same number, or
//! the last line of one stopped while queued): a writer takes the key over
//! (`Later::writing`), which stops the retry, an upload under way included, so neither
//! the retry's upload nor its removal of the file can follow the writer's. Storage gets the
//! writer's whole log when it is done.

use crate::storage::Storage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

/// The first pause after the build's own tries failed: past a short outage or throttling.
pub(super) const FIRST_PAUSE: Duration = Duration::from_secs(5);
/// Pauses double up to this: an outage of hours costs a request every five minutes a log.
const LONGEST_PAUSE: Duration = Duration::from_secs(300);
/// Uploads under way at once: thousands of leftovers after a long outage do not all go at
/// the same moment.
const UPLOADS_AT_ONCE: usize = 4;

#[derive(Debug)]
enum Holder {
    /// A build's log is being written to the spool file.
    Writer,
    /// A background task (`id`) is storing the finished file.
    Retry { id: u64, task: AbortHandle },
}

/// Who holds each spool file that is being written or stored later.
#[derive(Debug)]
pub struct Later {
    keys: Mutex<HashMap<String, Holder>>,
    next_id: AtomicU64,
    uploads: Arc<Semaphore>,
}

impl Default for Later {
    fn default() -> Self {
        Self {
            keys: Mutex::default(),
            next_id: AtomicU64::new(0),
            uploads: Arc::new(Semaphore::new(UPLOADS_AT_ONCE)),
        }
    }
}

impl Later {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A build starts writing `key`'s spool file: a retry of an older log under that key
    /// stops at once, its upload too (the new log replaces it).
    pub fn writing(&self, key: &str) {
        take_for_writer(&mut self.keys(), key);
    }

    /// Like `writing`, unless another writer holds `key` (whose log is then the key's):
    /// false.
    pub fn try_writing(&self, key: &str) -> bool {
        let mut keys = self.keys();
        if matches!(keys.get(key), Some(Holder::Writer)) {
            return false;
        }
        take_for_writer(&mut keys, key);
        true
    }

    /// The writer of `key` is done with the file.
    pub fn written(&self, key: &str) {
        let mut keys = self.keys();
        if matches!(keys.get(key), Some(Holder::Writer)) {
            keys.remove(key);
        }
    }

    fn still_ours(&self, key: &str, id: u64) -> bool {
        held_by_retry(&self.keys(), key, id)
    }

    /// The retry `id` of `key` ends; a stored file is removed, unless a writer took it.
    fn release(&self, key: &str, id: u64, stored: Option<&Path>) {
        let mut keys = self.keys();
        if !held_by_retry(&keys, key, id) {
            return;
        }
        keys.remove(key);
        // Under the lock, so a writer cannot start on the file between the check and this.
        if let Some(path) = stored {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(key, error = %e, "could not remove the spooled log after storing it");
            }
        }
    }

    /// Starts storing the finished spool file of `key` in the background; `first` is the
    /// pause before the first try. A no-op while a writer or another retry holds the key.
    pub fn store(
        self: &Arc<Self>,
        key: String,
        path: PathBuf,
        storage: Arc<dyn Storage>,
        first: Duration,
    ) {
        let mut keys = self.keys();
        if keys.contains_key(&key) {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Spawned under the lock: the task's first look at the map waits for its entry.
        let task = tokio::spawn(self.clone().retry(key.clone(), id, path, storage, first));
        keys.insert(
            key,
            Holder::Retry {
                id,
                task: task.abort_handle(),
            },
        );
    }

    async fn retry(
        self: Arc<Self>,
        key: String,
        id: u64,
        path: PathBuf,
        storage: Arc<dyn Storage>,
        first: Duration,
    ) {
        let mut pause = first;
        let mut tries = 0u32;
        loop {
            tokio::time::sleep(jitter(pause)).await;
            let Ok(_permit) = self.uploads.clone().acquire_owned().await else {
                return;
            };
            if !self.still_ours(&key, id) {
                return;
            }
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                return self.release(&key, id, None);
            }
            tries += 1;
            match storage.put_file(&key, &path).await {
                Ok(()) => {
                    tracing::info!(key, tries, "stored a build log storage had refused");
                    return self.release(&key, id, Some(&path));
                }
                Err(e) => {
                    pause = (pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
                    tracing::warn!(key, error = %e, "could not store the build log yet; it is served from the local spool meanwhile; trying again in about {pause:?}");
                }
            }
        }
    }

    /// The finished logs a previous process left in the spool `dir` (storage refused them,
    /// or the process died before storing them), read before any build of this process
    /// writes there.
    pub fn leftovers(dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| crate::storage::check_key(name).is_ok())
            .collect()
    }
}

/// Gives `key` to a writer, stopping the retry that held it, if one did.
fn take_for_writer(keys: &mut HashMap<String, Holder>, key: &str) {
    if let Some(Holder::Retry { task, .. }) = keys.insert(key.to_string(), Holder::Writer) {
        task.abort();
    }
}

/// Whether the retry `id` (not a writer, not a later retry) holds `key`.
fn held_by_retry(keys: &HashMap<String, Holder>, key: &str, id: u64) -> bool {
    matches!(keys.get(key), Some(Holder::Retry { id: i, .. }) if *i == id)
}

/// `pause` give or take a tenth.
fn jitter(pause: Duration) -> Duration {
    let spread = (uuid::Uuid::new_v4().as_u128() % 201) as u32; // 0..=200
    pause * (900 + spread) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    /// Refuses the first `refusals` puts, then takes them (counting, storing nothing), each
    /// after `takes`.
    struct Refusing {
        refusals: AtomicU32,
        puts: AtomicU32,
        /// Puts that got to their end (an aborted one does not).
        ended: AtomicU32,
        takes: Duration,
    }

    #[async_trait::async_trait]
    impl Storage for Refusing {
        async fn put_file(&self, key: &str, _: &Path) -> Result<(), StorageError> {
            self.puts.fetch_add(1, SeqCst);
            tokio::time::sleep(self.takes).await;
            self.ended.fetch_add(1, SeqCst);
            let left = self.refusals.load(SeqCst);
            if left == 0 {
                return Ok(());
            }
            self.refusals.store(left - 1, SeqCst);
            Err(StorageError::S3 {
                op: "PutObject",
                key: key.into(),
                message: "AccessDenied".into(),
                transient: false,
            })
        }
        async fn get(&self, _: &str) -> Result<Option<crate::storage::Object>, StorageError> {
            Ok(None)
        }
        async fn exists(&self, _: &str) -> Result<bool, StorageError> {
            Ok(false)
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    fn refusing(refusals: u32) -> Arc<Refusing> {
        Arc::new(Refusing {
            refusals: refusals.into(),
            puts: 0.into(),
            ended: 0.into(),
            takes: Duration::ZERO,
        })
    }

    fn spooled(dir: &Path) -> PathBuf {
        let path = dir.join("a-b-1.logs");
        std::fs::write(&path, "Build finished\n").unwrap();
        path
    }

    fn start(later: &Arc<Later>, path: &Path, storage: &Arc<Refusing>, first: Duration) {
        later.store("a-b-1.logs".into(), path.to_owned(), storage.clone(), first);
    }

    async fn settle(later: &Later, key: &str) {
        while later.keys().contains_key(key) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Any refusal, a permanent-looking one too (a bucket policy an operator fixes later), is
    /// tried again, the pauses doubling to their cap; once stored, the spool file goes.
    #[tokio::test(start_paused = true)]
    async fn a_refused_log_is_tried_until_stored_then_leaves_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = spooled(dir.path());
        let later = Arc::new(Later::default());
        let storage = refusing(8);
        let started = tokio::time::Instant::now();
        start(&later, &path, &storage, FIRST_PAUSE);
        settle(&later, "a-b-1.logs").await;
        assert_eq!(storage.puts.load(SeqCst), 9);
        // 5 + 10 + 20 + … capped at 300 s, each give or take a tenth.
        let waited: f64 = [5, 10, 20, 40, 80, 160, 300, 300, 300]
            .iter()
            .sum::<u32>()
            .into();
        let took = started.elapsed().as_secs_f64();
        assert!(
            (waited * 0.9..waited * 1.1 + 1.0).contains(&took),
            "{took} s"
        );
        assert!(!path.exists());
    }

    /// A build of the same key starts while a retry waits: the retry stops and leaves the
    /// file (now the new build's) alone, and a second retry of a key is not started.
    #[tokio::test(start_paused = true)]
    async fn a_writer_of_the_same_key_takes_the_file_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = spooled(dir.path());
        let later = Arc::new(Later::default());
        let storage = refusing(0);
        start(&later, &path, &storage, FIRST_PAUSE);
        start(&later, &path, &storage, FIRST_PAUSE);
        later.writing("a-b-1.logs");
        tokio::time::sleep(FIRST_PAUSE * 4).await;
        assert_eq!(storage.puts.load(SeqCst), 0);
        assert!(path.exists());
        // While written, no retry takes it; once written, one may.
        start(&later, &path, &storage, Duration::ZERO);
        tokio::time::sleep(FIRST_PAUSE).await;
        assert_eq!(storage.puts.load(SeqCst), 0);
        later.written("a-b-1.logs");
        start(&later, &path, &storage, Duration::ZERO);
        settle(&later, "a-b-1.logs").await;
        assert_eq!(storage.puts.load(SeqCst), 1);
        assert!(!path.exists());
    }

    /// A build of the same key starts while a retry's upload is under way (a slow storage):
    /// the upload is cut short, so it can neither land after the new log nor remove the new
    /// build's file; a later retry of the key is not ended by the first one.
    #[tokio::test(start_paused = true)]
    async fn a_writer_stops_an_upload_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = spooled(dir.path());
        let later = Arc::new(Later::default());
        let storage = Arc::new(Refusing {
            takes: Duration::from_secs(30),
            ..Arc::into_inner(refusing(0)).unwrap()
        });
        start(&later, &path, &storage, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(storage.puts.load(SeqCst), 1, "under way");
        later.writing("a-b-1.logs");
        later.written("a-b-1.logs");
        let quick = refusing(0);
        start(&later, &path, &quick, FIRST_PAUSE * 2);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            storage.ended.load(SeqCst),
            0,
            "the first upload was cut short"
        );
        settle(&later, "a-b-1.logs").await;
        assert_eq!(quick.puts.load(SeqCst), 1, "the second retry stored it");
        assert!(!path.exists());
    }

    /// The last line of a build stopped while queued goes to a file a retry holds (taking
    /// it over), but not to one a running build writes.
    #[tokio::test(start_paused = true)]
    async fn an_appender_takes_a_retrys_key_but_not_a_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = spooled(dir.path());
        let later = Arc::new(Later::default());
        let storage = refusing(0);
        start(&later, &path, &storage, FIRST_PAUSE);
        assert!(later.try_writing("a-b-1.logs"));
        assert!(!later.try_writing("a-b-1.logs"), "a writer holds it");
        tokio::time::sleep(FIRST_PAUSE * 2).await;
        assert_eq!(storage.puts.load(SeqCst), 0, "the retry stopped");
    }

    /// A file that is gone (removed by hand) ends its retry without a put.
    #[tokio::test(start_paused = true)]
    async fn a_file_that_is_gone_ends_its_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = spooled(dir.path());
        let later = Arc::new(Later::default());
        let storage = refusing(0);
        start(&later, &path, &storage, FIRST_PAUSE);
        std::fs::remove_file(&path).unwrap();
        settle(&later, "a-b-1.logs").await;
        assert_eq!(storage.puts.load(SeqCst), 0);
    }

    #[test]
    fn leftovers_are_the_plain_files_of_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        spooled(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(Later::leftovers(dir.path()), vec!["a-b-1.logs".to_string()]);
        assert!(Later::leftovers(&dir.path().join("missing")).is_empty());
    }
}
