//! Finished logs that storage refused, stored later. A local-mode service with S3 keeps such
//! a log in its spool (and serves it from there); without this it would stay on this host
//! for good. A task per log tries again in the background, the pause doubling from
//! `FIRST_PAUSE` to `LONGEST_PAUSE`, until storage takes it; a restart tries the spool's
//! leftovers at once (`Later::leftovers`).
//!
//! The spool file of a key may be written again meanwhile (a build of the same number): a
//! writer takes the key over (`Later::writing`), and a retry that was under way then leaves
//! the file alone. Storage gets the writer's whole log when that build ends.

use crate::storage::Storage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The first pause after the build's own tries failed: past a short outage or throttling.
pub(super) const FIRST_PAUSE: Duration = Duration::from_secs(5);
/// Pauses double up to this: an outage of hours costs a request every five minutes a log.
const LONGEST_PAUSE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Debug)]
enum Holder {
    /// A build's log is being written to the spool file.
    Writer,
    /// A background task is storing the finished file.
    Retry,
}

/// Who holds each spool file that is being written or stored later.
#[derive(Default, Debug)]
pub struct Later {
    keys: Mutex<HashMap<String, Holder>>,
}

impl Later {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holder>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A build starts writing `key`'s spool file: a retry of an older log under that key
    /// stops (the new log replaces it).
    pub fn writing(&self, key: &str) {
        self.keys().insert(key.to_string(), Holder::Writer);
    }

    /// The writer of `key` is done with the file.
    pub fn written(&self, key: &str) {
        let mut keys = self.keys();
        if keys.get(key) == Some(&Holder::Writer) {
            keys.remove(key);
        }
    }

    /// Takes `key` for a retry, unless a writer or another retry holds it.
    fn claim(&self, key: &str) -> bool {
        let mut keys = self.keys();
        if keys.contains_key(key) {
            return false;
        }
        keys.insert(key.to_string(), Holder::Retry);
        true
    }

    fn still_ours(&self, key: &str) -> bool {
        self.keys().get(key) == Some(&Holder::Retry)
    }

    /// The retry of `key` ends; a stored file is removed, unless a writer took it meanwhile.
    fn release(&self, key: &str, stored: Option<&Path>) {
        let mut keys = self.keys();
        if keys.get(key) != Some(&Holder::Retry) {
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
        if !self.claim(&key) {
            return;
        }
        tokio::spawn(self.clone().retry(key, path, storage, first));
    }

    async fn retry(
        self: Arc<Self>,
        key: String,
        path: PathBuf,
        storage: Arc<dyn Storage>,
        first: Duration,
    ) {
        let mut pause = first;
        let mut tries = 0u32;
        loop {
            tokio::time::sleep(pause).await;
            if !self.still_ours(&key) {
                return;
            }
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                return self.release(&key, None);
            }
            tries += 1;
            match storage.put_file(&key, &path).await {
                Ok(()) => {
                    tracing::info!(key, tries, "stored a build log storage had refused");
                    return self.release(&key, Some(&path));
                }
                Err(e) => {
                    pause = (pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
                    tracing::warn!(key, error = %e, "could not store the build log yet; it is served from the local spool meanwhile; trying again in {pause:?}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    /// Refuses the first `refusals` puts, then takes them (counting, storing nothing).
    struct Refusing {
        refusals: AtomicU32,
        puts: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Storage for Refusing {
        async fn put_file(&self, key: &str, _: &Path) -> Result<(), StorageError> {
            self.puts.fetch_add(1, SeqCst);
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
        // 5 + 10 + 20 + … capped at 300 s.
        let waited: u64 = [5, 10, 20, 40, 80, 160, 300, 300, 300].iter().sum();
        let took = started.elapsed().as_secs();
        assert!((waited..waited + 2).contains(&took), "{took} s");
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
