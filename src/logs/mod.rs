//! The build log: every line of build output goes to each sink (stored log, stdout, Kafka).
//! Writing a line never blocks on the network: sinks that talk to a network queue the line
//! and report what they could not deliver when the build finishes.

pub mod kafka;
mod later;
mod stdout;
mod stored;

pub use kafka::KafkaProducers;
pub use stdout::{Stdout, StdoutSink};
pub use stored::{LogFiles, StoredLog};

use crate::build::BuildSpec;
use crate::secret::redact;
use crate::storage::Storage;
use futures::future::BoxFuture;
use std::sync::Arc;

/// Opens a build's log with every configured sink.
#[derive(Clone)]
pub struct LogSinks {
    pub files: LogFiles,
    pub storage: Arc<dyn Storage>,
    /// Build output on stdout (SHOW_BUILD_LOGS), and whether a build waits for its reader.
    pub stdout: Stdout,
    /// What the stored log keeps whole (MAX_LOG_BYTES; see `StoredLog`).
    pub max_log_bytes: u64,
    /// Producers for builds that name `kafka_hosts`; `None`: Kafka output is off.
    pub kafka: Option<Arc<KafkaProducers>>,
}

impl LogSinks {
    pub fn open(&self, spec: &BuildSpec) -> std::io::Result<BuildLog> {
        let secrets = spec.secrets().into_iter().map(str::to_string).collect();
        let mut log = BuildLog::new(secrets).with_sink(Box::new(StoredLog::create(
            &self.files,
            &spec.log_key(),
            self.storage.clone(),
            self.max_log_bytes,
        )?));
        if self.stdout != Stdout::Off {
            log = log.with_sink(Box::new(StdoutSink::new(
                format!("[{}-{}]", spec.app, spec.build_number),
                self.stdout == Stdout::Whole,
            )));
        }
        if let Some(sink) = self.kafka_sink(spec) {
            log = log.with_sink(sink);
        }
        Ok(log)
    }

    /// A log that goes to Kafka only, for the last line of a build that ends without running
    /// (stopped while queued, interrupted by a restart): the log consumers still get the
    /// reason and `Build finished`. `None` when the build names no brokers.
    pub fn kafka_only(&self, spec: &BuildSpec) -> Option<BuildLog> {
        let secrets = spec.secrets().into_iter().map(str::to_string).collect();
        Some(BuildLog::new(secrets).with_sink(self.kafka_sink(spec)?))
    }

    fn kafka_sink(&self, spec: &BuildSpec) -> Option<Box<dyn Sink>> {
        let hosts = spec
            .kafka_hosts
            .as_deref()
            .filter(|h| !h.trim().is_empty())?;
        // No Kafka is never a reason to fail a build: warn and build anyway.
        match self.kafka.as_ref()?.sink(spec, hosts) {
            Ok(sink) => Some(Box::new(sink)),
            Err(e) => {
                tracing::warn!(build = %spec.build_uuid, error = %e, "build log will not go to Kafka");
                None
            }
        }
    }
}

/// One destination for log lines.
pub trait Sink: Send {
    fn write_line(&mut self, line: &str);
    /// Called once at the end; flushes and reports problems through `tracing`.
    fn finish(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// A build's log, fanned out to its sinks. Lines are redacted of the build's secrets and
/// split on newlines, so each sink sees one line per call.
pub struct BuildLog {
    sinks: Vec<Box<dyn Sink>>,
    secrets: Vec<String>,
}

/// The last line of every build log, as the Akkeris log consumers expect.
pub const FINISHED_LINE: &str = "Build finished";

impl BuildLog {
    pub fn new(secrets: Vec<String>) -> Self {
        Self {
            sinks: Vec::new(),
            secrets,
        }
    }

    /// Also redacts `more` (credentials of the service's own configuration, such as
    /// EXTRA_DOCKER_REGISTRY_CONFIG's passwords, that a daemon's message might echo).
    pub fn redact_also<'a>(&mut self, more: impl IntoIterator<Item = &'a str>) {
        for s in more {
            if !self.secrets.iter().any(|k| k == s) {
                self.secrets.push(s.to_string());
            }
        }
    }

    /// What this log redacts, for text that goes elsewhere (an outcome's message).
    pub fn redact(&self, text: &str) -> String {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        redact(text, &secrets)
    }

    pub fn with_sink(mut self, sink: Box<dyn Sink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Writes `text`, one line per sink call; `\r` progress rewrites become separate lines.
    pub fn line(&mut self, text: &str) {
        let text = self.redact(text);
        for line in text.split(['\n', '\r']).filter(|l| !l.trim().is_empty()) {
            for sink in &mut self.sinks {
                sink.write_line(line);
            }
        }
    }

    /// Writes `Build finished` now (readers of the stored log see it at once) and returns
    /// the sinks' flushing (upload, Kafka delivery), which may run beside other work.
    pub fn finish(mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.line(FINISHED_LINE);
        self.close()
    }

    /// Ends the sinks' writing without `Build finished`, for a log whose build may still
    /// go on elsewhere (a worker pod stopped mid-build: the controller decides whether the
    /// build runs again or ends, and whoever ends it writes the end). Returns the flushing,
    /// as `finish` does.
    pub fn close(self) -> impl std::future::Future<Output = ()> + Send + 'static {
        // Each sink ends its writing now (the stored log's kept tail is in its file when this
        // returns); what takes time (uploads, Kafka delivery) runs when awaited.
        let finishing: Vec<_> = self.sinks.into_iter().map(|s| s.finish()).collect();
        async move {
            for f in finishing {
                f.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Capture(Arc<Mutex<Vec<String>>>);
    impl Sink for Capture {
        fn write_line(&mut self, line: &str) {
            self.0.lock().unwrap().push(line.to_string());
        }
        fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn lines_are_split_redacted_and_end_with_finished() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut log =
            BuildLog::new(vec!["s3cret".into()]).with_sink(Box::new(Capture(got.clone())));
        log.line("Step 1/2 : FROM x\n\nlogin s3cret ok\r\n");
        log.finish().await;
        assert_eq!(
            *got.lock().unwrap(),
            vec!["Step 1/2 : FROM x", "login *** ok", FINISHED_LINE]
        );
        let mut log = BuildLog::new(vec!["s3cret".into()]);
        log.redact_also(["xtra-pw", "s3cret"]);
        assert_eq!(log.redact("s3cret xtra-pw"), "*** ***");
        assert_eq!(log.secrets.len(), 2);
    }
}
