//! The stored log: lines appended to a spool file while the build runs (readable at once
//! through the logs route), handed to storage when it ends.

use super::Sink;
use crate::storage::Storage;
use futures::future::BoxFuture;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the logs of running builds are spooled. In local mode with local storage, the spool
/// folder is the store itself, so handing over is a no-op.
#[derive(Clone, Debug)]
pub struct LogFiles {
    dir: PathBuf,
}

impl LogFiles {
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
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
            if let Err(e) = self.storage.put_file(&self.key, &self.path).await {
                tracing::warn!(key = %self.key, error = %e, "could not store the build log");
            }
        })
    }
}
