//! Prometheus metrics for both modes, served at `GET /metrics` (OpenMetrics text):
//! builds by result and reason, build duration, queue length, running builds, callback
//! failures, and per-stage build timings (`stage` label: queued, fetch, store, context,
//! cache, build, push, total, callback_pending, callback_final). Labels never carry app names or anything from a request but the reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `succeeded` or `failed`.
    pub result: String,
    /// The failure reason (`BuildFailed`, `Timeout`, …); empty on success.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// Upper bounds (seconds) of `reconcile_duration_seconds`.
pub const RECONCILE_BUCKETS: [f64; 19] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.09, 0.1, 0.125, 0.15, 0.25,
    0.5, 1.0, 2.5, 10.0,
];

pub struct Metrics {
    registry: Registry,
    builds: Family<ResultLabels, Counter>,
    duration: Histogram,
    stages: Family<StageLabels, Histogram, fn() -> Histogram>,
    reconcile: Histogram,
    pub queued: Gauge,
    pub running: Gauge,
    pub callback_failures: Counter,
    pub refused_queue_full: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("buildshuttle");
        let builds = Family::<ResultLabels, Counter>::default();
        // 1 s … ~4.5 h in 14 doubling buckets.
        let duration = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        // 1 ms … ~9 min in 20 doubling buckets: stages range from a rename to a long build.
        let stages =
            Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 20))
            });
        // One reconcile is a few API calls: fine buckets up to 100 ms (the goal's scale, so
        // a p99 below it can be shown), coarser ones up to 10 s.
        let reconcile = Histogram::new(RECONCILE_BUCKETS.iter().copied());
        let queued = Gauge::default();
        let running = Gauge::default();
        let callback_failures = Counter::default();
        let refused_queue_full = Counter::default();
        registry.register(
            "builds",
            "Builds finished, by result and failure reason",
            builds.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Time from a build's start to its end",
            duration.clone(),
        );
        registry.register(
            "build_stage_duration_seconds",
            "Time each stage of a build took (stages may overlap)",
            stages.clone(),
        );
        registry.register(
            "queued_builds",
            "Builds accepted and waiting for a slot",
            queued.clone(),
        );
        registry.register("running_builds", "Builds running now", running.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time one BuildJob reconcile took (Kubernetes mode, the leading controller)",
            reconcile.clone(),
        );
        registry.register(
            "callback_failures",
            "Status callbacks given up after all retries",
            callback_failures.clone(),
        );
        registry.register(
            "builds_refused_queue_full",
            "POST / answered 503 because MAX_QUEUED_BUILDS builds were queued",
            refused_queue_full.clone(),
        );
        Self {
            registry,
            builds,
            duration,
            stages,
            reconcile,
            queued,
            running,
            callback_failures,
            refused_queue_full,
        }
    }

    /// Records a finished build; `seconds` is `None` for builds that never started.
    pub fn build_finished(&self, outcome: &crate::build::Outcome, seconds: Option<f64>) {
        let reason = match outcome {
            crate::build::Outcome::Succeeded { .. } => String::new(),
            crate::build::Outcome::Failed { reason, .. } => reason.as_str().to_string(),
        };
        self.builds
            .get_or_create(&ResultLabels {
                result: outcome.callback_status().to_string(),
                reason,
            })
            .inc();
        if let Some(s) = seconds {
            self.duration.observe(s);
        }
    }

    /// Observes every stage `timings` holds, except those in `skip` (already observed).
    pub fn observe_stages(&self, timings: &crate::build::StageTimings, skip: &[&str]) {
        for (stage, ms) in timings.stages() {
            if skip.contains(&stage) {
                continue;
            }
            self.stages
                .get_or_create(&StageLabels {
                    stage: stage.to_string(),
                })
                .observe(ms as f64 / 1000.0);
        }
    }

    /// One stage's duration, by name (the worker's stages in Kubernetes mode).
    pub fn observe_stage(&self, stage: &str, ms: u64) {
        self.stages
            .get_or_create(&StageLabels {
                stage: stage.to_string(),
            })
            .observe(ms as f64 / 1000.0);
    }

    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile.observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{FailureReason, Outcome};

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.build_finished(&Outcome::failed(FailureReason::Timeout, "x"), Some(3.0));
        m.build_finished(
            &Outcome::Succeeded {
                image: "i".into(),
                digest: None,
            },
            Some(1.0),
        );
        m.observe_stages(
            &crate::build::StageTimings {
                fetch: Some(12),
                build: Some(900),
                ..Default::default()
            },
            &[],
        );
        m.queued.set(2);
        m.callback_failures.inc();
        let text = m.render();
        assert!(
            text.contains(r#"buildshuttle_builds_total{result="failed",reason="Timeout"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"buildshuttle_builds_total{result="succeeded",reason=""} 1"#),
            "{text}"
        );
        assert!(
            text.contains("buildshuttle_build_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("buildshuttle_queued_builds 2"), "{text}");
        assert!(
            text.contains(r#"buildshuttle_build_stage_duration_seconds_count{stage="fetch"} 1"#),
            "{text}"
        );
        assert!(text.contains("buildshuttle_running_builds 0"), "{text}");
        assert!(
            text.contains("buildshuttle_callback_failures_total 1"),
            "{text}"
        );
    }
}
