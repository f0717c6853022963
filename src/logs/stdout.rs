//! Build output on the service's stdout (`SHOW_BUILD_LOGS`). One thread of its own prints
//! every line, in order and whole, so a build of the service never waits for whoever reads
//! stdout: a reader that stalls (a pipe nobody drains) costs the lines past `QUEUE_BYTES`,
//! not the build, and a build's end waits at most `FLUSH_WAIT` for its lines. A Kubernetes
//! worker's stdout is its pod log, which the API serves while the build runs: there the
//! build waits for the reader instead, up to `WHOLE_WAIT` for room for a line (past that,
//! a reader that has stopped, the build goes on as above, so a SIGTERM or the timeout is
//! heard), and its end for every line (a SIGTERM still ends that wait).

use super::Sink;
use futures::future::BoxFuture;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

/// What may wait to be printed, across builds: a stalled reader holds no more memory than
/// this.
const QUEUE_BYTES: usize = 4 << 20;

/// Whether build output goes to stdout, and what a reader that falls behind costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdout {
    Off,
    /// The lines past `QUEUE_BYTES` (the service, SHOW_BUILD_LOGS=true).
    Lossy,
    /// The build's time: it waits (a worker pod, whose stdout is its pod log).
    Whole,
}

/// How long a `Stdout::Whole` line waits for room before the build stops waiting for the
/// reader (the build's own task waits, so its SIGTERM and timeout wait with it).
const WHOLE_WAIT: Duration = Duration::from_secs(10);

/// How long a build's end waits for its queued lines to be printed (`Stdout::Lossy`).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// A sink's lines, as the printer thread sees them.
#[derive(Default)]
struct Counts {
    /// Queued, not printed yet.
    queued: AtomicU64,
    /// Not taken by stdout (closed: EPIPE).
    failed: AtomicU64,
}

struct Line {
    bytes: Vec<u8>,
    counts: Arc<Counts>,
}

struct Printer {
    /// `None` when the thread could not be started: lines then count as not taken.
    tx: Option<mpsc::Sender<Line>>,
    queued: Arc<AtomicUsize>,
}

fn printer() -> &'static Printer {
    static PRINTER: OnceLock<Printer> = OnceLock::new();
    PRINTER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Line>();
        let queued = Arc::new(AtomicUsize::new(0));
        let printed = queued.clone();
        let started = std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                for line in rx {
                    // Not `println!`, which panics when stdout is closed (EPIPE).
                    if std::io::stdout().lock().write_all(&line.bytes).is_err() {
                        line.counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    printed.fetch_sub(line.bytes.len(), Ordering::Relaxed);
                    line.counts.queued.fetch_sub(1, Ordering::Release);
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "no thread to print build output on stdout (SHOW_BUILD_LOGS)"))
            .is_ok();
        Printer {
            tx: started.then_some(tx),
            queued,
        }
    })
}

/// Prints a build's lines on stdout, each after `prefix`.
pub struct StdoutSink {
    prefix: String,
    /// Waits for room, and at the end for every line, rather than leave lines out.
    whole: bool,
    counts: Arc<Counts>,
    /// Lines left out because the queue was full (stdout not read fast enough, or at all).
    dropped: u64,
}

impl StdoutSink {
    pub fn new(prefix: impl Into<String>, whole: bool) -> Self {
        Self {
            prefix: prefix.into(),
            whole,
            counts: Arc::default(),
            dropped: 0,
        }
    }
}

impl Sink for StdoutSink {
    fn write_line(&mut self, line: &str) {
        let printer = printer();
        let Some(tx) = &printer.tx else {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let len = self.prefix.len() + 1 + line.len() + 1;
        let mut waiting = None;
        loop {
            // A line longer than the queue goes alone.
            let before = printer.queued.fetch_add(len, Ordering::Relaxed);
            if before == 0 || before + len <= QUEUE_BYTES {
                break;
            }
            printer.queued.fetch_sub(len, Ordering::Relaxed);
            let waited_enough = waiting
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= WHOLE_WAIT;
            if waited_enough && self.whole {
                tracing::warn!(build = %self.prefix, "stdout (the pod log) took no output for {WHOLE_WAIT:?}; lines that find no room are left out of it from now on");
                self.whole = false;
            }
            if !self.whole {
                self.dropped += 1;
                return;
            }
            // As a blocking write to stdout would (the worker's lines come from one task).
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(self.prefix.as_bytes());
        bytes.push(b' ');
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.counts.queued.fetch_add(1, Ordering::Relaxed);
        let counts = self.counts.clone();
        if tx.send(Line { bytes, counts }).is_err() {
            printer.queued.fetch_sub(len, Ordering::Relaxed);
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
            // `whole` still: the reader kept up (else it is waited for no longer here either).
            while self.counts.queued.load(Ordering::Acquire) > 0
                && (self.whole || tokio::time::Instant::now() < deadline)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let failed = self.counts.failed.load(Ordering::Relaxed);
            if failed > 0 {
                tracing::warn!(
                    build = %self.prefix,
                    lines = failed,
                    "build output could not be printed on stdout (SHOW_BUILD_LOGS); is it closed?"
                );
            }
            let unprinted = self.dropped + self.counts.queued.load(Ordering::Acquire);
            if unprinted > 0 {
                tracing::warn!(
                    build = %self.prefix,
                    lines = unprinted,
                    "build output was left out of stdout or is still waiting for it (SHOW_BUILD_LOGS): it is not read fast enough; is anything reading it?"
                );
            }
        })
    }
}
