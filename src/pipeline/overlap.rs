//! The build context sent to dockerd while the sources still download.
//!
//! `restream` sends the context once the archive is whole and checked. For a big archive
//! that puts the download and the context's upload one after the other, though neither
//! needs the other's end: `stream_while_written` follows the archive file as the download
//! writes it and sends its entries at once, guessing what `restream` only knows at the end
//! (the single top folder to flatten, the `.dockerignore`), with the Dockerfile held back.
//! At the archive's end it waits for the checked archive's `Verdict`: if the guesses hold,
//! the rewritten Dockerfile goes last and dockerd builds exactly the context `restream` would
//! have sent. If not (a guess was wrong, the check refused the archive, the download failed),
//! the stream ends with an error, so dockerd drops the upload and builds nothing, and the
//! pipeline sends the context again the usual way. The download never waits for dockerd:
//! the stream reads the file (the page cache), not the download.

use super::context::{self, Budget, ContextStream, DockerIgnore, Format};
use super::restream::{self, CAPTURE_LIMIT};
use crate::config::Limits;
use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How long a reader at the end of the file waits before looking again (the writer's end
/// wakes it at once).
const POLL: Duration = Duration::from_millis(5);
/// Names sent before a `.dockerignore` are kept to check against it, up to this many; past
/// it, a `.dockerignore` that comes later gives the guess up.
const NAMES_BEFORE_IGNORE: usize = 4096;

/// The archive file while the download writes it: tells a reader at its end whether more
/// is coming.
#[derive(Default)]
pub struct Growing {
    state: Mutex<GrowingState>,
    changed: Condvar,
}

#[derive(Default)]
struct GrowingState {
    /// `Some(true)`: the whole archive is in the file; `Some(false)`: the download failed.
    ended: Option<bool>,
    /// Readers waiting at the end of the file. Without any, `end` makes no system call
    /// (std's condvar wakes the kernel on every notify): most builds never have one.
    waiting: usize,
}

impl Growing {
    /// The download ended (the first call counts).
    pub fn end(&self, complete: bool) {
        let mut state = self.lock();
        state.ended.get_or_insert(complete);
        if state.waiting > 0 {
            self.changed.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrowingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ended(&self) -> Option<bool> {
        self.lock().ended
    }

    fn wait(&self) {
        let mut state = self.lock();
        if state.ended.is_none() {
            state.waiting += 1;
            let (mut state, _) = self
                .changed
                .wait_timeout(state, POLL)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        }
    }
}

/// Ends a `Growing` as failed when dropped, unless it was ended before: a reader never waits
/// for a download whose pipeline has moved on.
pub struct EndOnDrop(pub Arc<Growing>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(false);
    }
}

/// Reads a file as it is written, waiting at its end until the writer ends.
struct Follow {
    path: PathBuf,
    file: Option<fs::File>,
    growing: Arc<Growing>,
}

impl Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Asked before reading: a writer that ended had written everything, so the
            // read that follows sees it all.
            let ended = self.growing.ended();
            if self.file.is_none() {
                match fs::File::open(&self.path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && ended.is_none() => {}
                    Err(e) => return Err(e),
                }
            }
            if let Some(file) = &mut self.file {
                let n = file.read(buf)?;
                if n > 0 || ended == Some(true) {
                    return Ok(n);
                }
            }
            match ended {
                Some(false) => return Err(io::Error::other("the download stopped")),
                _ => self.growing.wait(),
            }
        }
    }
}

/// The checked archive's context, for the end of a stream that guessed it: what it must
/// have sent, and the Dockerfile to send last.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub(super) prefix: Option<PathBuf>,
    pub(super) dockerignore: Option<Vec<u8>>,
    pub(super) dockerfile: Vec<u8>,
    pub(super) dockerfile_exec: bool,
}

/// What the stream guessed while the archive downloaded.
#[derive(Debug, PartialEq)]
struct Guess {
    prefix: Option<PathBuf>,
    dockerignore: Option<Vec<u8>>,
}

/// Why a stream gave its guess up (the pipeline then sends the context the usual way).
pub type GaveUp = Arc<Mutex<Option<String>>>;

/// Streams `archive` (a `.tar.gz` or `.tar` being written; `growing` says when it ends) as
/// the build context, within `limits` as the check is (an archive that inflates past them
/// stops here, not in dockerd, even before the check has said so). `verdict` is the checked
/// archive's (an error message where it is not to be streamed); a stream that gives up ends
/// with an error and says why in `gave_up`.
pub fn stream_while_written(
    archive: PathBuf,
    limits: Limits,
    growing: Arc<Growing>,
    verdict: tokio::sync::oneshot::Receiver<Result<Verdict, String>>,
    gave_up: GaveUp,
) -> ContextStream {
    context::spawn_tar(move |out| {
        let sent = (|| {
            let mut reader = Follow {
                path: archive,
                file: None,
                growing,
            };
            let head = context::read_head(&mut reader)?;
            let format = context::detect_bytes(&head).map_err(io::Error::other)?;
            let whole =
                io::BufReader::with_capacity(256 * 1024, io::Cursor::new(head).chain(reader));
            let guess = match format {
                Format::TarGz => {
                    guess_entries(flate2::read::MultiGzDecoder::new(whole), &limits, out)?
                }
                Format::Tar => guess_entries(whole, &limits, out)?,
                Format::Zip => return Err(io::Error::other("it is a zip")),
            };
            let verdict = verdict
                .blocking_recv()
                .map_err(|_| io::Error::other("the build went on without it"))?
                .map_err(io::Error::other)?;
            let expected = Guess {
                prefix: verdict.prefix,
                dockerignore: verdict.dockerignore,
            };
            if guess != expected {
                return Err(io::Error::other(
                    "the archive's top folder or .dockerignore was not what its first entries \
                     suggested",
                ));
            }
            restream::append_dockerfile(out, &verdict.dockerfile, verdict.dockerfile_exec)
        })();
        if let Err(e) = &sent {
            // dockerd stopping its read is the build's own failure, not a wrong guess.
            if e.kind() != io::ErrorKind::BrokenPipe {
                *gave_up.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
            }
        }
        sent
    })
}

/// Sends the archive's entries as `restream` would, guessing the top folder from the first
/// entry and applying a `.dockerignore` from where it appears (checking what went before).
fn guess_entries<W: io::Write>(
    reader: impl Read,
    limits: &Limits,
    out: &mut tar::Builder<W>,
) -> io::Result<Guess> {
    use tar::EntryType;
    let mut budget = Budget::new(limits);
    let (reader, allowance) = context::header_guard(reader);
    let mut archive = tar::Archive::new(reader);
    // Decided by the first entry: a folder (or a path in one) is the top folder to flatten
    // (GitHub's tarballs), unless the archive starts with its root `./`.
    let mut prefix: Option<Option<PathBuf>> = None;
    let mut ignore: Option<(DockerIgnore, Vec<u8>)> = None;
    // Names sent while no .dockerignore was seen; `None` past NAMES_BEFORE_IGNORE.
    let mut before: Option<Vec<String>> = Some(Vec::new());
    for entry in archive.entries()? {
        let mut entry = entry?;
        allowance.entry(&entry);
        let kind = entry.header().entry_type();
        budget.tar_entry(&entry).map_err(io::Error::other)?;
        if context::is_extension_header(kind) {
            continue;
        }
        if matches!(kind, EntryType::Regular | EntryType::Continuous) {
            budget.wrote(entry.size()).map_err(io::Error::other)?;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = context::safe_relative(&name).map_err(io::Error::other)?;
        if rel.as_os_str().is_empty() {
            // `./` first: made by `tar -C dir .`, whose entries are the folder's own
            // (rarely a single folder to flatten).
            prefix.get_or_insert(None);
            continue;
        }
        let top = prefix.get_or_insert_with(|| {
            let mut parts = rel.components();
            let first = parts.next().map(|c| PathBuf::from(c.as_os_str()));
            (parts.next().is_some() || kind == EntryType::Directory)
                .then_some(first)
                .flatten()
        });
        let rel = match top {
            Some(p) => rel
                .strip_prefix(&*p)
                .map_err(|_| io::Error::other("an entry is outside the first entry's folder"))?
                .to_path_buf(),
            None => rel,
        };
        let Some(rel_str) = rel.to_str().filter(|s| !s.is_empty()) else {
            continue;
        };
        let top_level = !rel_str.contains('/');
        if top_level && rel_str == "Dockerfile" {
            continue; // sent last, rewritten (the verdict's)
        }
        if top_level && rel_str == ".dockerignore" {
            let data = read_dockerignore(&mut entry, kind, ignore.is_some())?;
            let parsed =
                DockerIgnore::parse(&String::from_utf8_lossy(&data)).map_err(io::Error::other)?;
            let sent = before.take().ok_or_else(|| {
                io::Error::other("too many entries came before the .dockerignore")
            })?;
            if let Some(n) = sent.iter().find(|n| parsed.excludes(n)) {
                return Err(io::Error::other(format!(
                    "the .dockerignore came after {n}, which it leaves out"
                )));
            }
            let mut h = restream::header(EntryType::Regular, false);
            h.set_size(data.len() as u64);
            out.append_data(&mut h, &rel, data.as_slice())?;
            ignore = Some((parsed, data));
            continue;
        }
        if kind == EntryType::Link {
            return Err(io::Error::other("it has hard links"));
        }
        match &ignore {
            Some((rules, _)) if rules.excludes(rel_str) => continue,
            Some(_) => {}
            None => {
                if let Some(names) = &mut before {
                    if names.len() < NAMES_BEFORE_IGNORE {
                        names.push(rel_str.to_string());
                    } else {
                        before = None;
                    }
                }
            }
        }
        if !restream::copy_entry(&mut entry, kind, &rel, out)? {
            return Err(io::Error::other(format!("{name} is of a kind not sent")));
        }
    }
    Ok(Guess {
        prefix: prefix.flatten(),
        dockerignore: ignore.map(|(_, data)| data),
    })
}

/// The `.dockerignore` entry's bytes, if the stream can use it as `restream` would.
fn read_dockerignore<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    kind: tar::EntryType,
    seen_one: bool,
) -> io::Result<Vec<u8>> {
    if seen_one {
        return Err(io::Error::other("the archive has two .dockerignore files"));
    }
    if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
        return Err(io::Error::other("its .dockerignore is not a plain file"));
    }
    if entry.size() > CAPTURE_LIMIT {
        return Err(io::Error::other("its .dockerignore is over 1 MiB"));
    }
    let mut data = Vec::new();
    entry.read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::pipeline::dockerfile::ArgStyle;
    use crate::pipeline::restream::tests::{limits, listing, tar_gz, E};
    use crate::pipeline::restream::{scan, stream, Scan};
    use futures::StreamExt;
    use std::collections::BTreeMap;

    #[test]
    fn the_guess_refuses_a_huge_long_name_before_reading_it_whole() {
        use crate::pipeline::context::tests::{long_name_header, Counting};
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut out = tar::Builder::new(Vec::new());
        let input = Counting(long_name_header(64 << 20), read.clone());
        assert!(guess_entries(input, &limits(), &mut out).is_err());
        assert!(read.get() <= 2 << 20, "{} bytes read", read.get());
    }

    /// Streams `archive` while a thread writes it in small pieces; the verdict goes out
    /// once the whole archive is checked, as the pipeline sends it. Returns what dockerd got
    /// (or the stream's error) and why it gave up.
    async fn while_written(
        archive: &[u8],
        fail_download: bool,
        limits: Limits,
    ) -> (Result<Vec<u8>, String>, Option<String>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sources");
        let growing = Arc::new(Growing::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gave_up = GaveUp::default();
        let mut stream =
            stream_while_written(file.clone(), limits, growing.clone(), rx, gave_up.clone());
        let writer = {
            let (file, archive, growing) = (file.clone(), archive.to_vec(), growing.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let mut f = fs::File::create(&file).unwrap();
                let pieces: Vec<&[u8]> = archive.chunks(4096).collect();
                for (i, piece) in pieces.iter().enumerate() {
                    if fail_download && i == pieces.len() / 2 {
                        growing.end(false);
                        return;
                    }
                    f.write_all(piece).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                f.flush().unwrap();
                growing.end(true);
            })
        };
        let verdict = match scan(archive, &limits) {
            Ok(Scan::Stream(plan)) => plan
                .prepare(
                    &["K".to_string()],
                    ArgStyle::OneInstruction,
                    &BTreeMap::new(),
                )
                .map(|(p, _)| p.verdict())
                .map_err(|e| e.to_string()),
            Ok(Scan::Extract(why)) => Err(why.to_string()),
            Err(e) => Err(e.to_string()),
        };
        // As the pipeline does: the verdict once the download has ended and been checked.
        let sender = tokio::task::spawn_blocking(move || {
            writer.join().unwrap();
            let _ = tx.send(verdict);
        });
        let mut sent = Vec::new();
        let mut result = Ok(());
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => sent.extend_from_slice(&chunk),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
        drop(stream);
        sender.await.unwrap();
        let why = gave_up.lock().unwrap().clone();
        SENT.with(|s| s.set(sent.len()));
        (result.map(|()| sent), why)
    }

    thread_local! {
        /// Bytes the last `while_written` on this thread saw before the stream ended.
        static SENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// What `restream` sends for the same archive, once it is whole.
    async fn restreamed(archive: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sources");
        fs::write(&file, archive).unwrap();
        let Ok(Scan::Stream(plan)) = scan(archive, &limits()) else {
            panic!("streamable")
        };
        let (prepared, _) = plan
            .prepare(
                &["K".to_string()],
                ArgStyle::OneInstruction,
                &BTreeMap::new(),
            )
            .unwrap();
        let mut out = Vec::new();
        let mut s = stream(file, prepared);
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn while_it_downloads_the_context_is_the_one_restream_sends() {
        // Incompressible, so the archive comes in many pieces and the stream waits for them.
        let mut seed = 1u32;
        let big: Vec<u8> = (0..300_000)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect();
        let cases: Vec<Vec<E>> = vec![
            // A top folder (GitHub's tarballs), its .dockerignore first.
            vec![
                E::Dir("repo-1/"),
                E::File("repo-1/.dockerignore", b"logs\n*.md\n!KEEP.md\n", 0o644),
                E::File("repo-1/Dockerfile", b"FROM x\nRUN y\n", 0o644),
                E::File("repo-1/big.bin", &big, 0o644),
                E::Dir("repo-1/logs/"),
                E::File("repo-1/logs/a.log", b"a", 0o644),
                E::File("repo-1/README.md", b"r", 0o644),
                E::File("repo-1/KEEP.md", b"k", 0o644),
                E::Link("repo-1/current", "big.bin"),
            ],
            // A .dockerignore after entries it does not leave out (.circleci sorts first).
            vec![
                E::Dir("repo-2/"),
                E::Dir("repo-2/.circleci/"),
                E::File("repo-2/.circleci/config.yml", b"c", 0o644),
                E::File("repo-2/.dockerignore", b"*.log\n", 0o644),
                E::File("repo-2/Dockerfile", b"FROM g\n", 0o644),
                E::File("repo-2/x.log", b"l", 0o644),
            ],
            // `tar -C dir .`: the root first, then a subfolder: not a folder to flatten.
            vec![
                E::Dir("./"),
                E::Dir("./src/"),
                E::File("./src/main.c", &big, 0o644),
                E::File("./Dockerfile", b"FROM c\n", 0o644),
            ],
            // No top folder; two Dockerfiles (the last wins).
            vec![
                E::File("Dockerfile", b"FROM old\n", 0o644),
                E::Dir("app/"),
                E::File("app/index.js", &big, 0o644),
                E::File("Dockerfile", b"FROM new\n", 0o644),
            ],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let gz = tar_gz(entries);
            // And the same archive as a plain .tar.
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(gz.as_slice())
                .read_to_end(&mut plain)
                .unwrap();
            for archive in [gz, plain] {
                let (sent, why) = while_written(&archive, false, limits()).await;
                assert_eq!(why, None, "case {i}");
                assert_eq!(
                    listing(&sent.unwrap()),
                    listing(&restreamed(&archive).await),
                    "case {i}"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_wrong_guess_or_a_refused_archive_gives_up_with_an_error() {
        let df = || E::File("Dockerfile", b"FROM x\n", 0o644);
        let cases: Vec<(Vec<E>, bool, &str)> = vec![
            (
                vec![
                    df(),
                    E::File("notes.md", b"n", 0o644),
                    E::File(".dockerignore", b"*.md\n", 0o644),
                ],
                false,
                "the .dockerignore came after notes.md, which it leaves out",
            ),
            (
                vec![
                    E::File("app/Dockerfile", b"FROM x\n", 0o644),
                    E::File("other/y", b"y", 0o644),
                ],
                false,
                "an entry is outside the first entry's folder",
            ),
            (
                vec![
                    E::File("app/Dockerfile", b"FROM x\n", 0o644),
                    E::File("app", b"a file", 0o644),
                ],
                false,
                // (Not flattened: a top-level file, not a folder, shares the name.)
                "no Dockerfile at the top",
            ),
            (
                vec![df(), E::File("a", b"a", 0o644), E::Hard("b", "a")],
                false,
                "it has hard links",
            ),
            (vec![E::File("README", b"r", 0o644)], false, "no Dockerfile"),
            (
                vec![df(), E::File("a", &[7u8; 100_000], 0o644)],
                true,
                "the download stopped",
            ),
        ];
        for (i, (entries, fail, why)) in cases.iter().enumerate() {
            let (sent, gave_up) = while_written(&tar_gz(entries), *fail, limits()).await;
            let err = sent.expect_err("the stream ends with an error");
            assert!(err.contains(why), "case {i}: {err}");
            assert!(gave_up.is_some_and(|g| g.contains(why)), "case {i}");
        }
    }

    /// An archive that inflates past the context limit stops at the limit: dockerd never
    /// gets more than the check would have allowed, even before the check says no.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_stream_keeps_the_context_limits_itself() {
        let df = E::File("Dockerfile", b"FROM x\n", 0o644);
        let small = Limits {
            max_context_bytes: 50_000,
            ..limits()
        };
        // Larger than the stream's buffers: without a limit of its own, most of it would
        // have gone out before the end.
        let big = vec![0u8; 2_000_000];
        let (sent, gave_up) =
            while_written(&tar_gz(&[df, E::File("a", &big, 0o644)]), false, small).await;
        let err = sent.expect_err("refused");
        assert!(err.contains("50000"), "{err}");
        assert!(gave_up.is_some());
        let sent = SENT.with(|s| s.get());
        assert!(sent < 50_000, "{sent} bytes went to dockerd");
        let few = Limits {
            max_archive_entries: 3,
            ..limits()
        };
        let many: Vec<E> = (0..5).map(|_| E::File("a", b"a", 0o644)).collect();
        let (sent, _) = while_written(&tar_gz(&many), false, few).await;
        assert!(sent.expect_err("refused").contains("entries"));
    }
}
