//! The controller at scale on the simulated cluster, with its kubelet in `instant` mode
//! (pods succeed at once, no containers): every build finishes, the queue holds
//! MAXIMUM_PARALLEL_BUILDS, and API requests per build stay flat (no list-polling).
//! KUBE_SCALE_BUILDS=N changes the count (`benches/kube_scale.sh` runs 100 and 1,000 and
//! prints the figures); the test itself asserts counts, never times. KUBE_SCALE_TRACE=1
//! prints where each reconcile's time went; KUBE_SCALE_KEEP_LOG=FILE keeps the controller's
//! log.

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
    // KUBE_SCALE_TRACE=1: the controller logs each reconcile's steps (it costs some CPU, so
    // the figures of a traced run are not the headline ones).
    let trace = std::env::var("KUBE_SCALE_TRACE").is_ok_and(|v| v == "1");
    let log = if trace {
        "warn,buildshuttle::reconcile_timing=debug"
    } else {
        "warn"
    };
    let identity = "shuttle-scale";
    let shuttle = cluster.serve_as(
        identity,
        Mode::Host,
        &[("MAXIMUM_PARALLEL_BUILDS", &parallel), ("RUST_LOG", log)],
    );
    let cb = Callbacks::start().await;
    cluster.sim.reset_counters();
    let builds: Vec<_> = (0..n)
        .map(|_| body("data:base64,H4sIAB4nC2sC/+3NMQrCQAAEwKt9RZ5wkph8QOxE8AfhiEQUhEv8v0caIb2CONPsss3uH+k25Mv1PoSPiUXbNEsW64xxu3v3Ze+6ug5VDF/wnOY+l8vwnw7n07GaUu7nNG4CAAAAAAAAAAAAv+IF3SyepwAoAAA=", &cb))
        .collect();
    // The machine may be shared: its load says how far the figures are the controller's.
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
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
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", shuttle.child.id())).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or("?".to_string(), |kb| format!("{:.1}", kb / 1024.0))
    };
    let rss = format!(
        "rss_peak_mib={} rss_end_mib={}",
        field("VmHWM:"),
        field("VmRSS:")
    );
    let cpu = cpu_seconds(&format!("/proc/{}/stat", shuttle.child.id()));
    let own_cpu = cpu_seconds("/proc/self/stat");
    let metrics = reqwest::get(shuttle.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    let p99 = histogram_quantile(&metrics, "buildshuttle_reconcile_duration_seconds", 0.99);
    assert!(p99.is_some(), "reconciles are measured: {metrics}");
    let (p99_le, p99_est) = p99.unwrap_or((f64::NAN, f64::NAN));
    println!(
        "KUBE_SCALE builds={n} parallel={parallel} reconcile_p99_le={p99_le:.3}s reconcile_p99~{:.0}ms requests={total} requests/build={:.1} lists={lists} watches={watches} pods_created={pods_created} seconds={:.1} controller_{rss}",
        p99_est * 1000.0,
        total as f64 / n as f64,
        elapsed.as_secs_f64()
    );
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "KUBE_SCALE cpu builds={n} controller_cpu_s={cpu:.1} test_and_simulator_cpu_s={own_cpu:.1} loadavg_before={} loadavg_after={}",
        load_before.split_whitespace().next().unwrap_or("?"),
        load_after.split_whitespace().next().unwrap_or("?"),
    );
    println!("KUBE_SCALE counters {counters:?}");
    if let Ok(path) = std::env::var("KUBE_SCALE_KEEP_LOG") {
        let _ = std::fs::write(path, cluster.serve_log(identity));
    }
    if trace {
        for line in steps_report(&cluster.serve_log(identity)) {
            println!("KUBE_SCALE steps {line}");
        }
    }
    assert_eq!(pods_created, n as u64, "one pod per build");
    // No list-polling: lists happen when watches (re)start, not per build or per second.
    assert!(lists <= 10, "list calls grow with the run: {counters:?}");
    assert!(watches <= 10, "watches restart too often: {counters:?}");
}

/// Quantile `q` of a Prometheus histogram: (the upper bound of the bucket holding it, the
/// estimate by linear interpolation within that bucket, as PromQL's histogram_quantile).
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<(f64, f64)> {
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
    let rank = q * total;
    let i = buckets.iter().position(|(_, c)| *c >= rank)?;
    let (le, count) = buckets[i];
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if le.is_infinite() {
        return Some((le, lower));
    }
    let inside = count - below;
    let est = if inside > 0.0 {
        lower + (le - lower) * (rank - below) / inside
    } else {
        le
    };
    Some((le, est))
}

/// User + system CPU seconds of the process whose `/proc/PID/stat` is `path`.
fn cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the command.
    (ticks(11) + ticks(12)) / hz
}

/// From the controller's `reconcile timing` debug lines: the exact reconcile p50/p99/max,
/// and per step how often it ran and its mean and p99, over all reconciles and over the
/// slowest 1 %.
fn steps_report(log: &str) -> Vec<String> {
    let mut totals = Vec::new();
    let mut runs: Vec<(u64, Vec<(String, u64)>)> = Vec::new();
    for line in log.lines().filter(|l| l.contains("reconcile timing")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let Some(total) = field("total_us=") else {
            continue;
        };
        let steps = line
            .split_once("steps=")
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_string(), v.parse::<u64>().ok()?))
            })
            .collect();
        totals.push(total);
        runs.push((total, steps));
    }
    if totals.is_empty() {
        return vec!["no reconcile timing lines in the controller's log".into()];
    }
    totals.sort_unstable();
    let q = |v: &[u64], q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let mut out = vec![format!(
        "reconciles={} p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        totals.len(),
        q(&totals, 0.5) as f64 / 1000.0,
        q(&totals, 0.9) as f64 / 1000.0,
        q(&totals, 0.99) as f64 / 1000.0,
        totals[totals.len() - 1] as f64 / 1000.0
    )];
    let p99 = q(&totals, 0.99);
    for (label, slow_only) in [("all", false), ("slowest_1%", true)] {
        let mut per: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
        let mut count = 0;
        for (total, steps) in &runs {
            if slow_only && *total < p99 {
                continue;
            }
            count += 1;
            for (k, v) in steps {
                per.entry(k.as_str()).or_default().push(*v);
            }
        }
        for (k, mut v) in per {
            v.sort_unstable();
            let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
            out.push(format!(
                "{label} ({count} reconciles) step={k} n={} mean_ms={:.1} p99_ms={:.1}",
                v.len(),
                mean / 1000.0,
                q(&v, 0.99) as f64 / 1000.0
            ));
        }
    }
    out
}
