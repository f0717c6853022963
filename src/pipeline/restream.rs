//! The build context straight from the source archive, with no extracted copy on disk.
//!
//! `scan` reads a `.tar.gz` or `.tar` once, while it downloads: it checks every entry as the
//! extraction would (names, links, types, limits) and keeps only the Dockerfile and the
//! `.dockerignore`. `stream` then reads the stored archive again (from the page cache) and
//! hands dockerd its entries as a tar: a single top-level folder flattened, ignored entries
//! left out, headers as deterministic as `context::tar_stream`'s, the rewritten Dockerfile
//! last (dockerd reads the whole context before it looks for it).
//!
//! Why: for a big app, the extracted copy was as many bytes again written to disk, and
//! dockerd's first container waited for those dirty pages. A zip (its directory is at its
//! end), a hard link, or a Dockerfile or `.dockerignore` that is not a plain small file take
//! the extraction path (`context::extract`) instead.

use super::context::{self, Budget, ContextError, ContextStream, DockerIgnore, Format};
use super::dockerfile::ArgStyle;
use crate::config::Limits;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::path::{Component, PathBuf};

/// A Dockerfile or `.dockerignore` larger than this is left to the extraction path.
pub(super) const CAPTURE_LIMIT: u64 = 1 << 20;
/// The mtime every header carries, as `tar::HeaderMode::Deterministic` sets it.
const MTIME: u64 = 1153704088;

/// What `scan` found.
#[derive(Debug)]
pub enum Scan {
    /// The context can be streamed from the archive.
    Stream(Plan),
    /// Extract the finished archive with `context::extract`; says why.
    Extract(&'static str),
}

/// How to stream the archive as the context: what `scan` kept.
#[derive(Debug)]
pub struct Plan {
    /// A `.tar.gz` (else a plain `.tar`).
    gzip: bool,
    /// The single top-level folder to flatten.
    prefix: Option<PathBuf>,
    dockerfile: Slot,
    dockerignore: Slot,
    /// The first names at the context's top, for a missing Dockerfile's error.
    found: Vec<String>,
}

/// A plan with the Dockerfile rewritten and the `.dockerignore` parsed: ready to stream.
#[derive(Debug, Clone)]
pub struct Prepared {
    gzip: bool,
    prefix: Option<PathBuf>,
    ignore: DockerIgnore,
    /// The `.dockerignore` as the archive has it, if any.
    ignore_source: Option<Vec<u8>>,
    dockerfile: Vec<u8>,
    dockerfile_exec: bool,
}

/// The last entry an archive has at a watched path.
#[derive(Debug, Default)]
enum Slot {
    #[default]
    Missing,
    File {
        data: Vec<u8>,
        exec: bool,
    },
    /// A folder, a symlink, …: not a Dockerfile.
    Other,
}

/// The Dockerfile and `.dockerignore` at one level.
#[derive(Debug, Default)]
struct Watched {
    dockerfile: Slot,
    dockerignore: Slot,
}

/// Up to 20 names, the first in sort order (as the missing-Dockerfile error lists them).
#[derive(Debug, Default)]
struct FirstNames(BTreeSet<String>);

impl FirstNames {
    fn add(&mut self, name: &std::ffi::OsStr) {
        self.0.insert(name.to_string_lossy().into_owned());
        if self.0.len() > 20 {
            self.0.pop_last();
        }
    }
}

/// The running check of an archive.
pub type Scanning = tokio_util::task::AbortOnDropHandle<Result<Scan, ContextError>>;

/// `scan` on a blocking thread of its own, fed the archive's chunks, started when the archive
/// file is created (`sources::Tee::on_start`): a fetch that fails before its first byte, the
/// common failure, starts no thread and wakes none.
pub struct LazyScan {
    state: std::sync::Mutex<LazyState>,
    limits: Limits,
}

enum LazyState {
    Waiting(tokio::sync::mpsc::Receiver<bytes::Bytes>),
    Started(Scanning),
    Taken,
}

impl LazyScan {
    pub fn new(chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>, limits: Limits) -> Self {
        Self {
            state: std::sync::Mutex::new(LazyState::Waiting(chunks)),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LazyState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the check (once; later calls do nothing). Needs a Tokio runtime.
    pub fn start(&self) {
        let mut state = self.lock();
        *state = match std::mem::replace(&mut *state, LazyState::Taken) {
            LazyState::Waiting(chunks) => {
                let limits = self.limits;
                LazyState::Started(tokio_util::task::AbortOnDropHandle::new(
                    tokio::task::spawn_blocking(move || {
                        scan(context::ChunkReader::new(chunks), &limits)
                    }),
                ))
            }
            started_or_taken => started_or_taken,
        };
    }

    /// The check, started now if the archive never was (it then reads an empty archive);
    /// `None` once taken.
    pub fn take(&self) -> Option<Scanning> {
        self.start();
        match std::mem::replace(&mut *self.lock(), LazyState::Taken) {
            LazyState::Started(scanning) => Some(scanning),
            _ => None,
        }
    }
}

/// Reads a `.tar.gz`, `.tar` or `.zip` from `reader` (the download as it arrives) and checks
/// it as `context::extract` would, without writing anything.
pub fn scan(mut reader: impl Read, limits: &Limits) -> Result<Scan, ContextError> {
    let head = context::read_head(&mut reader)?;
    let format = context::detect_bytes(&head)?;
    let whole = io::Cursor::new(head).chain(reader);
    match format {
        Format::Zip => Ok(Scan::Extract("it is a zip")),
        Format::TarGz => scan_tar(
            flate2::read::MultiGzDecoder::new(io::BufReader::new(whole)),
            true,
            limits,
        ),
        Format::Tar => scan_tar(whole, false, limits),
    }
}

fn scan_tar(reader: impl Read, gzip: bool, limits: &Limits) -> Result<Scan, ContextError> {
    use tar::EntryType;
    let mut budget = Budget::new(limits);
    let (reader, allowance) = context::header_guard(reader);
    let mut archive = tar::Archive::new(reader);
    let corrupt = |e: io::Error| ContextError::Corrupt(e.to_string());
    // The first entry's first component, and whether any entry has another.
    let mut top: Option<OsString> = None;
    let mut many_tops = false;
    // Whether `top` is a folder (it is, unless its own last entry is something else).
    let mut top_is_dir = true;
    let mut top_names = FirstNames::default();
    let mut nested_names = FirstNames::default();
    let (mut root, mut nested) = (Watched::default(), Watched::default());
    // Symlinks so far: an entry beneath one would be written wherever it points.
    let mut symlinks = context::Links::default();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        allowance.entry(&entry);
        let kind = entry.header().entry_type();
        budget.tar_entry(&entry)?;
        if context::is_extension_header(kind) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = context::safe_relative(&name)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        if symlinks.beneath_one(&rel) {
            return Err(ContextError::UnsafeEntry {
                entry: name,
                why: "it is inside a folder that is a symlink",
            });
        }
        let parts: Vec<Component> = rel.components().collect();
        let first = parts[0].as_os_str();
        match &top {
            None => top = Some(first.to_os_string()),
            Some(t) if t != first => many_tops = true,
            Some(_) => {}
        }
        top_names.add(first);
        let in_top = top.as_deref() == Some(first);
        if in_top && parts.len() == 1 {
            top_is_dir = kind == EntryType::Directory;
        }
        if in_top && parts.len() == 2 {
            nested_names.add(parts[1].as_os_str());
        }
        // The Dockerfile and .dockerignore: at the top, or in the top folder (if it is the
        // only one, flattening makes that the top).
        let watched = match parts.len() {
            1 => Some((&mut root, first)),
            2 if in_top => Some((&mut nested, parts[1].as_os_str())),
            _ => None,
        }
        .and_then(|(w, leaf)| match leaf.to_str() {
            Some("Dockerfile") => Some(&mut w.dockerfile),
            Some(".dockerignore") => Some(&mut w.dockerignore),
            _ => None,
        });
        if kind != EntryType::Symlink {
            symlinks.remove(&rel);
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let exec = entry.header().mode().is_ok_and(|m| m & 0o100 != 0);
                let limit = budget.remaining();
                let mut data = (&mut entry).take(limit.saturating_add(1));
                match watched {
                    Some(slot) => {
                        let mut kept = Vec::new();
                        let n = (&mut data).take(CAPTURE_LIMIT + 1).read_to_end(&mut kept)?;
                        let rest = io::copy(&mut data, &mut io::sink())?;
                        budget.wrote(n as u64 + rest)?;
                        if n as u64 > CAPTURE_LIMIT {
                            return Ok(Scan::Extract(
                                "its Dockerfile or .dockerignore is over 1 MiB",
                            ));
                        }
                        *slot = Slot::File { data: kept, exec };
                    }
                    None => budget.wrote(io::copy(&mut data, &mut io::sink())?)?,
                }
            }
            EntryType::Directory => {
                if let Some(slot) = watched {
                    *slot = Slot::Other;
                }
            }
            EntryType::Symlink => {
                context::symlink_target(&entry, &name, &rel)?;
                if let Some(slot) = watched {
                    *slot = Slot::Other;
                }
                symlinks.insert(&rel);
            }
            // The extraction copies the linked file; a stream cannot reach back for it.
            EntryType::Link => return Ok(Scan::Extract("it has hard links")),
            _ => return Err(context::refused_kind(name, kind)),
        }
    }
    let flatten = !many_tops && top.is_some() && top_is_dir;
    let (watched, names) = if flatten {
        (nested, nested_names)
    } else {
        (root, top_names)
    };
    // The extraction reads a linked .dockerignore through its link, and fails on a folder.
    if matches!(watched.dockerignore, Slot::Other) {
        return Ok(Scan::Extract("its .dockerignore is not a plain file"));
    }
    Ok(Scan::Stream(Plan {
        gzip,
        prefix: top.filter(|_| flatten).map(PathBuf::from),
        dockerfile: watched.dockerfile,
        dockerignore: watched.dockerignore,
        found: names.0.into_iter().collect(),
    }))
}

impl Prepared {
    /// What a stream sent while the archive downloaded must have matched (see `overlap`).
    pub fn verdict(&self) -> super::overlap::Verdict {
        super::overlap::Verdict {
            prefix: self.prefix.clone(),
            dockerignore: self.ignore_source.clone(),
            dockerfile: self.dockerfile.clone(),
            dockerfile_exec: self.dockerfile_exec,
        }
    }
}

impl Plan {
    /// Rewrites the Dockerfile (see `context::rewrite_dockerfile`) and parses the
    /// `.dockerignore`; also returns whether the labels went into the Dockerfile.
    pub fn prepare(
        self,
        arg_keys: &[String],
        style: ArgStyle,
        labels: &BTreeMap<String, String>,
    ) -> Result<(Prepared, bool), ContextError> {
        let Slot::File { data, exec } = self.dockerfile else {
            return Err(context::no_dockerfile(self.found));
        };
        let (dockerfile, labelled) = context::rewrite_dockerfile(&data, arg_keys, style, labels)?;
        let (ignore, ignore_source) = match self.dockerignore {
            Slot::File { data, .. } => (
                DockerIgnore::parse(&String::from_utf8_lossy(&data))?,
                Some(data),
            ),
            // (`scan` sent any other kind to the extraction.)
            Slot::Missing | Slot::Other => (DockerIgnore::default(), None),
        };
        Ok((
            Prepared {
                gzip: self.gzip,
                prefix: self.prefix,
                ignore,
                ignore_source,
                dockerfile: dockerfile.into_bytes(),
                dockerfile_exec: exec,
            },
            labelled,
        ))
    }
}

/// Streams the archive at `archive` (the one `scan` read) as the build context.
pub fn stream(archive: PathBuf, context: Prepared) -> ContextStream {
    context::spawn_tar(move |out| {
        let file = io::BufReader::with_capacity(256 * 1024, fs::File::open(&archive)?);
        if context.gzip {
            copy_entries(flate2::read::MultiGzDecoder::new(file), &context, out)?;
        } else {
            copy_entries(file, &context, out)?;
        }
        append_dockerfile(out, &context.dockerfile, context.dockerfile_exec)
    })
}

pub(super) fn append_dockerfile<W: io::Write>(
    out: &mut tar::Builder<W>,
    dockerfile: &[u8],
    exec: bool,
) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, exec);
    h.set_size(dockerfile.len() as u64);
    out.append_data(&mut h, "Dockerfile", dockerfile)
}

fn copy_entries<W: io::Write>(
    reader: impl Read,
    context: &Prepared,
    out: &mut tar::Builder<W>,
) -> io::Result<()> {
    let (reader, allowance) = context::header_guard(reader);
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        allowance.entry(&entry);
        let kind = entry.header().entry_type();
        if context::is_extension_header(kind) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = context::safe_relative(&name).map_err(|e| changed(&e.to_string()))?;
        let rel = match &context.prefix {
            Some(prefix) => match rel.strip_prefix(prefix) {
                Ok(r) => r.to_path_buf(),
                Err(_) => return Err(changed("an entry is outside the top folder")),
            },
            None => rel,
        };
        let Some(rel_str) = rel.to_str().filter(|s| !s.is_empty()) else {
            continue; // the top folder itself, or a name that is not UTF-8 (as below)
        };
        let top_level = !rel_str.contains('/');
        if top_level && rel_str == "Dockerfile" {
            continue; // sent last, rewritten
        }
        let always = top_level && rel_str == ".dockerignore";
        if !always && context.ignore.excludes(rel_str) {
            continue;
        }
        if !copy_entry(&mut entry, kind, &rel, out)? {
            return Err(changed("an entry the check did not see"));
        }
    }
    Ok(())
}

/// Writes one entry (a file, folder or symlink) at `rel` with a deterministic header;
/// `false` for any other kind.
pub(super) fn copy_entry<R: Read, W: io::Write>(
    entry: &mut tar::Entry<'_, R>,
    kind: tar::EntryType,
    rel: &std::path::Path,
    out: &mut tar::Builder<W>,
) -> io::Result<bool> {
    use tar::EntryType;
    match kind {
        EntryType::Regular | EntryType::Continuous => {
            let exec = entry.header().mode().is_ok_and(|m| m & 0o100 != 0);
            let mut h = header(EntryType::Regular, exec);
            h.set_size(entry.size());
            out.append_data(&mut h, rel, entry)?;
        }
        EntryType::Directory => {
            let mut h = header(EntryType::Directory, true);
            out.append_data(&mut h, rel, io::empty())?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| changed("a symlink lost its target"))?
                .into_owned();
            let mut h = header(EntryType::Symlink, true);
            out.append_link(&mut h, rel, target)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// A header as `tar::HeaderMode::Deterministic` writes one: fixed mtime, owner 0, mode 755 or
/// 644 by the owner's execute bit (folders and symlinks 755).
pub(super) fn header(kind: tar::EntryType, exec: bool) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(if exec { 0o755 } else { 0o644 });
    h
}

/// The stored archive differs from the one `scan` checked: it changed on disk.
fn changed(what: &str) -> io::Error {
    io::Error::other(format!(
        "the sources changed on disk after they were checked ({what})"
    ))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use futures::StreamExt;

    pub(in crate::pipeline) fn limits() -> Limits {
        Limits {
            max_source_bytes: 1 << 30,
            max_context_bytes: 1 << 30,
            max_archive_entries: 1000,
        }
    }

    #[test]
    fn the_scan_and_the_stream_refuse_a_huge_long_name_before_reading_it_whole() {
        use crate::pipeline::context::tests::{long_name_header, Counting};
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let err = scan_tar(
            Counting(long_name_header(64 << 20), read.clone()),
            false,
            &limits(),
        )
        .unwrap_err();
        assert!(matches!(err, ContextError::Corrupt(_)), "{err}");
        assert!(read.get() <= 2 << 20, "{} bytes read", read.get());
        read.set(0);
        let prepared = Prepared {
            gzip: false,
            prefix: None,
            ignore: DockerIgnore::default(),
            ignore_source: None,
            dockerfile: b"FROM x\n".to_vec(),
            dockerfile_exec: false,
        };
        let mut out = tar::Builder::new(Vec::new());
        let input = Counting(long_name_header(64 << 20), read.clone());
        assert!(copy_entries(input, &prepared, &mut out).is_err());
        assert!(read.get() <= 2 << 20, "{} bytes read", read.get());
    }

    pub(in crate::pipeline) enum E<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        /// A name the tar crate would refuse to write, and an entry type.
        Raw(&'a str, tar::EntryType),
    }

    pub(in crate::pipeline) fn tar_gz(entries: &[E]) -> Vec<u8> {
        let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            match e {
                E::File(name, data, mode) => {
                    h.set_size(data.len() as u64);
                    h.set_mode(*mode);
                    b.append_data(&mut h, name, *data).unwrap();
                }
                E::Dir(name) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, name, io::empty()).unwrap();
                }
                E::Link(name, target) | E::Hard(name, target) => {
                    h.set_entry_type(if matches!(e, E::Link(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    });
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, name, target).unwrap();
                }
                E::Raw(name, kind) => {
                    h.set_entry_type(*kind);
                    h.set_mode(0o644);
                    h.set_size(1);
                    let raw = &mut h.as_old_mut().name;
                    raw[..name.len()].copy_from_slice(name.as_bytes());
                    h.set_cksum();
                    b.append(&h, &b"x"[..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[tokio::test]
    async fn a_lazy_scan_checks_what_it_is_fed_once_started_and_is_taken_once() {
        let archive = tar_gz(&[E::File("Dockerfile", b"FROM x\n", 0o644)]);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let scan = LazyScan::new(rx, limits());
        scan.start();
        scan.start();
        tx.send(bytes::Bytes::from(archive)).await.unwrap();
        drop(tx);
        let scanned = scan.take().expect("started").await.unwrap();
        assert!(matches!(scanned, Ok(Scan::Stream(_))), "{scanned:?}");
        assert!(scan.take().is_none());
        // Never started (the fetch failed before its archive): taking it finds no archive.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        drop(tx);
        let never = LazyScan::new(rx, limits());
        assert!(never
            .take()
            .expect("started by take")
            .await
            .unwrap()
            .is_err());
    }

    /// A tar's entries as sorted lines: kind, mode, path, and the content or link target.
    pub(in crate::pipeline) fn listing(tar_bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut ar = tar::Archive::new(tar_bytes);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let path = e
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string();
            let body = match h.entry_type() {
                tar::EntryType::Symlink => {
                    format!("-> {}", e.link_name().unwrap().unwrap().display())
                }
                _ => {
                    let mut bytes = Vec::new();
                    e.read_to_end(&mut bytes).unwrap();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            };
            out.push(format!(
                "{:?} {:o} {} {} {} {path} {body}",
                h.entry_type(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap()
            ));
        }
        out.sort();
        out
    }

    async fn collect(stream: ContextStream) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        bytes
    }

    fn keys() -> Vec<String> {
        vec!["K1".to_string()]
    }

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), "web".to_string())])
    }

    /// The context streamed from the archive, and the context the extraction path sends.
    async fn both_ways(archive: &[u8]) -> (Vec<String>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sources");
        fs::write(&file, archive).unwrap();
        let Scan::Stream(plan) = scan(archive, &limits()).unwrap() else {
            panic!("expected a streamable archive")
        };
        let (prepared, labelled) = plan
            .prepare(&keys(), ArgStyle::OneInstruction, &labels())
            .unwrap();
        assert!(labelled);
        let streamed = listing(&collect(stream(file.clone(), prepared)).await);

        let root = context::extract(&file, &dir.path().join("context"), &limits()).unwrap();
        assert!(
            context::prepare_dockerfile(&root, &keys(), ArgStyle::OneInstruction, &labels())
                .unwrap()
        );
        let ignore = DockerIgnore::load(&root).unwrap();
        let extracted = listing(&collect(context::tar_stream(root, ignore)).await);
        (streamed, extracted)
    }

    /// Folders the archive does not list are implicit in the stream (dockerd creates them),
    /// explicit in the extracted folder's tar: compare everything else exactly.
    fn without_dirs(l: &[String]) -> Vec<String> {
        l.iter()
            .filter(|e| !e.starts_with("Directory"))
            .cloned()
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_streamed_context_is_the_extracted_one() {
        let long = format!("repo-1/{}/deep.txt", "d".repeat(120));
        let cases: Vec<Vec<E>> = vec![
            // A single top folder, .dockerignore with a negation, a folder excluded, an
            // executable, a symlink, a name past tar's 100 bytes.
            vec![
                E::Dir("repo-1/"),
                E::File("repo-1/src/main.sh", b"echo hi", 0o755),
                E::File(
                    "repo-1/.dockerignore",
                    b"logs\n*.md\n!KEEP.md\nsecret.txt\n",
                    0o644,
                ),
                E::File("repo-1/Dockerfile", b"FROM x\nRUN y\n", 0o644),
                E::File("repo-1/secret.txt", b"no", 0o600),
                E::Dir("repo-1/logs/"),
                E::File("repo-1/logs/a.log", b"a", 0o644),
                E::File("repo-1/README.md", b"r", 0o644),
                E::File("repo-1/KEEP.md", b"k", 0o644),
                E::Link("repo-1/current", "src/main.sh"),
                E::File(&long, b"deep", 0o640),
            ],
            // `git archive --prefix`: a pax global header (the commit id) before the top
            // folder must not count as a second top-level entry.
            vec![
                E::Raw("pax_global_header", tar::EntryType::XGlobalHeader),
                E::Dir("repo-2/"),
                E::File("repo-2/Dockerfile", b"FROM g\n", 0o644),
                E::File("repo-2/app.js", b"js", 0o644),
            ],
            // Two top-level entries: nothing flattened; a later Dockerfile wins.
            vec![
                E::File("Dockerfile", b"FROM old\n", 0o644),
                E::Dir("app/"),
                E::File("app/index.js", b"js", 0o644),
                E::File("Dockerfile", b"FROM new AS b\nFROM c\n", 0o755),
            ],
            // A folder plus a file at the top: not flattened either.
            vec![
                E::File("sub/Dockerfile", b"FROM nested\n", 0o644),
                E::File("Dockerfile", b"FROM top\n", 0o644),
            ],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let (streamed, extracted) = both_ways(&tar_gz(entries)).await;
            assert_eq!(
                without_dirs(&streamed),
                without_dirs(&extracted),
                "case {i}"
            );
            for d in streamed.iter().filter(|e| e.starts_with("Directory")) {
                assert!(extracted.contains(d), "case {i}: {d}");
            }
            assert!(
                streamed
                    .iter()
                    .any(|e| e.contains("ARG K1") && e.contains("LABEL app=")),
                "case {i}: {streamed:?}"
            );
        }
    }

    #[test]
    fn scanning_refuses_what_the_extraction_refuses_with_the_same_words() {
        let df = E::File("Dockerfile", b"FROM x\n", 0o644);
        let cases: Vec<Vec<E>> = vec![
            vec![E::Raw("../evil", tar::EntryType::Regular)],
            vec![E::Raw("/etc/passwd", tar::EntryType::Regular)],
            vec![E::Link("out", "../../etc")],
            vec![E::Link("dir", "real"), E::File("dir/x", b"x", 0o644)],
            vec![E::Raw("dev", tar::EntryType::Char)],
            vec![E::Raw("fifo", tar::EntryType::Fifo)],
            vec![df, E::File("big", &[0u8; 3000], 0o644)],
        ];
        let small = Limits {
            max_context_bytes: 2000,
            ..limits()
        };
        for (i, entries) in cases.iter().enumerate() {
            let archive = tar_gz(entries);
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("sources");
            fs::write(&file, &archive).unwrap();
            let scanned = scan(archive.as_slice(), &small).unwrap_err().to_string();
            let extracted = context::extract(&file, &dir.path().join("c"), &small)
                .unwrap_err()
                .to_string();
            assert_eq!(scanned, extracted, "case {i}");
        }
        let many: Vec<E> = (0..5).map(|_| E::File("a", b"a", 0o644)).collect();
        let few = Limits {
            max_archive_entries: 4,
            ..limits()
        };
        let err = scan(tar_gz(&many).as_slice(), &few).unwrap_err();
        assert!(
            matches!(err, ContextError::TooManyEntries { limit: 4 }),
            "{err}"
        );
        let err = scan(&b"just text"[..], &limits()).unwrap_err();
        assert!(matches!(err, ContextError::UnknownFormat), "{err}");
    }

    #[test]
    fn a_missing_dockerfile_names_what_is_there() {
        for (entries, expect) in [
            (
                vec![E::File("top/README", b"r", 0o644), E::Dir("top/src/")],
                "(found: README, src)",
            ),
            (
                vec![E::Link("Dockerfile", "docker/Dockerfile")],
                "(found: Dockerfile)",
            ),
            (vec![], "(found: nothing)"),
        ] {
            let archive = tar_gz(&entries);
            let Scan::Stream(plan) = scan(archive.as_slice(), &limits()).unwrap() else {
                panic!("streamable")
            };
            let err = plan
                .prepare(&[], ArgStyle::OneInstruction, &BTreeMap::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{err}");

            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("sources");
            fs::write(&file, &archive).unwrap();
            let root = context::extract(&file, &dir.path().join("c"), &limits()).unwrap();
            let err2 =
                context::prepare_dockerfile(&root, &[], ArgStyle::OneInstruction, &BTreeMap::new())
                    .unwrap_err()
                    .to_string();
            assert_eq!(err, err2);
        }
    }

    #[test]
    fn what_a_stream_cannot_reproduce_goes_to_the_extraction() {
        let df = || E::File("Dockerfile", b"FROM x\n", 0o644);
        let big = vec![b'#'; (CAPTURE_LIMIT + 1) as usize];
        let cases: Vec<Vec<E>> = vec![
            vec![df(), E::File("a", b"a", 0o644), E::Hard("b", "a")],
            vec![
                df(),
                E::File("rules", b"x", 0o644),
                E::Link(".dockerignore", "rules"),
            ],
            vec![df(), E::Dir(".dockerignore/")],
            vec![
                E::File("top/Dockerfile", b"FROM x\n", 0o644),
                E::File("top/rules", b"x", 0o644),
                E::Link("top/.dockerignore", "rules"),
            ],
            vec![E::File("Dockerfile", &big, 0o644)],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let scanned = scan(tar_gz(entries).as_slice(), &limits()).unwrap();
            assert!(matches!(scanned, Scan::Extract(_)), "case {i}: {scanned:?}");
        }
        let mut zip = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        zip.start_file("Dockerfile", zip::write::SimpleFileOptions::default())
            .unwrap();
        io::Write::write_all(&mut zip, b"FROM x\n").unwrap();
        let zip = zip.finish().unwrap().into_inner();
        assert!(matches!(
            scan(zip.as_slice(), &limits()).unwrap(),
            Scan::Extract("it is a zip")
        ));
    }
}
