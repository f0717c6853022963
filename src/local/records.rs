//! The local executor's records of unfinished builds, in memory. Started builds are parsed
//! records; a queued build is only its journal line (about half the parsed size), and one
//! far back in the queue keeps even that in a scratch file (`DATA_DIR/state/queue.spill`),
//! so a burst of tens of thousands of accepted builds costs a few hundred bytes each.
//!
//! The scratch file is a cache, never the truth: the journal (`state`) makes builds durable.
//! It starts empty, has mode 0600 (lines hold credentials, as the journal's do), and is
//! truncated whenever no build is left in it. Under a backlog that never empties, a line's
//! bytes are erased (a hole punched) as its build leaves the file, and each block no live
//! line touches is freed, so neither finished builds' credentials nor their disk space stay.

use super::state::{self, Phase, Record, StateError};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use uuid::Uuid;

/// 16 bytes (a thin box or a scratch-file place), so a map entry is 32: the map holds every
/// queued build, and its size is the memory peak of a burst.
enum Held {
    Parsed(Box<Record>),
    /// Boxed twice: a `Box<[u8]>` is 16 bytes, one more than fits.
    Line(Box<Box<[u8]>>),
    Spilled {
        at: u64,
        len: u32,
    },
}

/// The map is split in this many shards by build id: each grows on its own, so when a
/// burst's queue crosses a hash table's doubling point, one shard at a time is copied (a
/// sixteenth of the map) instead of the whole map at once.
const SHARDS: usize = 16;

pub struct Records {
    shards: [HashMap<Uuid, Held>; SHARDS],
    spill: Option<Spill>,
}

impl Records {
    /// Records with a scratch file at `spill` (without one, when it cannot be created:
    /// every queued line then stays in memory).
    pub fn new(spill: &Path) -> Self {
        let spill = Spill::open(spill)
            .map_err(|e| tracing::warn!(file = %spill.display(), error = %e, "no scratch file for queued builds; they stay in memory"))
            .ok();
        Self {
            shards: Default::default(),
            spill,
        }
    }

    fn map(&self, id: &Uuid) -> &HashMap<Uuid, Held> {
        &self.shards[shard(id)]
    }

    fn map_mut(&mut self, id: &Uuid) -> &mut HashMap<Uuid, Held> {
        &mut self.shards[shard(id)]
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.map(id).contains_key(id)
    }

    /// Holds `rec` (whose journal line is `line`): parsed unless queued; a queued one in the
    /// scratch file when `cold` (far back in the queue).
    pub fn insert(&mut self, rec: Record, line: &[u8], cold: bool) {
        let id = rec.spec.build_uuid;
        let held = if rec.phase != Phase::Queued {
            Held::Parsed(Box::new(rec))
        } else {
            let spilled = if cold {
                self.spill.as_mut().and_then(|s| s.put(line))
            } else {
                None
            };
            match spilled {
                Some((at, len)) => Held::Spilled { at, len },
                None => Held::Line(Box::new(line.into())),
            }
        };
        if let Some(old) = self.map_mut(&id).insert(id, held) {
            self.release(&old);
        }
    }

    /// A copy of the record.
    pub fn get(&self, id: &Uuid) -> Option<Record> {
        let line = match self.map(id).get(id)? {
            Held::Parsed(r) => return Some(Record::clone(r)),
            Held::Line(l) => std::borrow::Cow::Borrowed(&l[..]),
            Held::Spilled { at, len } => {
                std::borrow::Cow::Owned(self.spill.as_ref()?.get(*at, *len)?)
            }
        };
        serde_json::from_slice(&line)
            .map_err(|e| tracing::error!(build = %id, error = %e, "a queued build's record cannot be read back"))
            .ok()
    }

    /// Applies `f` to the record; returns its new journal line and whether it is final.
    /// `None`: no such record.
    pub fn change(
        &mut self,
        id: &Uuid,
        f: impl FnOnce(&mut Record),
    ) -> Option<Result<(bool, Vec<u8>), StateError>> {
        if let Some(Held::Parsed(rec)) = self.map_mut(id).get_mut(id) {
            f(rec);
            return Some(state::encode(rec).map(|line| (rec.final_sent, line)));
        }
        let cold = matches!(self.map(id).get(id)?, Held::Spilled { .. });
        let mut rec = self.get(id)?;
        f(&mut rec);
        Some(state::encode(&rec).map(|line| {
            let final_sent = rec.final_sent;
            // A cold build stays cold (its pending callback's record, say).
            self.insert(rec, &line, cold);
            (final_sent, line)
        }))
    }

    pub fn remove(&mut self, id: &Uuid) {
        if let Some(old) = self.map_mut(id).remove(id) {
            self.release(&old);
        }
    }

    fn release(&mut self, held: &Held) {
        if let (Held::Spilled { at, len }, Some(spill)) = (held, self.spill.as_mut()) {
            spill.release(*at, *len);
        }
    }
}

/// A build's shard, from bytes of its id that vary between ids whether they are random
/// (v4), time-ordered (v7) or time-and-host (v1, whose last six bytes are constant).
fn shard(id: &Uuid) -> usize {
    let b = id.as_bytes();
    usize::from(b[3] ^ b[9] ^ b[15]) % SHARDS
}

/// The scratch file's allocation unit for freeing: ext4's and tmpfs's block (a larger
/// real block only means a partly dead one is zeroed, not freed, until the file empties).
const BLOCK: u64 = 4096;

/// The scratch file: lines appended, read back by offset, erased when released, truncated
/// when none is live.
struct Spill {
    file: File,
    len: u64,
    live: usize,
    /// Live lines per block (by index) that holds part of one: a block is freed when its
    /// count reaches zero.
    blocks: HashMap<u64, u32>,
}

impl Spill {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file,
            len: 0,
            live: 0,
            blocks: HashMap::new(),
        })
    }

    fn put(&mut self, line: &[u8]) -> Option<(u64, u32)> {
        let len = u32::try_from(line.len()).ok().filter(|&l| l > 0)?;
        let at = self.len;
        if let Err(e) = self.file.write_all_at(line, at) {
            tracing::warn!(error = %e, "cannot write a queued build to the scratch file; it stays in memory");
            return None;
        }
        self.len += u64::from(len);
        self.live += 1;
        for block in blocks_of(at, len) {
            *self.blocks.entry(block).or_default() += 1;
        }
        Some((at, len))
    }

    fn get(&self, at: u64, len: u32) -> Option<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| tracing::error!(error = %e, "cannot read a queued build back from the scratch file"))
            .ok()?;
        Some(buf)
    }

    fn release(&mut self, at: u64, len: u32) {
        self.live = self.live.saturating_sub(1);
        if self.live == 0 && self.len > 0 && self.file.set_len(0).is_ok() {
            self.len = 0;
            self.blocks.clear();
            return;
        }
        // The line's own bytes first (they hold credentials), then every block it touched
        // that no live line holds any more, whole, so the file system frees it.
        self.erase(at, u64::from(len));
        for block in blocks_of(at, len) {
            if let std::collections::hash_map::Entry::Occupied(mut n) = self.blocks.entry(block) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                    let end = ((block + 1) * BLOCK).min(self.len);
                    self.erase(block * BLOCK, end - block * BLOCK);
                }
            }
        }
    }

    /// Zeroes `[at, at + len)`: a hole punched where the file system can (whole blocks in
    /// it are freed), zeros written where it cannot.
    fn erase(&self, at: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else {
            return;
        };
        // SAFETY: a plain system call on a file descriptor this struct owns.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        } == 0;
        if !punched {
            let zeros = vec![0; usize::try_from(len).unwrap_or(0)];
            if let Err(e) = self.file.write_all_at(&zeros, at) {
                tracing::warn!(error = %e, "cannot erase a released build from the scratch file");
            }
        }
    }
}

/// The indices of the blocks `[at, at + len)` touches (`len` > 0).
fn blocks_of(at: u64, len: u32) -> std::ops::RangeInclusive<u64> {
    at / BLOCK..=(at + u64::from(len) - 1) / BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn rec(phase: Phase) -> Record {
        Record {
            phase,
            ..state::tests::rec(0)
        }
    }

    #[test]
    fn ids_of_each_kind_spread_over_the_shards() {
        let spread = |ids: &[Uuid]| {
            let mut n = [0usize; SHARDS];
            for id in ids {
                n[shard(id)] += 1;
            }
            n.iter().all(|&k| k > ids.len() / SHARDS / 2)
        };
        let random: Vec<Uuid> = (0..1600).map(|_| Uuid::new_v4()).collect();
        assert!(spread(&random));
        // v1 ids of one host: only the timestamp fields change.
        let v1: Vec<Uuid> = (0..1600u32)
            .map(|t| Uuid::from_fields(t * 7919, 0x11d0, 0x1000, &[0x80, 0x42, 1, 2, 3, 4, 5, 6]))
            .collect();
        assert!(spread(&v1));
    }

    /// Allocated bytes of the file (what the file system holds for it).
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_released_line_is_erased_and_dead_blocks_are_freed_while_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.spill");
        let mut spill = Spill::open(&path).unwrap();
        // Lines of 1,000 bytes (blocks shared by neighbours), then a long one, then a last.
        let small: Vec<_> = (0..40u8)
            .map(|i| spill.put(&[b'a' + i % 26; 1000]).unwrap())
            .collect();
        let long = spill.put(&[b'L'; 40_000]).unwrap();
        let last = spill.put(b"the-last-line").unwrap();
        let before = allocated(&path);
        for &(at, len) in &small[..39] {
            spill.release(at, len);
        }
        spill.release(long.0, long.1);
        let mut content = Vec::new();
        File::open(&path)
            .unwrap()
            .read_to_end(&mut content)
            .unwrap();
        // Every released byte is zero: no finished build's credentials stay in the file.
        let keep = small[39];
        for (i, b) in content.iter().enumerate() {
            let i = i as u64;
            let live = (keep.0..keep.0 + u64::from(keep.1)).contains(&i)
                || (last.0..last.0 + u64::from(last.1)).contains(&i);
            assert_eq!(*b == 0, !live, "byte {i}");
        }
        assert_eq!(
            spill.get(keep.0, keep.1).unwrap(),
            vec![b'a' + 39 % 26; 1000]
        );
        assert_eq!(spill.get(last.0, last.1).unwrap(), b"the-last-line");
        // Only the blocks the two live lines touch stay allocated (two or three blocks).
        let after = allocated(&path);
        assert!(
            after <= 3 * BLOCK && after < before,
            "{before} bytes allocated before, {after} after"
        );
        assert_eq!(spill.live, 2);
    }

    #[test]
    fn a_held_record_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Held>(), 16);
    }

    #[test]
    fn cold_queued_builds_live_in_the_scratch_file_until_none_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.spill");
        let mut records = Records::new(&path);
        let (hot, cold, started) = (rec(Phase::Queued), rec(Phase::Queued), rec(Phase::Running));
        for (r, is_cold) in [
            (&hot, false),
            (&cold, true),
            (&cold.clone(), true),
            (&started, true),
        ] {
            records.insert(r.clone(), &state::encode(r).unwrap(), is_cold);
        }
        // Only the cold queued build went to the file (the second insert replaced the first).
        assert_eq!(records.spill.as_ref().unwrap().live, 1);
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        for r in [&hot, &cold, &started] {
            let got = records.get(&r.spec.build_uuid).unwrap();
            assert_eq!(got.spec, r.spec);
        }
        // A change of a cold build keeps it cold; once none is left the file is truncated.
        let (final_sent, line) = records
            .change(&cold.spec.build_uuid, |r| r.pending_sent = true)
            .unwrap()
            .unwrap();
        assert!(!final_sent);
        assert!(records.get(&cold.spec.build_uuid).unwrap().pending_sent);
        assert!(String::from_utf8(line)
            .unwrap()
            .contains("\"pending_sent\":true"));
        assert_eq!(records.spill.as_ref().unwrap().live, 1);
        let (_, started_line) = records
            .change(&cold.spec.build_uuid, |r| r.phase = Phase::Running)
            .unwrap()
            .unwrap();
        assert!(!started_line.is_empty());
        assert_eq!(records.spill.as_ref().unwrap().live, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        records.remove(&hot.spec.build_uuid);
        assert!(!records.contains(&hot.spec.build_uuid));
        assert!(records.change(&hot.spec.build_uuid, |_| ()).is_none());
    }
}
