//! The local executor's durable state: one JSON file per build under `DATA_DIR/state`,
//! written atomically (temp file + rename, mode 0600: it holds the build's credentials).

use crate::build::{BuildSpec, Outcome, StageTimings};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Callback deliveries done (or given up); checked before sending, so none repeats.
    #[serde(default)]
    pub pending_sent: bool,
    #[serde(default)]
    pub final_sent: bool,
    pub accepted_at: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How long each stage took (filled as the build goes).
    #[serde(default)]
    pub timings: StageTimings,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, id: &Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub async fn save(&self, rec: &Record) -> std::io::Result<()> {
        let path = self.path(&rec.spec.build_uuid);
        let tmp = self.dir.join(format!(".{}.tmp", rec.spec.build_uuid));
        let json = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        write_private(&tmp, &json).await?;
        tokio::fs::rename(&tmp, &path).await
    }

    pub async fn exists(&self, id: &Uuid) -> bool {
        tokio::fs::try_exists(self.path(id)).await.unwrap_or(false)
    }

    /// Every record, in submission order. Unreadable files are skipped with a warning.
    pub async fn load_all(&self) -> std::io::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match tokio::fs::read(&path)
                .await
                .map(|b| serde_json::from_slice::<Record>(&b))
            {
                Ok(Ok(rec)) => out.push(rec),
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable build record")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable build record")
                }
            }
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }
}

async fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await?;
    f.write_all(bytes).await?;
    f.sync_data().await
}
