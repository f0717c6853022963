//! Source archive → build context by extraction, and what both ways to a context share.
//! The archive (`.tar.gz`, `.tar` or `.zip`, detected by content) is extracted into the
//! build's own folder with every entry checked (no `..`, absolute or drive paths, no links out
//! of the folder, no devices or FIFOs) and within the size and entry limits; a single
//! top-level folder is flattened; the Dockerfile gets its ARG lines; then the folder is
//! streamed to dockerd as a tar, honouring `.dockerignore`. A `.tar.gz` or `.tar` usually
//! skips the folder: `restream` applies the same checks and sends it from the archive.

use super::dockerfile::ArgStyle;
use crate::config::Limits;
use bytes::Bytes;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("the sources are not a .tar.gz, .tar or .zip archive")]
    UnknownFormat,
    #[error("the archive is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("archive entry {} is refused: {why}", shown(.entry))]
    UnsafeEntry { entry: String, why: &'static str },
    #[error("the archive expands past MAX_CONTEXT_BYTES ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("the archive has more than MAX_ARCHIVE_ENTRIES ({limit}) entries")]
    TooManyEntries { limit: u64 },
    #[error("no Dockerfile at the top of the sources (found: {found})")]
    NoDockerfile { found: String },
    #[error("the .dockerignore pattern {pattern:?} is invalid: {why}")]
    BadIgnorePattern { pattern: String, why: String },
    #[error("the {file} is larger than {limit} bytes; a build needs it whole in memory")]
    ControlFileTooLarge { file: &'static str, limit: u64 },
    #[error("the Dockerfile's FROM instructions times the build args' names would add more than {limit} bytes of ARG lines")]
    TooManyArgLines { limit: u64 },
    #[error("preparing the build context on disk failed: {0}")]
    Io(#[from] io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    TarGz,
    Tar,
    Zip,
}

fn detect(path: &Path) -> Result<Format, ContextError> {
    detect_bytes(&read_head(&mut fs::File::open(path)?)?)
}

/// An archive's first 262 bytes (all of it when shorter): enough for `detect_bytes`.
pub(super) fn read_head(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(262);
    reader.take(262).read_to_end(&mut head)?;
    Ok(head)
}

/// The format from an archive's first 262 bytes (fewer only when the archive is shorter).
pub(super) fn detect_bytes(head: &[u8]) -> Result<Format, ContextError> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::TarGz)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Ok(Format::Zip)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Format::Tar)
    } else {
        Err(ContextError::UnknownFormat)
    }
}

/// Extracts `archive` into `dest` (created, must be empty) and returns the context root:
/// `dest` itself, or its only folder when the archive holds exactly one top-level folder.
pub fn extract(archive: &Path, dest: &Path, limits: &Limits) -> Result<PathBuf, ContextError> {
    fs::create_dir_all(dest)?;
    let mut budget = Budget::new(limits);
    match detect(archive)? {
        Format::TarGz => {
            let gz =
                flate2::read::MultiGzDecoder::new(io::BufReader::new(fs::File::open(archive)?));
            extract_tar(gz, dest, &mut budget)?
        }
        Format::Tar => extract_tar(
            io::BufReader::new(fs::File::open(archive)?),
            dest,
            &mut budget,
        )?,
        Format::Zip => extract_zip(archive, dest, &mut budget)?,
    }
    flattened_root(dest)
}

/// A blocking `Read` over chunks arriving on a channel; the end of the channel is the end
/// of the data.
pub struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    pub fn new(chunks: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        Self {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

pub(super) struct Budget {
    bytes: u64,
    entries: u64,
    limits: Limits,
}

impl Budget {
    pub(super) fn new(limits: &Limits) -> Self {
        Self {
            bytes: 0,
            entries: 0,
            limits: *limits,
        }
    }
    /// A tar entry: counted, and unless it is a file's (charged as it is written or
    /// read) its declared data charged now. What is skipped is read (and inflated) all the
    /// same: a folder or pax global header declaring 8 GiB counts like a file of 8 GiB.
    pub(super) fn tar_entry<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), ContextError> {
        self.entry()?;
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            self.wrote(entry.size())?;
        }
        Ok(())
    }
    pub(super) fn entry(&mut self) -> Result<(), ContextError> {
        self.entries += 1;
        if self.entries > self.limits.max_archive_entries {
            return Err(ContextError::TooManyEntries {
                limit: self.limits.max_archive_entries,
            });
        }
        Ok(())
    }
    /// Bytes an entry may still write.
    pub(super) fn remaining(&self) -> u64 {
        self.limits.max_context_bytes.saturating_sub(self.bytes)
    }
    pub(super) fn wrote(&mut self, n: u64) -> Result<(), ContextError> {
        self.bytes += n;
        if self.bytes > self.limits.max_context_bytes {
            return Err(ContextError::TooLarge {
                limit: self.limits.max_context_bytes,
            });
        }
        Ok(())
    }
}

/// An entry name for an error message: quoted, and cut short (names may be a megabyte).
fn shown(name: &str) -> String {
    const MAX: usize = 200;
    match name.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
        None => format!("{name:?}"),
    }
}

/// The longest path (PATH_MAX) and name (NAME_MAX) Linux, and so dockerd, can create.
const MAX_PATH_BYTES: usize = 4096;
const MAX_NAME_BYTES: usize = 255;
/// Folders deep: far past any source tree, and it bounds the per-entry work of checking
/// every parent folder.
const MAX_DEPTH: usize = 256;

/// Checks an entry name and returns it as a clean relative path.
pub(super) fn safe_relative(name: &str) -> Result<PathBuf, ContextError> {
    let refuse = |why| ContextError::UnsafeEntry {
        entry: name.to_string(),
        why,
    };
    if name.len() > MAX_PATH_BYTES {
        return Err(refuse("its name is longer than 4096 bytes"));
    }
    if name.contains('\0') {
        return Err(refuse("it contains a NUL byte"));
    }
    if name.contains('\\') {
        return Err(refuse("it contains a backslash (Windows path)"));
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(refuse("it is a Windows drive path"));
    }
    let mut out = PathBuf::new();
    let mut depth = 0;
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => {
                if p.len() > MAX_NAME_BYTES {
                    return Err(refuse("a part of its name is longer than 255 bytes"));
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(refuse("it is more than 256 folders deep"));
                }
                out.push(p)
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("it contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("it is an absolute path"))
            }
        }
    }
    Ok(out)
}

/// Checks that a symlink at `rel` pointing to `target` stays inside the context.
pub(super) fn check_link_target(
    entry: &str,
    rel: &Path,
    target: &Path,
) -> Result<(), ContextError> {
    let refuse = |why| ContextError::UnsafeEntry {
        entry: entry.to_string(),
        why,
    };
    if target.as_os_str().len() > MAX_PATH_BYTES {
        return Err(refuse(
            "it is a link whose target is longer than 4096 bytes",
        ));
    }
    if target.is_absolute() {
        return Err(refuse("it is a link to an absolute path"));
    }
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(refuse("it is a link that points outside the sources"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("it is a link to an absolute path"))
            }
        }
    }
    Ok(())
}

/// The symlinks an archive has made so far, to tell whether an entry lies beneath one in
/// time linear in its name (a set of whole paths hashes every parent folder anew: quadratic
/// in a 4 KiB name). Kept as hashes of each path's components, with this process's random
/// keys so names cannot be chosen to collide; a collision could only ever add a check.
pub(super) struct Links {
    keys: std::collections::hash_map::RandomState,
    paths: std::collections::HashSet<u64>,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            keys: std::collections::hash_map::RandomState::new(),
            paths: std::collections::HashSet::new(),
        }
    }
}

impl Links {
    /// The hash of each leading part of `rel`: `a`, `a/b`, `a/b/c`.
    fn prefixes<'a>(&self, rel: &'a Path) -> impl Iterator<Item = u64> + 'a {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.keys.build_hasher();
        rel.components().map(move |c| {
            c.as_os_str().hash(&mut h);
            h.clone().finish()
        })
    }
    pub(super) fn insert(&mut self, rel: &Path) {
        if let Some(whole) = self.prefixes(rel).last() {
            self.paths.insert(whole);
        }
    }
    pub(super) fn remove(&mut self, rel: &Path) {
        if !self.paths.is_empty() {
            if let Some(whole) = self.prefixes(rel).last() {
                self.paths.remove(&whole);
            }
        }
    }
    /// Whether one of `rel`'s parent folders is (or, after a collision, may be) a symlink.
    pub(super) fn beneath_one(&self, rel: &Path) -> bool {
        if self.paths.is_empty() {
            return false;
        }
        let parents = rel.components().count().saturating_sub(1);
        self.prefixes(rel)
            .take(parents)
            .any(|p| self.paths.contains(&p))
    }
}

/// Makes room for a new entry at `path`: parents created, any existing entry removed, so a
/// file never writes through a symlink an earlier entry planted.
fn prepare_slot(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
}

/// Refuses an entry whose parent folders pass through a symlink: writing there would land
/// wherever the link points. `links` holds every symlink this extraction made (the only
/// ones in `dest`): without one on the way, the folders need no look (one `lstat` per parent
/// is quadratic in the depth).
fn check_parents(dest: &Path, rel: &Path, entry: &str, links: &Links) -> Result<(), ContextError> {
    if !links.beneath_one(rel) {
        return Ok(());
    }
    let mut cur = dest.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        if fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(ContextError::UnsafeEntry {
                entry: entry.to_string(),
                why: "it is inside a folder that is a symlink",
            });
        }
    }
    Ok(())
}

fn write_file(
    path: &Path,
    mut src: impl Read,
    mode: Option<u32>,
    budget: &mut Budget,
) -> Result<(), ContextError> {
    prepare_slot(path)?;
    let mut out = fs::File::create(path)?;
    let limit = budget.remaining();
    let n = io::copy(&mut (&mut src).take(limit.saturating_add(1)), &mut out)?;
    budget.wrote(n)?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        // Keep the execute bits; never setuid/setgid/sticky.
        fs::set_permissions(path, fs::Permissions::from_mode((mode & 0o777) | 0o600))?;
    }
    Ok(())
}

/// What the tar crate may read for an entry's headers: its header, and a GNU long name or
/// link, or pax records, which it reads whole into memory (with no limit of its own, so a
/// header claiming 8 GiB of long name would be 8 GiB of memory).
const HEADER_ALLOWANCE: u64 = 1 << 20;

/// The error of a tar stream whose headers go past HEADER_ALLOWANCE.
const HEADERS_TOO_LARGE: &str =
    "an entry's headers (a long name or pax records) are larger than 1048576 bytes";

/// A reader that hands a crate only what its `Allowance` has left, then fails with `spent`:
/// a bound, set from outside, on what a crate reads (which it would otherwise read whole
/// into memory, or again and again).
pub(super) struct Rationed<R> {
    inner: R,
    left: std::sync::Arc<std::sync::atomic::AtomicU64>,
    spent: &'static str,
}

/// The other end of a `Rationed` reader: sets what it may still read.
pub(super) struct Allowance(std::sync::Arc<std::sync::atomic::AtomicU64>);

fn rationed<R>(inner: R, left: u64, spent: &'static str) -> (Rationed<R>, Allowance) {
    let left = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(left));
    (
        Rationed {
            inner,
            left: left.clone(),
            spent,
        },
        Allowance(left),
    )
}

/// A tar stream that the tar crate may read only so far past the entry it last handed out:
/// that entry's data, then at most HEADER_ALLOWANCE of headers. Call `Allowance::entry`
/// with every entry the archive yields.
pub(super) fn header_guard<R: Read>(inner: R) -> (Rationed<R>, Allowance) {
    rationed(inner, HEADER_ALLOWANCE, HEADERS_TOO_LARGE)
}

impl Allowance {
    /// The archive yielded `entry`: what it may read next is the entry's data (in 512-byte
    /// blocks) and the next entry's headers.
    pub(super) fn entry<R: Read>(&self, entry: &tar::Entry<'_, R>) {
        let data = entry.size().div_ceil(512).saturating_mul(512);
        self.set(data.saturating_add(HEADER_ALLOWANCE));
    }
    fn set(&self, left: u64) {
        self.0.store(left, std::sync::atomic::Ordering::Relaxed);
    }
    /// Whether the reader has used it all up (and so failed a read).
    fn spent(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == 0
    }
}

impl<R: Read> Read for Rationed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        let left = self.left.load(Relaxed);
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, self.spent));
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left.store(left - n as u64, Relaxed);
        Ok(n)
    }
}

impl<R: io::Seek> io::Seek for Rationed<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Tar entries that only carry metadata for the next one (the tar crate applies them).
pub(super) fn is_extension_header(kind: tar::EntryType) -> bool {
    use tar::EntryType;
    matches!(
        kind,
        EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink
    )
}

/// The error for an entry of a type a context never holds.
pub(super) fn refused_kind(name: String, kind: tar::EntryType) -> ContextError {
    use tar::EntryType;
    let why = match kind {
        EntryType::Char | EntryType::Block => "it is a device file",
        EntryType::Fifo => "it is a FIFO",
        _ => "its entry type is not supported",
    };
    ContextError::UnsafeEntry { entry: name, why }
}

/// A symlink entry's target, checked to stay inside the sources.
pub(super) fn symlink_target<R: Read>(
    entry: &tar::Entry<R>,
    name: &str,
    rel: &Path,
) -> Result<PathBuf, ContextError> {
    let target = entry
        .link_name()
        .map_err(|e| ContextError::Corrupt(e.to_string()))?
        .ok_or_else(|| ContextError::Corrupt(format!("symlink {name:?} has no target")))?
        .into_owned();
    check_link_target(name, rel, &target)?;
    Ok(target)
}

fn extract_tar(reader: impl Read, dest: &Path, budget: &mut Budget) -> Result<(), ContextError> {
    use tar::EntryType;
    let (reader, allowance) = header_guard(reader);
    let mut archive = tar::Archive::new(reader);
    let corrupt = |e: io::Error| ContextError::Corrupt(e.to_string());
    // Never forgets one (a stale entry costs only a look at the folders).
    let mut links = Links::default();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        allowance.entry(&entry);
        let kind = entry.header().entry_type();
        budget.tar_entry(&entry)?;
        if is_extension_header(kind) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = safe_relative(&name)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        check_parents(dest, &rel, &name, &links)?;
        let path = dest.join(&rel);
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mode = entry.header().mode().ok();
                write_file(&path, &mut entry, mode, budget)?;
            }
            EntryType::Directory => fs::create_dir_all(&path)?,
            EntryType::Symlink => {
                let target = symlink_target(&entry, &name, &rel)?;
                prepare_slot(&path)?;
                std::os::unix::fs::symlink(&target, &path)?;
                links.insert(&rel);
            }
            EntryType::Link => {
                let target = entry.link_name().map_err(corrupt)?.ok_or_else(|| {
                    ContextError::Corrupt(format!("hard link {name:?} has no target"))
                })?;
                let target_rel = safe_relative(&target.to_string_lossy()).map_err(|_| {
                    ContextError::UnsafeEntry {
                        entry: name.clone(),
                        why: "it is a hard link that points outside the sources",
                    }
                })?;
                // An earlier symlink on the way (`esc -> l/l/../../..`, `l -> .`) would
                // make the copy read any file of this host.
                check_parents(dest, &target_rel, &name, &links)?;
                let target_path = dest.join(target_rel);
                let meta =
                    fs::symlink_metadata(&target_path).map_err(|_| ContextError::UnsafeEntry {
                        entry: name.clone(),
                        why: "it is a hard link to an entry that is not in the archive before it",
                    })?;
                if !meta.is_file() {
                    return Err(ContextError::UnsafeEntry {
                        entry: name,
                        why: "it is a hard link to something other than a file",
                    });
                }
                // A copy, not a link: the context folder must not alias files.
                let src = open_no_follow(&target_path)?;
                use std::os::unix::fs::PermissionsExt;
                write_file(&path, src, Some(meta.permissions().mode()), budget)?;
            }
            _ => return Err(refused_kind(name, kind)),
        }
    }
    Ok(())
}

/// What a zip's last end-of-central-directory record (zip64's, when there is one) claims.
#[derive(Debug, PartialEq)]
struct ZipEnd {
    entries: u64,
    directory_bytes: u64,
}

/// Reads the end record from the file's last 64 KiB: `None` when there is none to read (the
/// zip crate then says what is wrong).
fn zip_end(file: &mut (impl Read + io::Seek)) -> io::Result<Option<ZipEnd>> {
    use io::SeekFrom;
    let len = file.seek(SeekFrom::End(0))?;
    let tail_len = len.min(22 + 65_535);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.take(tail_len).read_to_end(&mut tail)?;
    let le16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let le32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let le64 = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let Some(at) = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(&tail, i) == Some(0x0605_4b50))
    else {
        return Ok(None);
    };
    let (Some(entries), Some(directory_bytes)) = (le16(&tail, at + 10), le32(&tail, at + 12))
    else {
        return Ok(None);
    };
    let mut end = ZipEnd {
        entries: entries.into(),
        directory_bytes: directory_bytes.into(),
    };
    // A zip64 locator right before it points at the record with the real figures.
    if at >= 20 && le32(&tail, at - 20) == Some(0x0706_4b50) {
        if let Some(offset) = le64(&tail, at - 20 + 8).filter(|o| o.saturating_add(56) <= len) {
            let mut record = [0u8; 56];
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut record)?;
            if le32(&record, 0) == Some(0x0606_4b50) {
                if let (Some(e), Some(b)) = (le64(&record, 32), le64(&record, 40)) {
                    end = ZipEnd {
                        entries: e,
                        directory_bytes: b,
                    };
                }
            }
        }
    }
    Ok(Some(end))
}

/// The error of a zip whose directory the zip crate went on reading past its allowance.
const GAVE_UP: &str =
    "the zip's central directory is not where its end record says (the zip reader gave up)";

fn extract_zip(archive: &Path, dest: &Path, budget: &mut Budget) -> Result<(), ContextError> {
    let corrupt = |e: zip::result::ZipError| ContextError::Corrupt(e.to_string());
    let mut file = io::BufReader::new(fs::File::open(archive)?);
    let end = zip_end(&mut file)?;
    let limit = budget.limits.max_archive_entries;
    if end.as_ref().is_some_and(|e| e.entries > limit) {
        // Refused before the crate holds every entry's record in memory.
        return Err(ContextError::TooManyEntries { limit });
    }
    // The zip crate reads the whole central directory of every end record it tries, from
    // the last back to the first: many end records would cost time quadratic in the file's
    // size. It may read the directory once, plus the search for its end record, with room
    // to spare; then, the directory read, anything.
    let directory = end.map_or(0, |e| e.directory_bytes);
    let (reader, allowance) = rationed(file, directory.saturating_add(1 << 20), GAVE_UP);
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        if allowance.spent() {
            ContextError::Corrupt(GAVE_UP.to_string())
        } else {
            corrupt(e)
        }
    })?;
    allowance.set(u64::MAX);
    let mut links = Links::default();
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).map_err(corrupt)?;
        budget.entry()?;
        let name = file.name().to_string();
        let rel = safe_relative(&name)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        check_parents(dest, &rel, &name, &links)?;
        let path = dest.join(&rel);
        let mode = file.unix_mode();
        const S_IFMT: u32 = 0o170000;
        match mode.map(|m| m & S_IFMT) {
            Some(0o120000) => {
                let mut target = String::new();
                (&mut file).take(4096).read_to_string(&mut target)?;
                let target = PathBuf::from(target);
                check_link_target(&name, &rel, &target)?;
                prepare_slot(&path)?;
                std::os::unix::fs::symlink(&target, &path)?;
                links.insert(&rel);
            }
            Some(0o020000) | Some(0o060000) => {
                return Err(ContextError::UnsafeEntry {
                    entry: name,
                    why: "it is a device file",
                })
            }
            Some(0o010000) => {
                return Err(ContextError::UnsafeEntry {
                    entry: name,
                    why: "it is a FIFO",
                })
            }
            _ if file.is_dir() => fs::create_dir_all(&path)?,
            _ => write_file(&path, &mut file, mode, budget)?,
        }
    }
    Ok(())
}

/// A Dockerfile or `.dockerignore` larger than this is refused: each is read whole (and the
/// Dockerfile copied as it is rewritten), so the limit is what bounds that memory.
pub(super) const MAX_CONTROL_FILE: u64 = 4 << 20;

/// Opens a file that must not be a symlink (`O_NOFOLLOW`).
fn open_no_follow(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads the Dockerfile or `.dockerignore` at `path` (`None` when there is none): only a
/// regular file, never through a symlink (extraction keeps the archive's symlinks, and one
/// may point anywhere on this host), and at most MAX_CONTROL_FILE bytes.
fn read_control_file(path: &Path, file: &'static str) -> Result<Option<Vec<u8>>, ContextError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
        Ok(m) if !m.is_file() => {
            return Err(ContextError::UnsafeEntry {
                entry: file.to_string(),
                why: "it is not a regular file (a symlink, a folder, …)",
            })
        }
        Ok(_) => {}
    }
    let mut bytes = Vec::new();
    open_no_follow(path)?
        .take(MAX_CONTROL_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONTROL_FILE {
        return Err(ContextError::ControlFileTooLarge {
            file,
            limit: MAX_CONTROL_FILE,
        });
    }
    Ok(Some(bytes))
}

fn flattened_root(dest: &Path) -> Result<PathBuf, ContextError> {
    let mut entries = fs::read_dir(dest)?.collect::<Result<Vec<_>, _>>()?;
    if entries.len() == 1 {
        let only = entries.remove(0);
        if only.file_type()?.is_dir() {
            return Ok(only.path());
        }
    }
    Ok(dest.to_path_buf())
}

/// Reads the Dockerfile at the root and rewrites it (see `rewrite_dockerfile`); returns
/// whether the labels went into it.
pub fn prepare_dockerfile(
    root: &Path,
    arg_keys: &[String],
    style: ArgStyle,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<bool, ContextError> {
    let path = root.join("Dockerfile");
    let meta = fs::symlink_metadata(&path);
    if !meta.as_ref().is_ok_and(|m| m.is_file()) {
        let found = fs::read_dir(root)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        return Err(no_dockerfile(found));
    }
    let bytes = read_control_file(&path, "Dockerfile")?.unwrap_or_default();
    let (rewritten, labelled) = rewrite_dockerfile(&bytes, arg_keys, style, labels)?;
    fs::write(&path, rewritten)?;
    Ok(labelled)
}

/// The Dockerfile with the ARG lines, and the labels appended as one `LABEL` instruction
/// when that is safe; says whether they were (else the caller passes them to the build API).
pub(super) fn rewrite_dockerfile(
    bytes: &[u8],
    arg_keys: &[String],
    style: ArgStyle,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(String, bool), ContextError> {
    let text = String::from_utf8_lossy(bytes);
    let mut rewritten =
        super::dockerfile::inject_args(&text, arg_keys, style, MAX_CONTROL_FILE as usize).ok_or(
            ContextError::TooManyArgLines {
                limit: MAX_CONTROL_FILE,
            },
        )?;
    let label = super::dockerfile::label_line(&rewritten, labels);
    if let Some(line) = &label {
        rewritten = super::dockerfile::append_line(&rewritten, line);
    }
    Ok((rewritten, label.is_some()))
}

/// The error for sources without a Dockerfile at the top, naming (some of) what is there.
pub(super) fn no_dockerfile(mut found: Vec<String>) -> ContextError {
    found.sort();
    found.truncate(20);
    let found = if found.is_empty() {
        "nothing".to_string()
    } else {
        found.join(", ")
    };
    ContextError::NoDockerfile { found }
}

/// `.dockerignore` rules: the last matching pattern wins; `!` re-includes; a pattern that
/// matches a folder matches everything in it.
#[derive(Debug, Clone)]
pub struct DockerIgnore {
    /// Every pattern, matched at once (one by one, 2 MiB of patterns times every entry
    /// and parent folder is hours of work).
    set: GlobSet,
    /// Per pattern, in order: whether it is a `!` rule.
    negate: Vec<bool>,
}

impl Default for DockerIgnore {
    fn default() -> Self {
        Self {
            set: GlobSet::empty(),
            negate: Vec::new(),
        }
    }
}

/// More patterns than any `.dockerignore` has; the bound keeps matching cheap.
const MAX_IGNORE_PATTERNS: usize = 10_000;

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<Self, ContextError> {
        let mut set = GlobSetBuilder::new();
        let mut negate = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (is_negation, pat) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let pat = pat
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/');
            if pat.is_empty() {
                continue;
            }
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| ContextError::BadIgnorePattern {
                    pattern: line.to_string(),
                    why: e.kind().to_string(),
                })?;
            if negate.len() == MAX_IGNORE_PATTERNS {
                return Err(ContextError::BadIgnorePattern {
                    pattern: line.to_string(),
                    why: format!("the .dockerignore has more than {MAX_IGNORE_PATTERNS} patterns"),
                });
            }
            set.add(glob);
            negate.push(is_negation);
        }
        let set = set.build().map_err(|e| ContextError::BadIgnorePattern {
            pattern: "(all of them together)".to_string(),
            why: e.kind().to_string(),
        })?;
        Ok(Self { set, negate })
    }

    pub fn load(root: &Path) -> Result<Self, ContextError> {
        match read_control_file(&root.join(".dockerignore"), ".dockerignore")? {
            Some(bytes) => Self::parse(&String::from_utf8_lossy(&bytes)),
            None => Ok(Self::default()),
        }
    }

    /// Whether `rel` (slash-separated, relative to the root) is excluded.
    pub fn excludes(&self, rel: &str) -> bool {
        if self.negate.is_empty() {
            return false;
        }
        // The last pattern that matches the path itself or any of its parent folders.
        let last = std::iter::once(rel)
            .chain(rel.match_indices('/').map(|(i, _)| &rel[..i]))
            .filter_map(|p| self.set.matches(p).into_iter().max())
            .max();
        last.is_some_and(|i| !self.negate[i])
    }

    fn has_negations(&self) -> bool {
        self.negate.iter().any(|n| *n)
    }
}

/// A `Write` that hands fixed-size chunks to an async receiver through a bounded channel, so
/// the tar is produced on a blocking thread at the pace dockerd reads it.
pub(super) struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    /// Set once the producer failed: what `tar::Builder` writes when dropped (the archive's
    /// end) is discarded, so dockerd sees the error and never a shorter, complete-looking
    /// context.
    failed: bool,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() || self.failed {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "dockerd stopped reading the context",
            )
        })
    }
}

/// The build context as dockerd reads it: tar bytes, produced on a blocking thread.
pub type ContextStream = tokio_stream::wrappers::ReceiverStream<io::Result<Bytes>>;

/// Streams the folder `root` as a tar (symlinks kept as links, `.dockerignore` honoured;
/// the Dockerfile and `.dockerignore` always sent).
pub fn tar_stream(root: PathBuf, ignore: DockerIgnore) -> ContextStream {
    spawn_tar(move |builder| {
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Deterministic);
        append_dir(builder, &root, "", &ignore)
    })
}

/// A tar of a few small files (mode 644, owner 0, mtime 0), built in memory.
pub fn small_tar(files: &[(&str, &[u8])]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, *bytes)?;
    }
    builder.into_inner()
}

/// Runs `produce` on a blocking thread, writing a tar at the pace dockerd reads it: at most
/// 4 chunks of 256 KiB in flight. A failure ends the stream with its error.
pub(super) fn spawn_tar(
    produce: impl FnOnce(&mut tar::Builder<ChannelWriter>) -> io::Result<()> + Send + 'static,
) -> ContextStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
            failed: false,
        };
        let result = (|| {
            let mut builder = tar::Builder::new(writer);
            if let Err(e) = produce(&mut builder) {
                builder.get_mut().failed = true;
                return Err(e);
            }
            let mut writer = builder.into_inner()?;
            writer.flush()
        })();
        if let Err(e) = result {
            if e.kind() != io::ErrorKind::BrokenPipe {
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn append_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &str,
    ignore: &DockerIgnore,
) -> io::Result<()> {
    let mut entries = fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let always = prefix.is_empty() && (name == "Dockerfile" || name == ".dockerignore");
        let ft = entry.file_type()?;
        let excluded = !always && ignore.excludes(&rel);
        if ft.is_dir() {
            // An excluded folder may still hold re-included files when there are `!` rules.
            if excluded && !ignore.has_negations() {
                continue;
            }
            if !excluded {
                builder.append_path_with_name(entry.path(), &rel)?;
            }
            append_dir(builder, &entry.path(), &rel, ignore)?;
        } else if !excluded {
            builder.append_path_with_name(entry.path(), &rel)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_source_bytes: 1 << 20,
            max_context_bytes: 1 << 20,
            max_archive_entries: 100,
        }
    }

    /// A producer that fails part-way: dockerd must get an error, not a tar that ends
    /// cleanly after the entries so far (which it would build from).
    #[tokio::test]
    async fn a_failing_producer_never_ends_the_archive() {
        use futures::StreamExt;
        // Sizes that leave tar::Builder's end-of-archive blocks (written when it is dropped)
        // enough to fill the buffer and go out, were they not discarded.
        for size in [0usize, 1000, CHUNK - 1536, CHUNK - 600, CHUNK + 100] {
            let mut stream = spawn_tar(move |b| {
                let data = vec![7u8; size];
                let mut h = tar::Header::new_gnu();
                h.set_size(size as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, "a", data.as_slice())?;
                Err(io::Error::other("stopped"))
            });
            let mut sent = Vec::new();
            let mut failed = false;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        assert!(!failed, "data after the error");
                        sent.extend_from_slice(&chunk);
                    }
                    Err(e) => {
                        assert_eq!(e.to_string(), "stopped");
                        failed = true;
                    }
                }
            }
            assert!(failed, "size {size}: the error reached the stream");
            let entry = 512 + size.div_ceil(512) * 512;
            assert!(
                sent.len() <= entry,
                "size {size}: {} bytes sent, the entry is {entry}",
                sent.len()
            );
        }
    }

    #[test]
    fn entry_names_are_checked() {
        assert_eq!(safe_relative("./a/b").unwrap(), PathBuf::from("a/b"));
        for bad in ["../x", "a/../../x", "/etc/passwd", "C:/x", "a\\..\\x"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
        // What no Linux path can be, and what would make checking parents quadratic.
        let long_name = format!("a/{}", "n".repeat(256));
        let too_deep = "d/".repeat(257) + "f";
        let too_long = "a/".repeat(2000) + &"b".repeat(200);
        for bad in [&long_name, &too_deep, &too_long] {
            let e = safe_relative(bad).unwrap_err().to_string();
            // The message names the entry, cut short.
            assert!(e.len() < 400, "{e}");
        }
        assert!(safe_relative(&("d/".repeat(255) + "f")).is_ok());
        assert!(safe_relative(&format!("a/{}", "n".repeat(255))).is_ok());
        let target = "x".repeat(4097);
        assert!(check_link_target("l", Path::new("l"), Path::new(&target)).is_err());
    }

    #[test]
    fn link_targets_stay_inside() {
        assert!(check_link_target("l", Path::new("a/l"), Path::new("../b")).is_ok());
        assert!(check_link_target("l", Path::new("a/l"), Path::new("../../b")).is_err());
        assert!(check_link_target("l", Path::new("l"), Path::new("/etc")).is_err());
    }

    #[test]
    fn dockerignore_rules() {
        let ig =
            DockerIgnore::parse("# c\nnode_modules\n*.log\n!keep.log\ndocs/**/*.md\n/secret\n")
                .unwrap();
        assert!(ig.excludes("node_modules"));
        assert!(ig.excludes("node_modules/a/b.js"));
        assert!(ig.excludes("x.log"));
        assert!(!ig.excludes("keep.log"));
        assert!(!ig.excludes("sub/x.log"), "* does not cross folders");
        assert!(ig.excludes("docs/a/b/c.md"));
        assert!(ig.excludes("secret"));
        assert!(!ig.excludes("src/main.rs"));
        // A later rule wins over an earlier one, whichever of path or parent it matched.
        let ig = DockerIgnore::parse("!a/keep\na\n").unwrap();
        assert!(ig.excludes("a/keep"));
        let ig = DockerIgnore::parse("a\n!a/keep\n").unwrap();
        assert!(!ig.excludes("a/keep") && ig.excludes("a/other"));
        // Matching stays cheap: the pattern count is bounded.
        assert!(DockerIgnore::parse(&"a\n".repeat(MAX_IGNORE_PATTERNS)).is_ok());
        let e = DockerIgnore::parse(&"a\n".repeat(MAX_IGNORE_PATTERNS + 1)).unwrap_err();
        assert!(e.to_string().contains("more than 10000 patterns"), "{e}");
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// A tar of symlinks, hard links and files, in order: `(name, kind, target or data)`.
    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            if kind.is_file() {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            } else {
                h.set_size(0);
                b.append_link(&mut h, name, std::str::from_utf8(data).unwrap())
                    .unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    /// `l -> .` makes `esc -> l/l/../../outside` look two levels deep to a check that reads
    /// the target's names, while the kernel resolves it two levels above the context.
    /// Writes that archive, ending with `last`, beside `outside/secret`; returns the folder,
    /// the archive and where to extract it (`work/ctx`, two levels below the folder).
    fn escaping(
        last: (&'static str, tar::EntryType, &'static [u8]),
    ) -> (tempfile::TempDir, PathBuf, PathBuf) {
        use tar::EntryType::{Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/secret"), b"s3cret").unwrap();
        fs::create_dir_all(dir.path().join("work")).unwrap();
        let archive = dir.path().join("a.tar");
        let entries = [
            ("Dockerfile", Regular, b"FROM x\n".as_slice()),
            ("l", Symlink, b"."),
            ("esc", Symlink, b"l/l/../../outside"),
            last,
        ];
        fs::write(&archive, tar_of(&entries)).unwrap();
        let out = dir.path().join("work/ctx");
        (dir, archive, out)
    }

    #[test]
    fn a_hard_link_through_an_earlier_symlink_copies_nothing_from_outside() {
        let (_dir, a, out) = escaping(("leak", tar::EntryType::Link, b"esc/secret"));
        let err = extract(&a, &out, &limits()).unwrap_err();
        assert!(matches!(err, ContextError::UnsafeEntry { .. }), "{err}");
        assert!(!out.join("leak").exists());
    }

    #[test]
    fn a_dockerignore_or_dockerfile_that_is_a_symlink_is_not_read() {
        let (_dir, a, out) = escaping((".dockerignore", tar::EntryType::Symlink, b"esc/secret"));
        let root = extract(&a, &out, &limits()).unwrap();
        let err = DockerIgnore::load(&root).unwrap_err();
        assert!(matches!(err, ContextError::UnsafeEntry { .. }), "{err}");
        fs::remove_file(root.join("Dockerfile")).unwrap();
        std::os::unix::fs::symlink("esc/secret", root.join("Dockerfile")).unwrap();
        // Not a regular file: as missing.
        let err = prepare_dockerfile(&root, &[], ArgStyle::OneInstruction, &Default::default())
            .unwrap_err();
        assert!(matches!(err, ContextError::NoDockerfile { .. }), "{err}");
    }

    #[test]
    fn a_dockerfile_larger_than_the_limit_is_refused_before_it_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = b"FROM x\n".to_vec();
        big.resize(MAX_CONTROL_FILE as usize + 1, b'#');
        fs::write(dir.path().join("Dockerfile"), &big).unwrap();
        let err = prepare_dockerfile(
            dir.path(),
            &[],
            ArgStyle::OneInstruction,
            &Default::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, ContextError::ControlFileTooLarge { .. }),
            "{err}"
        );
        fs::write(dir.path().join(".dockerignore"), &big).unwrap();
        let err = DockerIgnore::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, ContextError::ControlFileTooLarge { .. }),
            "{err}"
        );
    }

    /// Counts what is read through it.
    pub(crate) struct Counting<R>(pub R, pub std::rc::Rc<std::cell::Cell<u64>>);
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1.set(self.1.get() + n as u64);
            Ok(n)
        }
    }

    /// A tar whose first header is a GNU long name of `size` bytes (zeros), then nothing.
    pub(crate) fn long_name_header(size: u64) -> impl Read {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_path("././@LongLink").unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        io::Cursor::new(h.as_bytes().to_vec()).chain(io::repeat(0).take(size + 1024))
    }

    #[test]
    fn a_huge_long_name_header_is_refused_before_it_is_read_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let input = Counting(long_name_header(64 << 20), read.clone());
        let err = extract_tar(input, dir.path(), &mut Budget::new(&limits())).unwrap_err();
        assert!(matches!(err, ContextError::Corrupt(_)), "{err}");
        // The message names the allowance in force.
        assert!(
            err.to_string()
                .contains(&format!("larger than {HEADER_ALLOWANCE} bytes")),
            "{err}"
        );
        assert!(
            read.get() <= 2 * HEADER_ALLOWANCE,
            "{} bytes read",
            read.get()
        );
    }

    #[test]
    fn the_header_guard_lets_entries_of_any_size_through() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![1u8; 3 * HEADER_ALLOWANCE as usize];
        // Longer than a header's 100 bytes of name: a GNU long name entry carries it.
        let long = format!("d/{}/{}/Dockerfile", "e".repeat(100), "f".repeat(100));
        let a = dir.path().join("a.tgz");
        fs::write(&a, tar_gz(&[(&long, b"FROM x\n"), ("d/big", &big)])).unwrap();
        let roomy = Limits {
            max_context_bytes: 1 << 30,
            ..limits()
        };
        let root = extract(&a, &dir.path().join("out"), &roomy).unwrap();
        assert_eq!(
            fs::metadata(dir.path().join("out/d/big")).unwrap().len(),
            big.len() as u64
        );
        assert!(root.exists());
    }

    #[test]
    fn single_top_folder_is_flattened() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tgz");
        fs::write(
            &a,
            tar_gz(&[
                ("repo-abc/Dockerfile", b"FROM x\n"),
                ("repo-abc/src/m", b"1"),
            ]),
        )
        .unwrap();
        let root = extract(&a, &dir.path().join("out"), &limits()).unwrap();
        assert!(root.ends_with("repo-abc"));
        assert!(root.join("src/m").is_file());
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tgz");
        fs::write(&a, tar_gz(&[("big", &[0u8; 5000])])).unwrap();
        let small = Limits {
            max_context_bytes: 1000,
            ..limits()
        };
        assert!(matches!(
            extract(&a, &dir.path().join("o1"), &small),
            Err(ContextError::TooLarge { .. })
        ));
        let few = Limits {
            max_archive_entries: 0,
            ..limits()
        };
        assert!(matches!(
            extract(&a, &dir.path().join("o2"), &few),
            Err(ContextError::TooManyEntries { .. })
        ));
    }

    /// `count` central-directory headers (no names, local offset `offset`) from offset 4,
    /// after a local-header signature, as a zip's directory.
    fn zip_directory(count: usize, offset: u32) -> Vec<u8> {
        let mut z = b"PK\x03\x04".to_vec();
        for _ in 0..count {
            let mut h = [0u8; 46];
            h[..4].copy_from_slice(&0x0201_4b50u32.to_le_bytes());
            h[42..46].copy_from_slice(&offset.to_le_bytes());
            z.extend_from_slice(&h);
        }
        z
    }

    /// An end record claiming `entries` entries in `bytes` bytes from offset 4.
    fn zip_end_record(entries: u16, bytes: u32) -> Vec<u8> {
        let mut e = vec![0u8; 22];
        e[..4].copy_from_slice(&0x0605_4b50u32.to_le_bytes());
        e[8..10].copy_from_slice(&entries.to_le_bytes());
        e[10..12].copy_from_slice(&entries.to_le_bytes());
        e[12..16].copy_from_slice(&bytes.to_le_bytes());
        e[16..20].copy_from_slice(&4u32.to_le_bytes());
        e
    }

    #[test]
    fn a_zip_is_refused_before_its_directory_costs_memory_or_time() {
        let dir = tempfile::tempdir().unwrap();
        // An end record claiming more entries than allowed: refused from the record alone.
        let claims = dir.path().join("claims.zip");
        let mut z = zip_directory(0, 0);
        z.extend(zip_end_record(60_000, 46 * 60_000));
        fs::write(&claims, &z).unwrap();
        let few = Limits {
            max_archive_entries: 1000,
            ..limits()
        };
        assert!(matches!(
            extract(&claims, &dir.path().join("o1"), &few),
            Err(ContextError::TooManyEntries { limit: 1000 })
        ));
        // A directory whose last header is bad, behind many end records: the zip reader
        // would parse the whole directory once per record; it is stopped after the first.
        let records = dir.path().join("records.zip");
        let n = 2000;
        let mut z = zip_directory(n, 0);
        z.extend(zip_directory(1, 4)[4..].iter());
        for _ in 0..2000 {
            z.extend(zip_end_record(n as u16 + 1, 46 * (n as u32 + 1)));
        }
        fs::write(&records, &z).unwrap();
        let many = Limits {
            max_archive_entries: 100_000,
            ..limits()
        };
        let e = extract(&records, &dir.path().join("o2"), &many).unwrap_err();
        assert!(e.to_string().contains("the zip reader gave up"), "{e}");
        // A real zip, its end record read as it is.
        let real = dir.path().join("real.zip");
        let mut w = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        w.start_file("Dockerfile", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"FROM x\n").unwrap();
        fs::write(&real, w.finish().unwrap().into_inner()).unwrap();
        let end = zip_end(&mut fs::File::open(&real).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(end.entries, 1);
        assert!(extract(&real, &dir.path().join("o3"), &limits()).is_ok());
    }

    #[test]
    fn data_that_is_only_skipped_counts_against_the_context_limit() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.tgz");
        // A folder entry that declares (and carries) 5000 bytes.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(5000);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, "d/", &[0u8; 5000][..]).unwrap();
        fs::write(&a, b.into_inner().unwrap()).unwrap();
        let small = Limits {
            max_context_bytes: 1000,
            ..limits()
        };
        assert!(matches!(
            extract(&a, &dir.path().join("o"), &small),
            Err(ContextError::TooLarge { .. })
        ));
        assert!(matches!(
            crate::pipeline::restream::scan(fs::File::open(&a).unwrap(), &small),
            Err(ContextError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_from_bomb_times_many_build_args_is_refused() {
        let bomb = "FROM \n".repeat(700_000);
        let keys: Vec<String> = (0..1000).map(|i| format!("KEY_{i:04}")).collect();
        let e = rewrite_dockerfile(
            bomb.as_bytes(),
            &keys,
            ArgStyle::OneInstruction,
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ContextError::TooManyArgLines { .. }), "{e}");
    }

    #[test]
    fn links_tell_what_lies_beneath_a_symlink() {
        let mut links = Links::default();
        assert!(!links.beneath_one(Path::new("a/b/c")));
        links.insert(Path::new("a/b"));
        assert!(links.beneath_one(Path::new("a/b/c")));
        assert!(links.beneath_one(Path::new("a/b/c/d")));
        assert!(!links.beneath_one(Path::new("a/b")), "the link itself");
        assert!(!links.beneath_one(Path::new("a/bc/d")));
        assert!(!links.beneath_one(Path::new("ab/c")));
        links.remove(Path::new("a/b"));
        assert!(!links.beneath_one(Path::new("a/b/c")));
    }

    #[test]
    fn unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, b"just text").unwrap();
        assert!(matches!(
            extract(&a, &dir.path().join("o"), &limits()),
            Err(ContextError::UnknownFormat)
        ));
    }

    #[test]
    fn missing_dockerfile_says_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("README"), b"x").unwrap();
        let e = prepare_dockerfile(
            dir.path(),
            &[],
            ArgStyle::OneInstruction,
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no Dockerfile") && e.contains("README"), "{e}");
    }
}
