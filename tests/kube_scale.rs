//! The controller at scale on the simulated cluster, with its kubelet in `instant` mode
//! (pods succeed at once, no containers): every build finishes, the queue holds
//! MAXIMUM_PARALLEL_BUILDS, and API requests per build stay flat (no list-polling).
//! KUBE_SCALE_BUILDS=N changes the count (`benches/kube_scale.sh` runs 100 and 1,000 and
//! prints the figures); the test itself asserts counts, never times.

mod common;

use common::cluster::{Cluster, Mode};
use common::{body, Callbacks};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_builds_finish_with_constant_requests_per_build() {
    let n: usize = std::env::var("KUBE_SCALE_BUILDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let cluster = Cluster::start_with(kubesim::SimConfig {
        kubelet: kubesim::KubeletMode::Instant,
        ..Default::default()
    })
    .await;
    cluster.sim.set_instant_message(
        r#"{"result":"succeeded","image":"127.0.0.1:5000/scale/app:1.1","digest":null}"#,
    );
    let parallel = std::env::var("KUBE_SCALE_PARALLEL").unwrap_or_else(|_| "5".into());
    let shuttle = cluster.serve(
        Mode::Host,
        &[("MAXIMUM_PARALLEL_BUILDS", &parallel), ("RUST_LOG", "warn")],
    );
    let cb = Callbacks::start().await;
    cluster.sim.reset_counters();
    let builds: Vec<_> = (0..n)
        .map(|_| body("data:base64,H4sIAB4nC2sC/+3NMQrCQAAEwKt9RZ5wkph8QOxE8AfhiEQUhEv8v0caIb2CONPsss3uH+k25Mv1PoSPiUXbNEsW64xxu3v3Ze+6ug5VDF/wnOY+l8vwnw7n07GaUu7nNG4CAAAAAAAAAAAAv+IF3SyepwAoAAA=", &cb))
        .collect();
    let start = Instant::now();
    let client = reqwest::Client::new();
    for chunk in builds.chunks(20) {
        let posts = chunk
            .iter()
            .map(|b| client.post(shuttle.url("/")).json(b).send());
        for r in futures::future::join_all(posts).await {
            assert_eq!(r.expect("POST").status(), 200);
        }
    }
    let within = Duration::from_secs(60 + n as u64);
    for b in &builds {
        assert_eq!(
            cb.wait_final(b["build_uuid"].as_str().unwrap(), within)
                .await,
            "succeeded"
        );
    }
    let elapsed = start.elapsed();
    let counters = cluster.sim.counters();
    let total: u64 = counters.values().sum();
    let lists: u64 = counters
        .iter()
        .filter(|(k, _)| k.starts_with("list "))
        .map(|(_, v)| v)
        .sum();
    let watches: u64 = counters
        .iter()
        .filter(|(k, _)| k.starts_with("watch "))
        .map(|(_, v)| v)
        .sum();
    let pods_created = counters.get("create pods").copied().unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{}/status", shuttle.child.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    let metrics = reqwest::get(shuttle.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    let p99 = histogram_quantile(&metrics, "buildshuttle_reconcile_duration_seconds", 0.99);
    assert!(p99.is_some(), "reconciles are measured: {metrics}");
    println!(
        "KUBE_SCALE builds={n} parallel={parallel} reconcile_p99_le={:.4}s requests={total} requests/build={:.1} lists={lists} watches={watches} pods_created={pods_created} seconds={:.1} controller_peak_{rss}",
        p99.unwrap_or(f64::NAN),
        total as f64 / n as f64,
        elapsed.as_secs_f64()
    );
    println!("KUBE_SCALE counters {counters:?}");
    assert_eq!(pods_created, n as u64, "one pod per build");
    // No list-polling: lists happen when watches (re)start, not per build or per second.
    assert!(lists <= 10, "list calls grow with the run: {counters:?}");
    assert!(watches <= 10, "watches restart too often: {counters:?}");
}

/// The upper bound of the bucket holding quantile `q` of a Prometheus histogram.
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse::<f64>().ok()?));
    }
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}
