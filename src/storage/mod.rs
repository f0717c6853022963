//! Object storage for source archives and build logs: local files or S3, same keys.
//! Keys are flat names (`{build_uuid}`, `{app}-{app_uuid}-{n}.logs`); anything with a path
//! separator or `..` is refused so a key can never reach outside the store.

mod local;
mod s3;

pub use local::LocalStorage;
pub use s3::{S3Storage, PART_SIZE};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage key {0:?} is not a plain name")]
    BadKey(String),
    #[error("local storage I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {op} of {key} failed: {message}")]
    S3 {
        op: &'static str,
        key: String,
        message: String,
        /// Worth trying again later: a timeout, a connection that failed, a 5xx or 429
        /// answer (not a refusal such as AccessDenied or NoSuchBucket).
        transient: bool,
    },
    /// The configured storage cannot be used at all; `var` is the setting to fix.
    #[error("{var}: {problem}")]
    Unusable { var: &'static str, problem: String },
}

impl StorageError {
    /// Whether the same call may succeed later (see `StorageError::S3`).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::S3 {
                transient: true,
                ..
            }
        )
    }
}

/// A stored object being read: its length when known, and its bytes as a stream.
pub struct Object {
    pub len: Option<u64>,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores the file at `path` under `key`, streaming it. The caller no longer changes the
    /// file: local storage links it instead of copying it where the filesystem allows.
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError>;
    /// `put_file` for an object that is the only copy of what a client handed over (a `data:`
    /// URI's archive, staged before the build is acknowledged): on stable storage when this
    /// returns. An S3 `PUT` already is.
    async fn put_file_durable(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.put_file(key, path).await
    }
    /// Opens the object under `key`; `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Object>, StorageError>;
    /// The object under `key` past its first `offset` bytes (empty when it is shorter);
    /// `None` when there is none. A reader that resumes (a log follower) reads only what it
    /// has not seen, instead of the whole object again.
    async fn get_from(&self, key: &str, offset: u64) -> Result<Option<Object>, StorageError> {
        Ok(self.get(key).await?.map(|o| skip(o, offset)))
    }
    /// Whether an object is stored under `key`.
    async fn exists(&self, key: &str) -> Result<bool, StorageError>;
    /// A short description for start-up logs ("local files under …", "S3 bucket …").
    fn describe(&self) -> String;
}

/// Opens the storage the configuration names: the S3 bucket when `S3_BUCKET` is set (checked
/// to be reachable and ours), else local files under `DATA_DIR/store`.
pub async fn open(
    cfg: &crate::config::BuildConfig,
) -> Result<std::sync::Arc<dyn Storage>, StorageError> {
    if let Some(s3) = &cfg.s3 {
        let store = S3Storage::new(s3).await;
        store.check().await?;
        return Ok(std::sync::Arc::new(store));
    }
    let root = cfg.data_dir.join("store");
    let local = LocalStorage::new(&root).map_err(|source| StorageError::Io {
        key: root.display().to_string(),
        source,
    })?;
    Ok(std::sync::Arc::new(local))
}

/// An open file as an object, read from `offset` on.
pub async fn file_object(mut file: tokio::fs::File, offset: u64) -> Object {
    use futures::StreamExt;
    use tokio::io::AsyncSeekExt;
    let len = file
        .metadata()
        .await
        .ok()
        .map(|m| m.len().saturating_sub(offset));
    if offset > 0 && file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Object {
            len: Some(0),
            body: futures::stream::empty().boxed(),
        };
    }
    Object {
        len,
        body: tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).boxed(),
    }
}

/// A stored object without its first `offset` bytes.
fn skip(obj: Object, offset: u64) -> Object {
    use futures::StreamExt;
    if offset == 0 {
        return obj;
    }
    let mut left = offset;
    let body = obj
        .body
        .filter_map(move |chunk| {
            let out = match chunk {
                Ok(mut c) => {
                    let drop = left.min(c.len() as u64) as usize;
                    left -= drop as u64;
                    let rest = c.split_off(drop);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(out)
        })
        .boxed();
    Object {
        len: obj.len.map(|l| l.saturating_sub(offset)),
        body,
    }
}

pub fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key != "."
        && key != ".."
        && !key.contains(['/', '\\', '\0'])
        && !key.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StorageError::BadKey(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys_are_plain_names() {
        for good in ["6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11", "app-uuid-12.logs"] {
            assert!(check_key(good).is_ok());
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a\\b",
            ".hidden",
            "a\0b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }
}
