//! Controller restarts and two replicas against one simulated cluster: one Lease holder,
//! a take-over when it dies mid-build, no pod created twice, the build finished once.

mod common;

use common::cluster::{Cluster, Mode, NS};
use common::{body, cache_buster, data_uri, tar_gz, Callbacks, BASE_IMAGE};
use serde_json::Value;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(90);

fn slow_app(secs: u32) -> String {
    let df = format!("FROM {BASE_IMAGE}\n{}\nRUN sleep {secs}\n", cache_buster());
    data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())]))
}

async fn holder(cluster: &Cluster) -> Option<String> {
    let l = cluster
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/buildshuttle-controller"
        ))
        .await;
    l["spec"]["holderIdentity"].as_str().map(String::from)
}

async fn wait_holder(cluster: &Cluster, who: &str) {
    let start = Instant::now();
    while holder(cluster).await.as_deref() != Some(who) {
        assert!(
            start.elapsed() < WITHIN,
            "{who} never held the Lease (holder: {:?})",
            holder(cluster).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn finals(cb: &Callbacks, b: &Value) -> Vec<String> {
    cb.calls_for(b["build_uuid"].as_str().unwrap())
        .iter()
        .filter(|c| c.body["status"] != "pending")
        .map(|c| c.body["status"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_follower_takes_over_when_the_leader_dies_mid_build() {
    let cluster = Cluster::start().await;
    let lease = [("LEASE_SECONDS", "3")];
    let a = cluster.serve_as("shuttle-a", Mode::Host, &lease);
    wait_holder(&cluster, "shuttle-a").await;
    let b_proc = cluster.serve_as("shuttle-b", Mode::Host, &lease);
    let cb = Callbacks::start().await;
    let b = body(&slow_app(4), &cb);
    b_proc.post(&b).await;
    cluster
        .wait_job(&b, "Running", WITHIN, |j| j["status"]["phase"] == "Running")
        .await;
    assert_eq!(
        holder(&cluster).await.as_deref(),
        Some("shuttle-a"),
        "one leader"
    );
    drop(a); // SIGKILL: no release, the Lease must expire.
    wait_holder(&cluster, "shuttle-b").await;
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), WITHIN)
            .await,
        "succeeded"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(finals(&cb, &b).iter().all(|s| s == "succeeded"));
    let counters = cluster.sim.counters();
    assert_eq!(
        counters.get("create pods"),
        Some(&1),
        "no pod created twice: {counters:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restarted_mid_build_finishes_it() {
    let cluster = Cluster::start().await;
    let lease = [("LEASE_SECONDS", "3")];
    let first = cluster.serve_as("shuttle-a", Mode::Host, &lease);
    let cb = Callbacks::start().await;
    let b = body(&slow_app(4), &cb);
    first.post(&b).await;
    cluster
        .wait_job(&b, "Running", WITHIN, |j| j["status"]["phase"] == "Running")
        .await;
    drop(first);
    let _second = cluster.serve_as("shuttle-a", Mode::Host, &lease);
    assert_eq!(
        cb.wait_final(b["build_uuid"].as_str().unwrap(), WITHIN)
            .await,
        "succeeded"
    );
    let job = cluster
        .wait_job(&b, "Succeeded", WITHIN, |j| {
            j["status"]["phase"] == "Succeeded"
        })
        .await;
    assert_eq!(job["status"]["callbacks"]["final"], true, "{job:#}");
    let counters = cluster.sim.counters();
    assert_eq!(counters.get("create pods"), Some(&1), "{counters:?}");
}
