//! Soak: 200 concurrent `POST /` against the real binary with MAXIMUM_PARALLEL_BUILDS=2.
//! Checks that every accepted build gets exactly one final callback and that /octhc
//! answers while the queue drains; prints figures (no timing assertions). Ignored in the
//! normal run: `bash benches/load.sh` runs it.

mod common;

use common::bin::*;
use common::*;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with benches/load.sh"]
async fn load_200_concurrent_posts() {
    require_services();
    let n: usize = std::env::var("LOAD_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let data = tempfile::tempdir().unwrap();
    let p = spawn(
        data.path(),
        free_port(),
        &[
            ("MAXIMUM_PARALLEL_BUILDS", "2"),
            ("CALLBACK_RETRY_SECONDS", "60"),
        ],
    );
    let pid = p.child.id();
    let cb = Callbacks::start().await;
    let client = reqwest::Client::new();
    let bodies: Vec<_> = (0..n)
        .map(|i| {
            let df = format!("FROM {BASE_IMAGE}\n{}\nRUN echo load-{i}\n", cache_buster());
            body(&data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())])), &cb)
        })
        .collect();
    let t0 = Instant::now();
    let posts = bodies.iter().map(|b| {
        let client = client.clone();
        let url = p.url("/");
        async move {
            let t = Instant::now();
            let r = client.post(url).json(b).send().await.expect("POST");
            assert_eq!(r.status(), 200);
            t.elapsed()
        }
    });
    let mut post_lat: Vec<Duration> = futures::future::join_all(posts).await;
    let accepted_in = t0.elapsed();
    post_lat.sort();

    let mut health_lat = Vec::new();
    let mut peak_rss = 0;
    loop {
        let t = Instant::now();
        let r = client
            .get(p.url("/octhc"))
            .send()
            .await
            .expect("octhc answers while draining");
        assert_eq!(r.status(), 200);
        health_lat.push(t.elapsed());
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
        let done = bodies
            .iter()
            .filter(|b| cb.calls_for(b["build_uuid"].as_str().unwrap()).len() >= 2)
            .count();
        if done == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1800),
            "queue did not drain: {done}/{n}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drained_in = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut succeeded = 0;
    for b in &bodies {
        let calls = cb.calls_for(b["build_uuid"].as_str().unwrap());
        let statuses: Vec<&str> = calls
            .iter()
            .map(|c| c.body["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses.len(),
            2,
            "exactly one pending and one final: {statuses:?}"
        );
        assert_eq!(statuses[0], "pending");
        if statuses[1] == "succeeded" {
            succeeded += 1;
        }
    }
    health_lat.sort();
    let hwm = rss_kib(pid, "VmHWM:");
    println!("LOAD builds={n} parallel=2");
    println!(
        "LOAD accepted_all_in={accepted_in:?} post_p50={:?} post_p99={:?} post_max={:?}",
        pct(&post_lat, 0.5),
        pct(&post_lat, 0.99),
        post_lat[n - 1]
    );
    println!(
        "LOAD drained_in={drained_in:?} builds_per_min={:.1} succeeded={succeeded}/{n}",
        n as f64 / drained_in.as_secs_f64() * 60.0
    );
    println!(
        "LOAD octhc_samples={} octhc_p50={:?} octhc_max={:?}",
        health_lat.len(),
        pct(&health_lat, 0.5),
        health_lat[health_lat.len() - 1]
    );
    println!("LOAD rss_peak_sampled_kib={peak_rss} vm_hwm_kib={hwm}");
    assert_eq!(succeeded, n);
}
