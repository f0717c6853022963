//! The stored log: lines appended to a spool file while the build runs (readable at once
//! through the logs route), handed to storage when it ends.

use super::Sink;
use crate::storage::Storage;
use futures::future::BoxFuture;
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
}

impl LogFiles {
    /// Spool folder that is also the store: logs stay where they are.
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            remove_when_stored: false,
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

    /// Stores the spooled log of `key` (for a log finished outside a running build, e.g.
    /// one line saying it was interrupted); a no-op when the spool is the store.
    pub async fn store(&self, key: &str, storage: &dyn Storage) {
        if let Some(path) = self.path(key).filter(|_| self.remove_when_stored) {
            hand_over(key, &path, storage, true).await;
        }
    }

    /// The spool path of a log key, or `None` for a key that is not a plain name.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        crate::storage::check_key(key).ok()?;
        Some(self.dir.join(key))
    }
}

pub struct StoredLog {
    key: String,
    path: PathBuf,
    file: Option<std::fs::File>,
    storage: Arc<dyn Storage>,
    failed_writes: u64,
    remove_when_stored: bool,
}

impl StoredLog {
    /// Starts (truncates) the spool file for `key`.
    pub fn create(files: &LogFiles, key: &str, storage: Arc<dyn Storage>) -> std::io::Result<Self> {
        let path = files
            .path(key)
            .ok_or_else(|| std::io::Error::other(format!("log key {key:?} is not a plain name")))?;
        let file = std::fs::File::create(&path)?;
        Ok(Self {
            key: key.to_string(),
            path,
            file: Some(file),
            storage,
            failed_writes: 0,
            remove_when_stored: files.remove_when_stored,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Sink for StoredLog {
    fn write_line(&mut self, line: &str) {
        // One write per line, unbuffered: the logs route reads the file while the build runs.
        if let Some(f) = &mut self.file {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            if f.write_all(&buf).is_err() {
                self.failed_writes += 1;
            }
        }
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            drop(self.file.take());
            if self.failed_writes > 0 {
                tracing::warn!(key = %self.key, lines = self.failed_writes, "lines could not be written to the stored log");
            }
            hand_over(
                &self.key,
                &self.path,
                self.storage.as_ref(),
                self.remove_when_stored,
            )
            .await;
        })
    }
}

/// Puts the spool file in storage and, when the spool is not the store, removes it.
async fn hand_over(key: &str, path: &Path, storage: &dyn Storage, remove: bool) {
    match storage.put_file(key, path).await {
        // Readers fall back from the spool to storage, which now has the whole log.
        Ok(()) if remove => {
            if let Err(e) = tokio::fs::remove_file(path).await {
                tracing::warn!(key, error = %e, "could not remove the spooled log after storing it");
            }
        }
        Ok(()) => {}
        // The spool file stays, so the log is still served from this host.
        Err(e) => {
            tracing::warn!(key, error = %e, "could not store the build log; it stays in the local spool")
        }
    }
}
