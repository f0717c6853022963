//! Storage in local files under one folder (`DATA_DIR/store`).

use super::{check_key, Object, Storage, StorageError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        // What a crash left half-stored goes (one process owns DATA_DIR): the folder of
        // partial files alone, never a walk through every object stored.
        match std::fs::remove_dir_all(root.join(PARTIAL)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(root.join(PARTIAL))?;
        Ok(Self { root })
    }

    pub fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// The folder (inside the store, on its filesystem; no key starts with a dot) of files
/// being stored, until each is renamed into place.
const PARTIAL: &str = ".partial";

fn io(key: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        key: key.to_string(),
        source,
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let dest = self.path(key)?;
        if dest == path {
            return Ok(());
        }
        // Beside the destination, then renamed: a reader never sees half an object. A hard
        // link where the filesystem allows it: the callers hand over files they no longer
        // change (a downloaded archive, a closed log), and a copy would write the same bytes
        // again, whose writeback then delays dockerd's next container (it syncs the disk).
        // A name of its own: two stores of one key at once (two `POST /`s of one `data:`
        // build) must not write into each other's file.
        let tmp = self
            .root
            .join(PARTIAL)
            .join(format!("{key}.{}", uuid::Uuid::new_v4().simple()));
        let placed = async {
            if tokio::fs::hard_link(path, &tmp).await.is_err() {
                tokio::fs::copy(path, &tmp).await?;
            }
            tokio::fs::rename(&tmp, &dest).await
        }
        .await;
        if placed.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        placed.map_err(io(key))
    }

    async fn put_file_durable(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.put_file(key, path).await?;
        // The data (a link shares the source's, a copy has its own), then the folder entry
        // the rename made. Without them a power loss could leave an acknowledged build with
        // an empty or missing archive.
        let dest = self.path(key)?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&dest)?.sync_all()?;
            std::fs::File::open(&root)?.sync_all()
        })
        .await
        .map_err(|e| io(key)(std::io::Error::other(e)))?
        .map_err(io(key))
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StorageError> {
        self.get_from(key, 0).await
    }

    async fn get_from(&self, key: &str, offset: u64) -> Result<Option<Object>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(super::file_object(file, offset).await)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key)(e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        tokio::fs::try_exists(&path).await.map_err(io(key))
    }

    fn describe(&self) -> String {
        format!("local files under {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// An empty store, and a file beside it holding `bytes`.
    fn store_and_file(bytes: &[u8]) -> (tempfile::TempDir, LocalStorage, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStorage::new(dir.path().join("store")).unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, bytes).unwrap();
        (dir, store, src)
    }

    /// The stored object's bytes.
    async fn read(store: &LocalStorage, key: &str) -> Vec<u8> {
        let obj = store.get(key).await.unwrap().unwrap();
        obj.body.map(|c| c.unwrap().to_vec()).concat().await
    }

    #[tokio::test]
    async fn round_trip_and_missing() {
        let (_dir, store, src) = store_and_file(b"hello");
        store.put_file("k1", &src).await.unwrap();
        assert!(store.exists("k1").await.unwrap());
        assert!(!store.exists("k2").await.unwrap());
        assert_eq!(store.get("k1").await.unwrap().unwrap().len, Some(5));
        assert_eq!(read(&store, "k1").await, b"hello");
        assert!(store.get("nope").await.unwrap().is_none());
        assert!(store.get("../x").await.is_err());
    }

    #[tokio::test]
    async fn a_durable_put_stores_the_same_bytes() {
        let (_dir, store, src) = store_and_file(b"inline sources");
        store.put_file_durable("k", &src).await.unwrap();
        std::fs::remove_file(&src).unwrap();
        assert_eq!(read(&store, "k").await, b"inline sources");
        assert!(store.put_file_durable("../k", &src).await.is_err());
    }

    #[tokio::test]
    async fn a_file_on_the_same_filesystem_is_linked_and_outlives_its_source() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store, src) = store_and_file(b"sources");
        store.put_file("k", &src).await.unwrap();
        let (a, b) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(store.path("k").unwrap()).unwrap(),
        );
        assert_eq!(
            (a.dev(), a.ino()),
            (b.dev(), b.ino()),
            "the same file, no copy"
        );
        std::fs::remove_file(&src).unwrap();
        assert_eq!(read(&store, "k").await, b"sources");
        let in_folder = |f: &str| {
            let mut names: Vec<_> = std::fs::read_dir(dir.path().join(f))
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(in_folder("store"), [PARTIAL, "k"]);
        assert!(in_folder("store/.partial").is_empty());
    }

    #[tokio::test]
    async fn stores_of_one_key_at_once_never_write_into_each_others_file() {
        let dir = tempfile::tempdir().unwrap();
        // A crash during an earlier store left this; the next start removes it.
        std::fs::create_dir_all(dir.path().join("store/.partial")).unwrap();
        std::fs::write(dir.path().join("store/.partial/k.1234"), b"stale").unwrap();
        let store = LocalStorage::new(dir.path().join("store")).unwrap();
        assert!(!dir.path().join("store/.partial/k.1234").exists());
        // Two sources of one key, stored at once, again and again.
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, vec![b'a'; 4 << 20]).unwrap();
        std::fs::write(&b, vec![b'b'; 4 << 20]).unwrap();
        for _ in 0..20 {
            let (x, y) = tokio::join!(
                store.put_file_durable("k", &a),
                store.put_file_durable("k", &b)
            );
            x.unwrap();
            y.unwrap();
            let got = read(&store, "k").await;
            assert!(
                got == vec![b'a'; 4 << 20] || got == vec![b'b'; 4 << 20],
                "one source, whole"
            );
        }
    }
}
