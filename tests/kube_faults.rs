//! Kubernetes mode under what a real cluster does to a build: the remaining legacy routes
//! (stop, stop-all, queue order, timeout, docker://), a controller killed mid-build, two
//! replicas and the Lease, a hung Lease renewal, and pod faults (eviction, drain, delete,
//! OOM, a lost node, unschedulable, a missing image, admission refusal, a stale pod of the
//! same name, a deleted BuildJob, a slow callback receiver, a build number used again, a
//! stale credentials Secret, a SIGTERM mid-callback, a finished BuildJob deleted with no
//! controller left, the log of a build no worker ended, a worker's log S3 refused). Each runs the real binary against the simulated cluster and checks
//! the BuildJob's phase and reason and that controller-api hears exactly one `pending`
//! and one final callback. Each scenario also
//! runs, ignored, on the cluster KUBECONFIG names (`real_cluster::…`, `Cluster::external`),
//! with what needs a simulator knob left out there (it says so).

mod common;

use common::bin::Proc;
use common::cluster::{Cluster, KubesimProcess, Mode, NS};
use common::{cache_buster, data_uri, tar_gz, Callbacks};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

scenarios!(
    stop_one_stop_all_and_the_queue_runs_oldest_first,
    a_build_past_its_timeout_fails_and_a_docker_source_is_retagged,
    a_controller_killed_mid_build_is_replaced_without_repeating_a_callback,
    two_replicas_one_leader_and_a_takeover_creates_no_pod_twice,
    evicted_drained_or_deleted_pods_are_recreated_and_the_build_succeeds,
    oom_a_lost_node_and_an_unschedulable_pod_end_with_their_reason,
    a_pod_that_cannot_start_or_is_refused_fails_fast_with_the_reason,
    a_deleted_buildjob_still_sends_its_final_callback,
    a_stale_pod_of_the_same_name_is_not_adopted,
    a_pod_left_terminating_on_a_lost_node_does_not_hold_up_the_next_buildjob_of_its_name,
    a_slow_callback_receiver_holds_up_nothing_but_its_callback,
    buildjob_status_records_where_the_time_went,
    two_installations_in_one_namespace_reconcile_only_their_own_buildjobs,
    each_log_follower_holds_one_streaming_pod_log_request,
    a_finished_buildjob_lets_go_of_its_finalizer_so_an_uninstall_never_hangs,
    a_credentials_secret_an_earlier_buildjob_left_is_replaced_not_used,
    a_build_number_used_again_by_a_new_build_replaces_the_earlier_buildjob,
    a_callback_on_the_wire_at_sigterm_is_delivered_once_not_cut_and_resent,
    builds_ended_without_a_worker_end_their_log_once_in_storage_and_on_kafka;
    skipped on a real cluster:
    a_leader_whose_renewal_hangs_steps_down_before_its_lease_can_expire =>
        "needs the simulator to hang Lease renewals (no API call makes a real server do that)",
    controller_calls_that_never_get_an_answer_are_given_up_and_tried_again =>
        "needs the simulator to leave a call unanswered (no API call makes a real server do that)",
    a_watchers_list_that_never_gets_an_answer_is_given_up_and_tried_again =>
        "needs the simulator to leave a call unanswered (no API call makes a real server do that)",
    a_missing_crd_fails_the_health_check =>
        "needs a cluster without the CRD (deleting it would break every other namespace)",
    a_stale_crd_holds_builds_until_the_current_one_is_applied =>
        "installs an older CRD (every other namespace's builds would lose fields meanwhile)",
);

/// The real-cluster path proven without a real cluster (as in kube_e2e): the kubesim binary
/// as a process, the BUILDSHUTTLE_E2E_* environment, six `real_cluster::` fault scenarios
/// done with the API alone (stop and the queue, a killed controller, Eviction API and pod
/// deletion, two replicas and a leader killed, a deleted BuildJob, a stale pod). (Pod
/// Security by namespace label and an unmet nodeSelector need a real cluster's admission and
/// scheduler, which kubesim does not model.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_fault_scenarios_pass_against_the_kubesim_binary() {
    let sim = tokio::task::spawn_blocking(|| {
        let sim = KubesimProcess::start();
        sim.run_ignored(&[
            "real_cluster::stop_one_stop_all_and_the_queue_runs_oldest_first",
            "real_cluster::a_controller_killed_mid_build_is_replaced_without_repeating_a_callback",
            "real_cluster::evicted_drained_or_deleted_pods_are_recreated_and_the_build_succeeds",
            "real_cluster::two_replicas_one_leader_and_a_takeover_creates_no_pod_twice",
            "real_cluster::a_deleted_buildjob_still_sends_its_final_callback",
            "real_cluster::a_stale_pod_of_the_same_name_is_not_adopted",
        ]);
        sim
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    sim.assert_namespaces_deleted().await;
}

const BUILD: Duration = Duration::from_secs(120);

fn app(cluster: &Cluster, secs: u32) -> Vec<u8> {
    let df = format!(
        "FROM {}\n{}\nRUN echo step-$(echo start) && sleep {secs} && echo step-$(echo end)\n",
        cluster.base_image(),
        cache_buster()
    );
    tar_gz(&[("Dockerfile", df.as_bytes())])
}

fn uuid_of(b: &Value) -> &str {
    b["build_uuid"].as_str().unwrap_or("")
}

fn reason(job: &Value) -> String {
    job["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Succeeded"))
        .and_then(|c| c["reason"].as_str())
        .unwrap_or("")
        .to_string()
}

fn message(job: &Value) -> String {
    job["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Succeeded"))
        .and_then(|c| c["message"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Waits for the final callback, then a little more, and checks there was exactly one
/// `pending` (first) and one final callback with `fin`.
async fn exactly_once(cb: &Callbacks, b: &Value, fin: &str) {
    assert_eq!(
        cb.wait_final(uuid_of(b), BUILD).await,
        fin,
        "final callback"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let statuses: Vec<String> = cb
        .calls_for(uuid_of(b))
        .iter()
        .map(|c| c.body["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(statuses, ["pending", fin], "callbacks of {}", uuid_of(b));
}

async fn finished(cluster: &Cluster, b: &Value) -> Value {
    cluster
        .wait_job(b, "finished", BUILD, |j| {
            matches!(j["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
        })
        .await
}

async fn running_pod(cluster: &Cluster, b: &Value) -> String {
    let j = cluster
        .wait_job(b, "Running", BUILD, |j| j["status"]["phase"] == "Running")
        .await;
    j["status"]["podName"].as_str().unwrap_or("").to_string()
}

fn pods_api(cluster: &Cluster) -> Api<Pod> {
    cluster.pods_api()
}

async fn delete(proc: &Proc, path: &str) -> u16 {
    reqwest::Client::new()
        .delete(proc.url(path))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn key(b: &Value) -> String {
    format!(
        "{}-{}",
        b["app"].as_str().unwrap_or(""),
        b["app_uuid"].as_str().unwrap_or("")
    )
}

/// Another build of the same app.
fn next_build(b: &Value, n: u64, sources: &str) -> Value {
    let mut x = b.clone();
    let id = uuid::Uuid::new_v4().to_string();
    let cb = b["callback"]
        .as_str()
        .unwrap_or("")
        .replace(uuid_of(b), &id);
    x["build_uuid"] = json!(id);
    x["build_number"] = json!(n);
    x["sources"] = json!(sources);
    x["callback"] = json!(cb);
    x
}

/// Waits until the pod (and the BuildJob, when given) no longer exist.
async fn wait_gone(
    cluster: &Cluster,
    pod: &str,
    job: Option<(&Api<kube::api::DynamicObject>, &str)>,
) {
    let start = Instant::now();
    loop {
        let pod_there = pods_api(cluster)
            .get_opt(pod)
            .await
            .ok()
            .flatten()
            .is_some();
        let job_there = match job {
            Some((jobs, name)) => jobs.get_opt(name).await.ok().flatten().is_some(),
            None => false,
        };
        if !pod_there && !job_there {
            return;
        }
        assert!(
            start.elapsed() < BUILD,
            "{pod} (or its BuildJob) never went"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `message` of every Kafka message of build `b` on `topic`, in order, read from the
/// start until the topic has been quiet for 3 s after a `Build finished` (at most 90 s).
/// Call it once the build's log is complete: it then sees every line and any extra end.
async fn kafka_lines(bootstrap: &str, topic: &str, b: &Value) -> Vec<String> {
    let key = format!("{}-{}", key(b), b["build_number"].as_u64().unwrap_or(1));
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    let (quiet, within) = (Duration::from_secs(3), Duration::from_secs(90));
    let got = tokio::task::spawn_blocking(move || {
        common::kafka::consume_until_quiet(bootstrap, topic, key, quiet, within)
    })
    .await
    .expect("consumer thread");
    got.iter()
        .map(|(_, v)| {
            let v: Value = serde_json::from_str(v).expect("a JSON message");
            v["message"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

/// Kafka's lines of `b` end with `failed` and `Build finished`, which comes once.
fn ends_once_with(lines: &[String], failed: &str, what: &str) {
    assert_eq!(
        lines.iter().filter(|l| *l == "Build finished").count(),
        1,
        "{what}: one `Build finished`: {lines:#?}"
    );
    assert!(
        lines.ends_with(&[failed.to_string(), "Build finished".to_string()]),
        "{what}: ends with {failed:?} and `Build finished`: {lines:#?}"
    );
}

/// Checks the end the controller writes for `b`, which no worker ended: its stored log
/// (through `GET …/logs`) and its Kafka lines each end with `failed` and one `Build
/// finished`, and its status records it. Returns (stored log, Kafka lines).
async fn controller_ended(
    cluster: &Cluster,
    shuttle: &Proc,
    kafka: &str,
    topic: &str,
    b: &Value,
    failed: &str,
) -> (String, Vec<String>) {
    let start = Instant::now();
    let log = loop {
        let log = shuttle.log(b).await;
        if log.contains("Build finished") {
            break log;
        }
        assert!(
            start.elapsed() < BUILD,
            "the stored log never got `Build finished`: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        log.matches("Build finished").count(),
        1,
        "one `Build finished` in the stored log: {log}"
    );
    assert!(
        log.ends_with(&format!("{failed}\nBuild finished\n")),
        "the stored log ends with {failed:?}: {log}"
    );
    let lines = kafka_lines(kafka, topic, b).await;
    ends_once_with(&lines, failed, uuid_of(b));
    // Recorded, so no later reconcile (or leader) writes it again.
    cluster
        .wait_job(b, "logEnded", BUILD, |j| j["status"]["logEnded"] == true)
        .await;
    (log, lines)
}

/// `kubectl drain`'s way: a policy/v1 Eviction of the pod.
async fn evict(cluster: &Cluster, pod: &str) {
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": pod, "namespace": cluster.ns()}});
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{}/pods/{pod}/eviction",
        cluster.ns()
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&eviction).unwrap_or_default())
    .expect("request");
    cluster
        .client
        .request::<Value>(req)
        .await
        .expect("eviction accepted");
}

/// Sets the namespace's enforced Pod Security level (a real cluster's admission applies it).
async fn pod_security(cluster: &Cluster, level: &str) {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    namespaces
        .patch(
            cluster.ns(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}}),
            ),
        )
        .await
        .expect("namespace labelled");
}

/// A real cluster's scheduler finds no node for a worker pod whose nodeSelector matches
/// none: Unschedulable with the scheduler's message, failed after the pending limit.
async fn unschedulable_by_node_selector(cluster: &Cluster) {
    let shuttle = cluster.serve(
        Mode::Host,
        &[
            ("POD_PENDING_LIMIT_SECONDS", "10"),
            ("MAX_POD_RETRIES", "0"),
            (
                "WORKER_POD_OVERRIDES",
                r#"{"nodeSelector": {"buildshuttle.akkeris.io/e2e-no-such-node": "true"}}"#,
            ),
        ],
    );
    let cb = Callbacks::start().await;
    a_build_fails_as_unschedulable(cluster, &shuttle, &cb).await;
}

/// A build posted now (no node will take its pod): Unschedulable with the scheduler's
/// message, then failed with one final callback.
async fn a_build_fails_as_unschedulable(cluster: &Cluster, shuttle: &Proc, cb: &Callbacks) {
    let nowhere = cluster.body(&data_uri(&app(cluster, 0)), cb);
    shuttle.post(&nowhere).await;
    let j = cluster
        .wait_job(&nowhere, "Unschedulable", BUILD, |j| {
            reason(j) == "Unschedulable"
        })
        .await;
    assert!(!message(&j).is_empty(), "the scheduler's message: {j:#}");
    exactly_once(cb, &nowhere, "failed").await;
    let j = finished(cluster, &nowhere).await;
    assert_eq!(reason(&j), "Unschedulable");
}

/// Who holds the controller Lease now.
async fn holder(cluster: &Cluster) -> String {
    cluster
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases/buildshuttle-controller",
            cluster.ns()
        ))
        .await["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_renewal_hangs_steps_down_before_its_lease_can_expire() {
    let cluster = Cluster::start().await;
    let shuttle = cluster.serve_as("hung", Mode::Host, &[("LEASE_SECONDS", "6")]);
    let cb = Callbacks::start().await;
    let warm = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    shuttle.post(&warm).await;
    exactly_once(&cb, &warm, "succeeded").await;
    assert_eq!(holder(&cluster).await, "hung");
    // Renewals hang; the leader must stop acting within its renew deadline (4 s of 6).
    cluster
        .sim
        .black_hole(kubesim::Matcher::new("update", "leases"));
    let hung_at = Instant::now();
    let start = Instant::now();
    while !cluster
        .serve_log("hung")
        .contains("lost the controller Lease")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never stepped down: {}",
            cluster.serve_log("hung")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stepped_down = hung_at.elapsed();
    assert!(
        stepped_down < Duration::from_secs(6),
        "stepped down after {stepped_down:?}, not before the 6 s lease could expire"
    );
    cluster.sim.clear_black_holes();
    // It leads again once it can renew, and builds go on.
    let after = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    shuttle.post(&after).await;
    exactly_once(&cb, &after, "succeeded").await;
}

/// A call whose connection died silently (an API server replaced behind a load balancer
/// that drops the flow) gets no answer, ever: kube's client has no read timeout of its own.
/// The reconcile waiting on it held its BuildJob for good: no pod, no status, no final
/// callback. Now the call fails after API_CALL_TIMEOUT (30 s) and the reconcile is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_calls_that_never_get_an_answer_are_given_up_and_tried_again() {
    let cluster = Cluster::start().await;
    let shuttle = cluster.serve_as("swallowed", Mode::Host, &[]);
    let cb = Callbacks::start().await;
    let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    // The worker pod's creation, and the status write that records the build's end.
    cluster
        .sim
        .swallow_once(kubesim::Matcher::new("create", "pods"));
    let started = Instant::now();
    shuttle.post(&b).await;
    running_pod(&cluster, &b).await;
    let pod_after = started.elapsed();
    cluster.sim.swallow_once(
        kubesim::Matcher::new("patch", "buildjobs")
            .name(&common::cluster::job_name(&b))
            .subresource("status"),
    );
    exactly_once(&cb, &b, "succeeded").await;
    assert!(
        pod_after >= Duration::from_secs(25),
        "the first pod creation was not the one swallowed ({pod_after:?})"
    );
    let log = cluster.serve_log("swallowed");
    assert!(log.contains("reconcile failed"), "{log}");
    cluster.sim.clear_black_holes();
}

/// The same for the BuildJob watcher's first LIST, which goes through the stream client
/// (watches are quiet for minutes by design): it fails after STREAM_READ_TIMEOUT (300 s)
/// and the watcher lists again, instead of the controller never seeing a BuildJob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watchers_list_that_never_gets_an_answer_is_given_up_and_tried_again() {
    let cluster = Cluster::start().await;
    cluster
        .sim
        .swallow_once(kubesim::Matcher::new("list", "buildjobs"));
    let shuttle = cluster.serve_as("unlisted", Mode::Host, &[]);
    let cb = Callbacks::start().await;
    let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    let started = Instant::now();
    shuttle.post(&b).await;
    assert_eq!(
        cb.wait_final(uuid_of(&b), Duration::from_secs(300) + BUILD)
            .await,
        "succeeded",
        "{}",
        cluster.serve_log("unlisted")
    );
    assert!(
        started.elapsed() >= Duration::from_secs(290),
        "the first LIST was not the one swallowed ({:?})",
        started.elapsed()
    );
    cluster.sim.clear_black_holes();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_crd_fails_the_health_check() {
    common::require_services();
    common::cluster::crypto();
    let sim = kubesim::Sim::start(kubesim::SimConfig {
        namespaces: vec!["default".into(), NS.into()],
        ..Default::default()
    })
    .await
    .expect("sim");
    let port = common::bin::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = sim.kubeconfig_path().display().to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("USE_KUBERNETES", "true"),
        ("KUBECONFIG", &kc),
        ("KUBERNETES_NAMESPACE", NS),
        ("WORKER_DOCKER_MODE", "host"),
    ];
    env.extend_from_slice(common::cluster::S3);
    let shuttle = common::bin::spawn(dir.path(), port, &env);
    wait_octhc(
        &shuttle,
        503,
        Duration::from_secs(30),
        "failed without the CRD",
    )
    .await;
    // Installing the CRD heals it.
    let client = common::cluster::client_for(sim.kubeconfig_path()).await;
    common::cluster::apply_crd(&client).await;
    wait_octhc(
        &shuttle,
        200,
        Duration::from_secs(60),
        "recovered once the CRD was installed",
    )
    .await;
}

/// `crds/buildjob.yaml` without the properties at `paths` (dotted, below the schema root):
/// the CRD of an earlier version.
fn older_crd(paths: &[&str]) -> Value {
    let mut crd: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/buildjob.yaml"))
            .expect("crds/buildjob.yaml"),
    )
    .expect("CRD YAML");
    let root = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for p in paths {
        let mut parts: Vec<&str> = p.split('.').collect();
        let last = parts.pop().expect("a path");
        let mut at = &mut *root;
        for part in parts {
            at = &mut at["properties"][part];
        }
        assert!(
            at["properties"]
                .as_object_mut()
                .and_then(|m| m.remove(last))
                .is_some(),
            "{p} is in the CRD"
        );
    }
    crd
}

/// Helm never upgrades `crds/`: a CRD older than the binary (here without `status.logEnded`
/// and `spec.cancelled`) would have the API server drop what the binary writes there. The
/// service says so and waits: `/octhc` 503 and `POST /` 503 naming the fields and the fix, no
/// BuildJob written, no Lease taken (the controller waits); once the current CRD is applied
/// it goes on within a check interval, without a restart, and a build runs to its end with
/// `status.logEnded` kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_crd_holds_builds_until_the_current_one_is_applied() {
    let cluster = Cluster::start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    crds.patch(
        "buildjobs.buildshuttle.akkeris.io",
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(&older_crd(&["status.logEnded", "spec.cancelled"])),
    )
    .await
    .expect("the older CRD applied");
    let shuttle = cluster.serve_as("stale", Mode::Host, &[]);
    let cb = Callbacks::start().await;
    let fix = "kubectl apply --server-side -f crds/buildjob.yaml";

    // Unready, saying why.
    let start = Instant::now();
    let health = loop {
        let r = reqwest::get(shuttle.url("/octhc")).await.expect("/octhc");
        let code = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        if code == 503 && text.contains("status.logEnded") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "/octhc never failed naming the stale CRD's fields (last {code} {text}): {}",
            cluster.serve_log("stale")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(health.starts_with("overall_status=bad\n"), "{health}");
    for needle in ["status.logEnded", "spec.cancelled", fix] {
        assert!(health.contains(needle), "{needle} in {health}");
    }
    // Builds are refused with the same message; nothing is written.
    let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    let r = reqwest::Client::new()
        .post(shuttle.url("/"))
        .json(&b)
        .send()
        .await
        .expect("POST /");
    assert_eq!(r.status(), 503);
    let refused: Value = r.json().await.expect("a JSON body");
    let said = refused["status"].as_str().unwrap_or("");
    assert!(
        said.starts_with("Service Unavailable - ")
            && said.contains("spec.cancelled")
            && said.contains(fix),
        "{refused}"
    );
    let jobs: Api<kube::api::DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        cluster.ns(),
        &common::cluster::buildjob_resource(),
    );
    let listed = jobs
        .list(&Default::default())
        .await
        .expect("list BuildJobs");
    assert!(listed.items.is_empty(), "no BuildJob written");
    // The controller neither leads nor reconciles.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), cluster.ns());
    assert!(
        leases
            .get_opt("buildshuttle-controller")
            .await
            .expect("read the Lease")
            .is_none(),
        "the controller took the Lease on a stale CRD"
    );

    // The operator applies this version's CRD: ready again within a check interval.
    common::cluster::apply_crd(&cluster.client).await;
    wait_octhc(
        &shuttle,
        200,
        Duration::from_secs(35),
        "recovered once the current CRD was applied",
    )
    .await;
    shuttle.post(&b).await;
    exactly_once(&cb, &b, "succeeded").await;
    let j = finished(&cluster, &b).await;
    assert_eq!(j["status"]["logEnded"], true, "kept now: {j:#}");
    assert_eq!(j["spec"]["cancelled"], false, "kept now: {j:#}");
}

/// A followed log whose pod log stream is cut while the build runs (an API server or
/// kubelet restart, a proxy's idle timeout) is re-opened at once: lines printed after the cut
/// reach the reader while the build still runs, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_whose_pod_log_stream_is_cut_picks_it_up_again_while_the_build_runs() {
    use futures::StreamExt;
    let cluster = Cluster::start().await;
    let shuttle = cluster.serve(Mode::Host, &[]);
    let cb = Callbacks::start().await;
    let df = format!(
        "FROM {}\n{}\nRUN for i in 1 2 3 4 5 6 7 8; do echo tick-$i; sleep 1; done\n",
        cluster.base_image(),
        cache_buster()
    );
    let b = cluster.body(&data_uri(&tar_gz(&[("Dockerfile", df.as_bytes())])), &cb);
    shuttle.post(&b).await;
    running_pod(&cluster, &b).await;
    let path = format!(
        "/{}/{}/logs?follow=true",
        key(&b),
        b["build_number"].as_u64().unwrap_or(1)
    );
    let mut body = reqwest::get(shuttle.url(&path))
        .await
        .expect("follow")
        .bytes_stream();
    let mut text = String::new();
    let mut read_until = async |line: &str| {
        while !text.contains(line) {
            match tokio::time::timeout(BUILD, body.next()).await {
                Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
                other => panic!("the follow ended before {line:?} ({other:?}): {text}"),
            }
        }
        text.clone()
    };
    read_until("tick-2\n").await;
    cluster.sim.cut_log_streams();
    read_until("tick-6\n").await;
    let job = cluster.job(&b).await;
    assert_eq!(
        job["status"]["phase"], "Running",
        "tick-6 came from the re-opened pod log, not from the stored log at the end"
    );
    let text = read_until("Build finished").await;
    for i in 1..=8 {
        assert_eq!(
            text.matches(&format!("tick-{i}\n")).count(),
            1,
            "tick-{i} once: {text}"
        );
    }
    exactly_once(&cb, &b, "succeeded").await;
}

/// What a future gave, and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// An API server (or a load balancer in front of it) that takes a call and never answers:
/// `POST /`, a stop and a log request are refused (503) within the facade's bound on each
/// call (30 s), never held for ever, and a follower whose pod log cannot be opened still
/// gets the whole log and its end once the build has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_whose_api_calls_get_no_answer_are_refused_in_time_not_held() {
    let cluster = Cluster::start().await;
    let shuttle = cluster.serve_as("unanswered", Mode::Host, &[]);
    let cb = Callbacks::start().await;
    let b = cluster.body(&data_uri(&app(&cluster, 8)), &cb);
    shuttle.post(&b).await;
    running_pod(&cluster, &b).await;
    let name = common::cluster::job_name(&b);
    for m in [
        kubesim::Matcher::new("create", "buildjobs"),
        kubesim::Matcher::new("patch", "buildjobs").name(&name),
        kubesim::Matcher::new("get", "pods").subresource("log"),
    ] {
        cluster.sim.black_hole(m);
    }
    let status =
        |r: reqwest::Result<reqwest::Response>| r.map(|r| r.status().as_u16()).unwrap_or(0);
    let other = next_build(&b, 2, &data_uri(&app(&cluster, 0)));
    let http = reqwest::Client::new();
    let post = async { status(http.post(shuttle.url("/")).json(&other).send().await) };
    let path = common::build_path(&b);
    let stop = delete(&shuttle, &path);
    let logs = common::logs_path(&b);
    let log = async { status(reqwest::get(shuttle.url(&logs)).await) };
    let follow = async {
        let r = reqwest::get(shuttle.url(&format!("{logs}?follow=true")))
            .await
            .expect("follow");
        r.text().await.unwrap_or_default()
    };
    let all = async { tokio::join!(timed(post), timed(stop), timed(log), timed(follow)) };
    let ((post, post_took), (stop, stop_took), (log, log_took), (followed, follow_took)) =
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "a request was still held after 120 s: {}",
                    cluster.serve_log("unanswered")
                )
            });
    let bound = Duration::from_secs(45);
    for (what, code, took) in [
        ("POST /", post, post_took),
        ("DELETE", stop, stop_took),
        ("GET …/logs", log, log_took),
    ] {
        assert_eq!(code, 503, "{what}");
        assert!(took < bound, "{what} answered after {took:?}");
    }
    assert!(
        follow_took < bound + BUILD,
        "the follow ended after {follow_took:?}"
    );
    assert!(
        followed.contains("step-end") && followed.ends_with("Build finished\n"),
        "{followed}"
    );
    cluster.sim.clear_black_holes();
    // The stop was refused, so the build went on to succeed.
    exactly_once(&cb, &b, "succeeded").await;
}

/// `data:` URIs whose payload cannot be decoded, of any size, are accepted and fail as local
/// mode fails them (`SourceFetchFailed`, the decoder's message, the same log lines), from a
/// credentials Secret that holds at most 64 KiB of them: the URI itself would be refused
/// over 1 MiB (the API server's limit for a Secret) and keep the worker from starting over
/// 128 KiB (one environment string).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_data_uris_of_any_size_fail_as_in_local_mode() {
    use base64::Engine;
    let cluster = Cluster::start().await;
    let max_source_bytes = 2_000_000u64;
    let shuttle = cluster.serve(
        Mode::Host,
        &[("MAX_SOURCE_BYTES", &max_source_bytes.to_string())],
    );
    let cb = Callbacks::start().await;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![9u8; n]);
    // 1.5 MiB with a bad symbol in its middle; 300 KiB wrapped in lines of 76 (MIME); 3 MiB
    // of valid base64, too large for MAX_SOURCE_BYTES.
    let mut bad_symbol = b64(1_200_000);
    bad_symbol.replace_range(800_001..800_002, "*");
    let wrapped: String = b64(230_000)
        .as_bytes()
        .chunks(76)
        .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
        .collect();
    let too_large = b64(2_400_000);
    let limits = buildshuttle::config::Limits {
        max_source_bytes,
        max_context_bytes: 1 << 30,
        max_archive_entries: 1000,
    };
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut builds = Vec::new();
    for (i, payload) in [bad_symbol, wrapped, too_large].into_iter().enumerate() {
        // What local mode's build of it says (its pipeline decodes it with this).
        let expected = buildshuttle::pipeline::sources::write_data(
            &payload,
            &scratch.path().join(i.to_string()),
            &limits,
        )
        .await
        .expect_err("not decodable")
        .to_string();
        let b = cluster.body(&format!("data:application/zip;base64,{payload}"), &cb);
        let r = reqwest::Client::new()
            .post(shuttle.url("/"))
            .json(&b)
            .send()
            .await
            .expect("POST /");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        builds.push((b, expected));
    }
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cluster.client.clone(), cluster.ns());
    for (b, expected) in &builds {
        let name = format!("{}-credentials", common::cluster::job_name(b));
        let secret = secrets.get(&name).await.expect("the credentials Secret");
        let held = secret
            .data
            .as_ref()
            .and_then(|d| d.get("sources"))
            .map_or(0, |v| v.0.len());
        assert!(
            held <= 64 * 1024 + 64,
            "{name} holds {held} bytes of the URI"
        );
        exactly_once(&cb, b, "failed").await;
        let job = finished(&cluster, b).await;
        assert_eq!(reason(&job), "SourceFetchFailed", "{job:#}");
        assert_eq!(message(&job), *expected, "{job:#}");
        let log = shuttle.log(b).await;
        let lines: Vec<&str> = log.lines().collect();
        let started = format!("Build 1 of {} started ({})", key(b), uuid_of(b));
        let failed = format!("Build failed (SourceFetchFailed): {expected}");
        assert_eq!(lines.len(), 5, "{log}");
        assert_eq!(
            (lines[0], lines[1], lines[2], lines[4]),
            (
                started.as_str(),
                "Decoding sources from the data: URI",
                failed.as_str(),
                "Build finished"
            ),
            "{log}"
        );
        assert!(lines[3].starts_with("Timings: "), "{log}");
    }
}

/// Temporary files a killed process left in its data folder (the chart's emptyDir outlives
/// a container's restarts) are removed when Kubernetes mode starts: the scratch folder of
/// `data:` archives and the folder of log ends. The rest of DATA_DIR is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn temporary_files_a_killed_process_left_are_removed_at_start() {
    let cluster = Cluster::start().await;
    let data = cluster.data.path().join("restarted");
    let mut left = Vec::new();
    for dir in ["scratch", "log-ends"] {
        let d = data.join(dir);
        std::fs::create_dir_all(d.join(".tmpdir")).expect("folder");
        for (f, size) in [(".tmpA1b2C3", 1 << 20), ("app-uuid-3.logs", 10)] {
            std::fs::write(d.join(f), vec![b'x'; size]).expect("file");
            left.push(d.join(f));
        }
        left.push(d.join(".tmpdir"));
    }
    std::fs::write(data.join("keep.txt"), "not ours to remove").expect("file");
    let shuttle = cluster.serve_as("restarted", Mode::Host, &[]);
    wait_octhc(&shuttle, 200, Duration::from_secs(30), "started").await;
    for p in &left {
        assert!(!p.exists(), "{} is still there", p.display());
    }
    assert!(data.join("keep.txt").exists());
}

/// S3 that takes the facade's `data:` archive and never answers: `POST /` is refused with
/// 503 once the staging deadline passes (30 s for a small archive), as in local mode, not
/// held for the S3 client's 5 attempts; no BuildJob is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_s3_refuses_a_data_post_in_time_and_writes_no_buildjob() {
    let cluster = Cluster::start().await;
    let Some(upstream) = cluster
        .s3_endpoint()
        .and_then(|e| e.strip_prefix("http://"))
    else {
        return; // S3 on AWS (a real cluster's run) is not ours to hang
    };
    let upstream: &'static str = Box::leak(upstream.to_string().into_boxed_str());
    let front = common::proxy(
        upstream,
        |method, _, _| (method == "PUT").then_some(common::Reply::Hang),
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    let shuttle = cluster.serve_as("hung-s3", Mode::Host, &[("S3_ENDPOINT", &endpoint)]);
    wait_octhc(&shuttle, 200, Duration::from_secs(30), "started").await;
    let cb = Callbacks::start().await;
    let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(90),
        reqwest::Client::new()
            .post(shuttle.url("/"))
            .json(&b)
            .send(),
    )
    .await
    .expect("the POST is answered within 90 s")
    .expect("POST");
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("storage did not take"), "{text}");
    assert!(took >= Duration::from_secs(29), "refused after {took:?}");
    assert_ne!(
        cluster.job(&b).await["kind"],
        "BuildJob",
        "a BuildJob was written"
    );
}

/// Polls `/octhc` until it answers `code`.
async fn wait_octhc(shuttle: &Proc, code: u16, within: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let got = reqwest::get(shuttle.url("/octhc"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if got == code {
            return;
        }
        assert!(start.elapsed() < within, "/octhc never {what} (last {got})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The scenarios, each run on the simulator and on a real cluster (`scenarios!` above).
mod scenario {
    use super::*;

    pub async fn stop_one_stop_all_and_the_queue_runs_oldest_first(cluster: Cluster) {
        // The queue's periodic look is ten minutes away: c starts because a's end wakes it.
        let shuttle = cluster.serve(
            Mode::Host,
            &[
                ("MAXIMUM_PARALLEL_BUILDS", "1"),
                ("QUEUED_RECHECK_SECONDS", "600"),
            ],
        );
        let cb = Callbacks::start().await;
        let a = cluster.body(&data_uri(&app(&cluster, 3)), &cb);
        let b = next_build(&a, 2, &data_uri(&app(&cluster, 0)));
        let c = next_build(&a, 3, &data_uri(&app(&cluster, 0)));
        let d = next_build(&a, 4, &data_uri(&app(&cluster, 30)));
        shuttle.post(&a).await;
        running_pod(&cluster, &a).await;
        for x in [&b, &c] {
            shuttle.post(x).await;
            cluster
                .wait_job(x, "Queued", BUILD, |j| j["status"]["phase"] == "Queued")
                .await;
        }
        // Stop b while it waits: it never gets a pod, and controller-api hears `failed`.
        assert_eq!(delete(&shuttle, &format!("/{}/2", key(&a))).await, 200);
        exactly_once(&cb, &b, "failed").await;
        let jb = finished(&cluster, &b).await;
        assert_eq!(reason(&jb), "Cancelled");
        exactly_once(&cb, &a, "succeeded").await;
        exactly_once(&cb, &c, "succeeded").await;
        let (ja, jc) = (finished(&cluster, &a).await, finished(&cluster, &c).await);
        assert!(
            ja["status"]["startTime"].as_str() <= jc["status"]["startTime"].as_str(),
            "oldest first: {ja:#} {jc:#}"
        );
        // Stop-all: a running build of the app is stopped, its pod deleted.
        shuttle.post(&d).await;
        let pod = running_pod(&cluster, &d).await;
        assert_eq!(delete(&shuttle, &format!("/{}", key(&a))).await, 200);
        exactly_once(&cb, &d, "failed").await;
        assert_eq!(reason(&finished(&cluster, &d).await), "Cancelled");
        wait_gone(&cluster, &pod, None).await;
    }

    pub async fn a_build_past_its_timeout_fails_and_a_docker_source_is_retagged(cluster: Cluster) {
        // A real cluster's worker also starts its dockerd and pulls: give the docker:// build
        // time to finish within the timeout.
        let (timeout, sleep) = match cluster.sim() {
            Some(_) => ("4000", 60),
            None => ("60000", 600),
        };
        let shuttle = cluster.serve(Mode::External, &[("TIMEOUT_IN_MS", timeout)]);
        let cb = Callbacks::start().await;
        let slow = cluster.body(&data_uri(&app(&cluster, sleep)), &cb);
        let image = cluster.body(&cluster.docker_source(), &cb);
        shuttle.post(&slow).await;
        shuttle.post(&image).await;
        exactly_once(&cb, &image, "succeeded").await;
        let tags = cluster.tags(&image).await;
        assert!(tags.contains(&"1.1".to_string()), "{tags:?}");
        exactly_once(&cb, &slow, "failed").await;
        assert_eq!(reason(&finished(&cluster, &slow).await), "Timeout");
    }

    pub async fn a_controller_killed_mid_build_is_replaced_without_repeating_a_callback(
        cluster: Cluster,
    ) {
        match cluster.sim() {
            Some(sim) => sim.set_watch_delay(true),
            None => {
                cluster.skip("the 50–500 ms watch delay: a real cluster's watches lag as they do")
            }
        }
        let fast_lease = [("LEASE_SECONDS", "3")];
        let first = cluster.serve_as("first", Mode::Host, &fast_lease);
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 5)), &cb);
        first.post(&b).await;
        running_pod(&cluster, &b).await;
        first.signal("-KILL");
        let second = cluster.serve_as("second", Mode::Host, &fast_lease);
        exactly_once(&cb, &b, "succeeded").await;
        let j = finished(&cluster, &b).await;
        assert_eq!(
            j["status"]["podRetries"], 0,
            "the running pod was kept: {j:#}"
        );
        drop(second);
    }

    pub async fn two_replicas_one_leader_and_a_takeover_creates_no_pod_twice(cluster: Cluster) {
        match cluster.sim() {
            Some(sim) => sim.set_watch_delay(true),
            None => {
                cluster.skip("the 50–500 ms watch delay: a real cluster's watches lag as they do")
            }
        }
        let fast_lease = [("LEASE_SECONDS", "3")];
        let mut a = Some(cluster.serve_as("replica-a", Mode::Host, &fast_lease));
        let mut b = Some(cluster.serve_as("replica-b", Mode::Host, &fast_lease));
        let cb = Callbacks::start().await;
        let builds: Vec<Value> = (0..2)
            .map(|_| cluster.body(&data_uri(&app(&cluster, 5)), &cb))
            .collect();
        for (i, x) in builds.iter().enumerate() {
            // Either replica's API accepts builds.
            let via = if i == 0 { a.as_ref() } else { b.as_ref() };
            via.expect("replica").post(x).await;
        }
        for x in &builds {
            running_pod(&cluster, x).await;
        }
        let leader = holder(&cluster).await;
        assert!(leader == "replica-a" || leader == "replica-b", "{leader}");
        // Kill the leader mid-build; the other takes over.
        if leader == "replica-a" {
            a.take();
        } else {
            b.take();
        }
        for x in &builds {
            exactly_once(&cb, x, "succeeded").await;
            let j = finished(&cluster, x).await;
            assert_eq!(j["status"]["podRetries"], 0, "{j:#}");
        }
        let now = holder(&cluster).await;
        assert!(
            !now.is_empty() && now != leader,
            "the survivor leads: {now}"
        );
        // One pod per build, ever (pods are kept until the BuildJob's TTL).
        let pods = cluster.pods().await;
        for x in &builds {
            let n = pods
                .iter()
                .filter(|p| p["metadata"]["labels"]["build_uuid"] == x["build_uuid"])
                .count();
            assert_eq!(n, 1, "pods of {}", uuid_of(x));
        }
    }

    pub async fn evicted_drained_or_deleted_pods_are_recreated_and_the_build_succeeds(
        cluster: Cluster,
    ) {
        // Log lines on Kafka (pods reach the test's broker on the simulator's host network
        // only): a stopped worker does not end the log, the re-created pod's worker does.
        let kafka = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        let topic = "buildlogs-recreated";
        kafka.create_topic(topic, 1, 1).expect("topic");
        let bootstrap = kafka.bootstrap_servers();
        let shuttle = cluster.serve(Mode::Host, &[("KAFKA_TOPIC", topic)]);
        let cb = Callbacks::start().await;
        let builds: Vec<Value> = (0..3)
            .map(|_| {
                let mut x = cluster.body(&data_uri(&app(&cluster, 4)), &cb);
                if cluster.sim().is_some() {
                    x["kafka_hosts"] = json!(bootstrap);
                }
                x
            })
            .collect();
        for x in &builds {
            shuttle.post(x).await;
        }
        let mut pods = Vec::new();
        for x in &builds {
            pods.push(running_pod(&cluster, x).await);
        }
        // Node pressure: the kubelet evicts (a real cluster: the Eviction API, as for pod 1).
        match cluster.sim() {
            Some(sim) => sim.evict(NS, &pods[0]).await.expect("evict"),
            None => {
                cluster.skip("a kubelet pressure eviction (a simulator knob): pod 0 goes by the Eviction API");
                evict(&cluster, &pods[0]).await;
            }
        }
        // kubectl drain: the Eviction API.
        evict(&cluster, &pods[1]).await;
        // kubectl delete pod.
        pods_api(&cluster)
            .delete(&pods[2], &DeleteParams::default())
            .await
            .expect("delete pod");
        for x in &builds {
            exactly_once(&cb, x, "succeeded").await;
            let j = finished(&cluster, x).await;
            assert_eq!(j["status"]["podRetries"], 1, "re-created once: {j:#}");
            // The stored log is the second worker's, whole.
            let log = shuttle.log(x).await;
            assert!(
                log.contains("step-end") && log.ends_with("Build finished\n"),
                "{log}"
            );
            assert_eq!(log.matches("Build finished").count(), 1, "{log}");
        }
        if cluster.sim().is_none() {
            return cluster.skip("Kafka lines (worker pods cannot reach this machine's broker)");
        }
        for (i, x) in builds.iter().enumerate() {
            let lines = kafka_lines(&bootstrap, topic, x).await;
            assert_eq!(
                lines.iter().filter(|l| *l == "Build finished").count(),
                1,
                "build {i}: one `Build finished`, the last worker's: {lines:#?}"
            );
            assert_eq!(lines.last().map(String::as_str), Some("Build finished"));
            assert!(lines.iter().any(|l| l.contains("step-end")), "{lines:#?}");
            // Pods 1 and 2 were stopped gracefully (a kubelet eviction kills at once).
            if i > 0 {
                let cut = lines
                    .iter()
                    .position(|l| l.starts_with("Build interrupted: "))
                    .unwrap_or_else(|| {
                        panic!("build {i}: the first worker says it was cut: {lines:#?}")
                    });
                assert!(
                    lines[cut..].iter().any(|l| l.contains("started")),
                    "build {i}: then the second worker's lines: {lines:#?}"
                );
            }
        }
    }

    pub async fn oom_a_lost_node_and_an_unschedulable_pod_end_with_their_reason(cluster: Cluster) {
        let Some(sim) = cluster.sim() else {
            cluster.skip("OOM and a lost node (simulator knobs)");
            return unschedulable_by_node_selector(&cluster).await;
        };
        let shuttle = cluster.serve(
            Mode::Host,
            &[
                ("POD_LOST_GRACE_SECONDS", "2"),
                ("POD_PENDING_LIMIT_SECONDS", "3"),
                ("MAX_POD_RETRIES", "0"),
            ],
        );
        let cb = Callbacks::start().await;
        let oom = cluster.body(&data_uri(&app(&cluster, 20)), &cb);
        let lost = cluster.body(&data_uri(&app(&cluster, 20)), &cb);
        shuttle.post(&oom).await;
        shuttle.post(&lost).await;
        let oom_pod = running_pod(&cluster, &oom).await;
        let lost_pod = running_pod(&cluster, &lost).await;
        sim.oom_kill(NS, &oom_pod).await.expect("oom");
        exactly_once(&cb, &oom, "failed").await;
        assert_eq!(reason(&finished(&cluster, &oom).await), "OOMKilled");

        // The node stops reporting; the taint manager deletes the pod, which nobody finishes.
        sim.lose_node(NS, &lost_pod).await.expect("lose node");
        pods_api(&cluster)
            .delete(&lost_pod, &DeleteParams::default().grace_period(1))
            .await
            .expect("delete");
        exactly_once(&cb, &lost, "failed").await;
        let j = finished(&cluster, &lost).await;
        assert_eq!(reason(&j), "PodLost", "{j:#}");

        sim.set_unschedulable(true);
        a_build_fails_as_unschedulable(&cluster, &shuttle, &cb).await;
    }

    pub async fn a_pod_that_cannot_start_or_is_refused_fails_fast_with_the_reason(
        cluster: Cluster,
    ) {
        let cb = Callbacks::start().await;
        // A worker image that does not exist: the kubelet cannot pull it.
        let missing = cluster.serve(
            Mode::Host,
            &[(
                "DOCKER_BUILD_IMAGE",
                &format!("{}/nothing/here:1", cluster.registry()),
            )],
        );
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        missing.post(&b).await;
        exactly_once(&cb, &b, "failed").await;
        let j = finished(&cluster, &b).await;
        // The registry says the image does not exist: the first pull error is enough
        // (which of the two the controller saw first depends on timing).
        assert!(
            matches!(reason(&j).as_str(), "ErrImagePull" | "ImagePullBackOff"),
            "{j:#}"
        );
        assert!(message(&j).contains("nothing/here"), "{j:#}");
        drop(missing);

        // dind in a namespace whose Pod Security level refuses privileged pods.
        match cluster.sim() {
            Some(sim) => sim.set_refuse_privileged(true),
            None => pod_security(&cluster, "baseline").await,
        }
        let dind = cluster.serve(Mode::Host, &[("WORKER_DOCKER_MODE", "dind")]);
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        dind.post(&b).await;
        exactly_once(&cb, &b, "failed").await;
        let j = finished(&cluster, &b).await;
        assert_eq!(reason(&j), "PodRejected");
        assert!(
            message(&j).contains("PodSecurity"),
            "the API's words: {j:#}"
        );
    }

    pub async fn a_deleted_buildjob_still_sends_its_final_callback(cluster: Cluster) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 30)), &cb);
        shuttle.post(&b).await;
        let pod = running_pod(&cluster, &b).await;
        let name = common::cluster::job_name(&b);
        let jobs: Api<kube::api::DynamicObject> = Api::namespaced_with(
            cluster.client.clone(),
            cluster.ns(),
            &common::cluster::buildjob_resource(),
        );
        jobs.delete(&name, &DeleteParams::default())
            .await
            .expect("delete");
        exactly_once(&cb, &b, "failed").await;
        wait_gone(&cluster, &pod, Some((&jobs, &name))).await;
    }

    pub async fn a_pod_left_terminating_on_a_lost_node_does_not_hold_up_the_next_buildjob_of_its_name(
        cluster: Cluster,
    ) {
        let Some(sim) = cluster.sim() else {
            return cluster.skip("a lost node (a simulator knob)");
        };
        let shuttle = cluster.serve(Mode::Host, &[("POD_LOST_GRACE_SECONDS", "2")]);
        let cb = Callbacks::start().await;
        let first = cluster.body(&data_uri(&app(&cluster, 60)), &cb);
        shuttle.post(&first).await;
        let pod = running_pod(&cluster, &first).await;
        // Its node stops reporting; the taint manager deletes the pod, which nobody can
        // finish now.
        sim.lose_node(NS, &pod).await.expect("lose node");
        pods_api(&cluster)
            .delete(&pod, &DeleteParams::default().grace_period(1))
            .await
            .expect("delete");
        // controller-api numbers a new build as the first: the first gives way (`failed`),
        // and the new one runs once the lost pod of that name is forced out. (The first
        // goes only once its log's end is written, after the wait for its worker to stop:
        // until then the POST is a 503, which controller-api tries again.)
        let again = next_build(&first, 1, &data_uri(&app(&cluster, 0)));
        let start = Instant::now();
        loop {
            let status = reqwest::Client::new()
                .post(shuttle.url("/"))
                .json(&again)
                .send()
                .await
                .expect("POST")
                .status();
            if status == 200 {
                break;
            }
            assert_eq!(status, 503);
            assert!(start.elapsed() < BUILD, "never accepted");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        exactly_once(&cb, &first, "failed").await;
        exactly_once(&cb, &again, "succeeded").await;
        let j = finished(&cluster, &again).await;
        assert_eq!(j["spec"]["buildUuid"], again["build_uuid"], "{j:#}");
    }

    pub async fn a_stale_pod_of_the_same_name_is_not_adopted(cluster: Cluster) {
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        // A finished pod left by an earlier BuildJob of this name (another uid).
        let name = format!("{}-worker-0", common::cluster::job_name(&b));
        let stale: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": cluster.ns(),
            "labels": {"app.kubernetes.io/managed-by": "buildshuttle", "app.kubernetes.io/component": "worker"},
            "ownerReferences": [{"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJob",
                "name": common::cluster::job_name(&b), "uid": "an-earlier-buildjob", "controller": true}]},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "worker", "image": cluster.base_image(),
            "command": ["sh", "-c", "echo '{\"result\":\"succeeded\",\"image\":\"stale\"}' > /dev/termination-log"]}]}
    }))
    .expect("pod");
        pods_api(&cluster)
            .create(&PostParams::default(), &stale)
            .await
            .expect("stale pod");
        let shuttle = cluster.serve(Mode::Host, &[]);
        shuttle.post(&b).await;
        exactly_once(&cb, &b, "succeeded").await;
        let j = finished(&cluster, &b).await;
        assert_ne!(j["status"]["image"], "stale", "{j:#}");
        assert!(
            j["status"]["image"]
                .as_str()
                .unwrap_or("")
                .ends_with(":1.1"),
            "{j:#}"
        );
    }

    pub async fn a_slow_callback_receiver_holds_up_nothing_but_its_callback(cluster: Cluster) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let slow = common::SlowReceiver::start(Duration::from_secs(8)).await;
        let cb = Callbacks::start().await;
        let mut b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        b["callback"] = json!(slow.url());
        shuttle.post(&b).await;
        // The build finishes and its status says so while `pending` is still being delivered.
        let started = Instant::now();
        let j = finished(&cluster, &b).await;
        assert_eq!(j["status"]["phase"], "Succeeded");
        assert!(
            slow.statuses().is_empty(),
            "the status moved on before the slow receiver answered ({:?})",
            started.elapsed()
        );
        let start = Instant::now();
        while slow.statuses().len() < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "callbacks never arrived"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(slow.statuses(), ["pending", "succeeded"]);
    }

    pub async fn buildjob_status_records_where_the_time_went(cluster: Cluster) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        shuttle.post(&b).await;
        exactly_once(&cb, &b, "succeeded").await;
        let j = cluster
            .wait_job(&b, "timed", BUILD, |j| {
                j["status"]["timings"]["finalCallbackMs"].is_u64()
            })
            .await;
        let t = &j["status"]["timings"];
        let ms = |k: &str| {
            t[k].as_u64()
                .unwrap_or_else(|| panic!("timings.{k}: {j:#}"))
        };
        assert!(ms("podCreatedMs") <= ms("podRunningMs"), "{t}");
        assert!(ms("podRunningMs") <= ms("workerDoneMs"), "{t}");
        assert!(ms("workerDoneMs") <= ms("finalCallbackMs"), "{t}");
        for stage in ["fetch", "context", "build", "push", "total"] {
            assert!(t["stages"][stage].is_u64(), "stage {stage}: {t}");
        }
        // `kubectl describe` shows them (it prints the status as it is).
        let out = std::process::Command::new(cluster.kubectl())
            .args([
                "describe",
                "bj",
                "-n",
                cluster.ns(),
                &common::cluster::job_name(&b),
            ])
            .env("KUBECONFIG", cluster.kubeconfig())
            .output()
            .expect("kubectl describe");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Timings:") && text.contains("Final Callback Ms:"),
            "{text}"
        );
    }

    pub async fn two_installations_in_one_namespace_reconcile_only_their_own_buildjobs(
        cluster: Cluster,
    ) {
        // Installation "a" runs only its API here; installation "b" runs a controller.
        let a_api = cluster.serve_as(
            "a-api",
            Mode::Host,
            &[("INSTANCE_NAME", "a"), ("RUN_CONTROLLER", "false")],
        );
        let _b = cluster.serve_as(
            "b-ctl",
            Mode::Host,
            &[("INSTANCE_NAME", "b"), ("LEASE_NAME", "buildshuttle-b")],
        );
        let cb = Callbacks::start().await;
        let x = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        a_api.post(&x).await;
        let j = cluster
            .wait_job(&x, "created", BUILD, |j| j.is_object())
            .await;
        assert_eq!(
            j["metadata"]["labels"]["buildshuttle.akkeris.io/instance"],
            "a"
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
        let j = cluster.job(&x).await;
        assert!(
            j["status"].is_null(),
            "installation b left a's BuildJob alone: {j:#}"
        );
        assert!(cb.calls_for(uuid_of(&x)).is_empty());
        // a's controller takes it.
        let _a = cluster.serve_as(
            "a-ctl",
            Mode::Host,
            &[("INSTANCE_NAME", "a"), ("LEASE_NAME", "buildshuttle-a")],
        );
        exactly_once(&cb, &x, "succeeded").await;
        let pods = cluster.pods().await;
        assert!(pods
            .iter()
            .filter(|p| p["metadata"]["labels"]["build_uuid"] == x["build_uuid"])
            .all(|p| p["metadata"]["labels"]["buildshuttle.akkeris.io/instance"] == "a"));
    }

    pub async fn each_log_follower_holds_one_streaming_pod_log_request(cluster: Cluster) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 6)), &cb);
        shuttle.post(&b).await;
        running_pod(&cluster, &b).await;
        if let Some(sim) = cluster.sim() {
            sim.reset_counters();
        }
        let path = format!(
            "/{}/{}/logs?follow=true",
            key(&b),
            b["build_number"].as_u64().unwrap_or(1)
        );
        let follow = || async {
            reqwest::get(shuttle.url(&path))
                .await
                .expect("follow")
                .text()
                .await
                .unwrap_or_default()
        };
        let started = Instant::now();
        let (one, two) = tokio::join!(follow(), follow());
        let took = started.elapsed();
        for text in [&one, &two] {
            assert!(text.contains("step-end"), "followed to the end: {text}");
            for line in ["step-start", "step-end", "Build finished"] {
                assert_eq!(
                    text.matches(line).count(),
                    1,
                    "{line} once, across the switch: {text}"
                );
            }
        }
        let Some(sim) = cluster.sim() else {
            cluster.skip("counting the API requests of the followers (a simulator counter)");
            return exactly_once(&cb, &b, "succeeded").await;
        };
        let counters = sim.counters();
        let logs = counters.get("get pods/log").copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&logs),
            "one streaming log request per reader: {counters:?}"
        );
        // The BuildJob is read about once a second per reader (to see the build end), not four
        // times a second with a full log read each time.
        let reads = counters.get("get buildjobs").copied().unwrap_or(0);
        let per_reader_per_s = reads as f64 / 2.0 / took.as_secs_f64().max(1.0);
        assert!(
            per_reader_per_s < 3.0,
            "BuildJob reads per reader per second: {per_reader_per_s:.1} ({counters:?})"
        );
        exactly_once(&cb, &b, "succeeded").await;
    }

    pub async fn a_finished_buildjob_lets_go_of_its_finalizer_so_an_uninstall_never_hangs(
        cluster: Cluster,
    ) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        shuttle.post(&b).await;
        exactly_once(&cb, &b, "succeeded").await;
        // Its callbacks are sent: nothing holds it any more, a day before its TTL.
        cluster
            .wait_job(&b, "free of its finalizer", Duration::from_secs(20), |j| {
                j["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty())
            })
            .await;
        // It still answers as a finished build: a repeated POST sends nothing again, and
        // its log is there.
        shuttle.post(&b).await;
        exactly_once(&cb, &b, "succeeded").await;
        assert!(shuttle.log(&b).await.contains("step-end"));
        // An uninstall deletes the controller with the namespace (or the CRD): the BuildJob
        // must not wait for a controller that is gone.
        drop(shuttle);
        let name = common::cluster::job_name(&b);
        let jobs: Api<kube::api::DynamicObject> = Api::namespaced_with(
            cluster.client.clone(),
            cluster.ns(),
            &common::cluster::buildjob_resource(),
        );
        jobs.delete(&name, &DeleteParams::default())
            .await
            .expect("delete");
        let start = Instant::now();
        while jobs.get_opt(&name).await.ok().flatten().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the BuildJob hangs in Terminating without a controller"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn a_credentials_secret_an_earlier_buildjob_left_is_replaced_not_used(
        cluster: Cluster,
    ) {
        use base64::Engine;
        let cb = Callbacks::start().await;
        let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        let name = common::cluster::job_name(&b);
        // An earlier BuildJob of this name was deleted; the garbage collector has not yet
        // removed its Secret (the old build's sources and credentials).
        let old = format!(
            "FROM {}\nRUN echo OLD-BUILDS-SOURCES\n",
            cluster.base_image()
        );
        let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
        let stale: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-credentials"), "namespace": cluster.ns(),
                "ownerReferences": [{"apiVersion": "buildshuttle.akkeris.io/v1", "kind": "BuildJob",
                    "name": name, "uid": "an-earlier-buildjob", "controller": true}]},
            "data": {"sources": b64(&data_uri(&tar_gz(&[("Dockerfile", old.as_bytes())]))),
                     "callback_auth": b64("old-builds-token")}
        }))
        .expect("secret");
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(cluster.client.clone(), cluster.ns());
        secrets
            .create(&PostParams::default(), &stale)
            .await
            .expect("stale secret");
        let shuttle = cluster.serve(Mode::Host, &[]);
        shuttle.post(&b).await;
        let job = cluster
            .wait_job(&b, "created", BUILD, |j| j["metadata"]["uid"].is_string())
            .await;
        let secret = secrets
            .get(&format!("{name}-credentials"))
            .await
            .expect("its Secret");
        let owners: Vec<String> = secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.uid)
            .collect();
        assert_eq!(
            owners,
            [job["metadata"]["uid"].as_str().unwrap_or("")],
            "the new BuildJob's own Secret"
        );
        exactly_once(&cb, &b, "succeeded").await;
        for c in cb.calls_for(uuid_of(&b)) {
            assert_eq!(c.auth.as_deref(), Some("cb-secret-token"), "{c:?}");
        }
        let log = shuttle.log(&b).await;
        assert!(
            log.contains("step-end") && !log.contains("OLD-BUILDS-SOURCES"),
            "{log}"
        );
    }

    pub async fn a_build_number_used_again_by_a_new_build_replaces_the_earlier_buildjob(
        cluster: Cluster,
    ) {
        let shuttle = cluster.serve(Mode::Host, &[]);
        let cb = Callbacks::start().await;
        let first = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        let five = next_build(&first, 5, &data_uri(&app(&cluster, 0)));
        shuttle.post(&five).await;
        exactly_once(&cb, &five, "succeeded").await;
        // controller-api deleted build 5 and numbers its next build 5 again: the new one
        // is accepted and runs, the finished one gives way.
        let again = next_build(&first, 5, &data_uri(&app(&cluster, 0)));
        shuttle.post(&again).await;
        exactly_once(&cb, &again, "succeeded").await;
        let j = finished(&cluster, &again).await;
        assert_eq!(j["spec"]["buildUuid"], again["build_uuid"], "{j:#}");
        let statuses: Vec<String> = cb
            .calls_for(uuid_of(&five))
            .iter()
            .map(|c| c.body["status"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(statuses, ["pending", "succeeded"], "the earlier build");
        // A running build whose number a new build takes is stopped (`failed`), and the new
        // one runs.
        let running = next_build(&first, 6, &data_uri(&app(&cluster, 60)));
        shuttle.post(&running).await;
        running_pod(&cluster, &running).await;
        let newer = next_build(&first, 6, &data_uri(&app(&cluster, 0)));
        shuttle.post(&newer).await;
        exactly_once(&cb, &running, "failed").await;
        exactly_once(&cb, &newer, "succeeded").await;
        let j = finished(&cluster, &newer).await;
        assert_eq!(j["spec"]["buildUuid"], newer["build_uuid"], "{j:#}");
        assert_eq!(j["status"]["phase"], "Succeeded", "{j:#}");
    }

    pub async fn a_callback_on_the_wire_at_sigterm_is_delivered_once_not_cut_and_resent(
        cluster: Cluster,
    ) {
        // No delay before the drain: the controller stops at once on SIGTERM.
        let rollout = [
            ("SHUTDOWN_DELAY_SECONDS", "0"),
            ("SHUTDOWN_GRACE_SECONDS", "30"),
        ];
        let mut old = cluster.serve_as("old", Mode::Host, &rollout);
        let slow = common::SlowReceiver::start(Duration::from_secs(8)).await;
        let cb = Callbacks::start().await;
        let mut b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        b["callback"] = json!(slow.url());
        old.post(&b).await;
        cluster
            .wait_job(&b, "sending pending", BUILD, |j| {
                j["status"]["callbacks"]["inFlight"]["status"] == "pending"
            })
            .await;
        // A rollout: the new replica waits for the Lease, the old one is told to stop while
        // its `pending` is on the wire.
        let _new = cluster.serve_as("new", Mode::Host, &[]);
        old.signal("-TERM");
        let sigterm = Instant::now();
        // Delivered by the old replica within its grace period, not cut and sent again by
        // the new leader after its takeover wait (CALLBACK_RETRY_SECONDS 20 + 60 s).
        while slow.statuses().len() < 2 {
            assert!(
                sigterm.elapsed() < Duration::from_secs(60),
                "callbacks so far: {:?}",
                slow.statuses()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(slow.statuses(), ["pending", "succeeded"]);
        // The old replica exited by itself once its sender was done.
        let start = Instant::now();
        while old.child.try_wait().ok().flatten().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the old replica never exited: {}",
                cluster.serve_log("old")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn builds_ended_without_a_worker_end_their_log_once_in_storage_and_on_kafka(
        cluster: Cluster,
    ) {
        let kafka = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        let topic = "buildlogs-ends";
        kafka.create_topic(topic, 1, 1).expect("topic");
        let bootstrap = kafka.bootstrap_servers();
        let cb = Callbacks::start().await;
        let fast_lease = ("LEASE_SECONDS", "3");

        // A worker pod whose image cannot be pulled: no worker ever runs.
        let missing = cluster.serve(
            Mode::Host,
            &[
                fast_lease,
                ("KAFKA_TOPIC", topic),
                (
                    "DOCKER_BUILD_IMAGE",
                    &format!("{}/nothing/here:1", cluster.registry()),
                ),
            ],
        );
        let mut pull = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
        pull["kafka_hosts"] = json!(bootstrap);
        missing.post(&pull).await;
        exactly_once(&cb, &pull, "failed").await;
        let j = finished(&cluster, &pull).await;
        let failed = format!("Build failed ({}): {}", reason(&j), message(&j));
        assert!(failed.contains("nothing/here"), "{failed}");
        let (log, lines) =
            controller_ended(&cluster, &missing, &bootstrap, topic, &pull, &failed).await;
        assert_eq!(log, format!("{failed}\nBuild finished\n"), "just the end");
        assert_eq!(lines.len(), 2, "just the end: {lines:#?}");
        drop(missing);

        // One slot: `running` holds it and `queued` waits; each is stopped.
        let shuttle = cluster.serve(
            Mode::Host,
            &[
                fast_lease,
                ("KAFKA_TOPIC", topic),
                ("MAXIMUM_PARALLEL_BUILDS", "1"),
            ],
        );
        let mut running = cluster.body(&data_uri(&app(&cluster, 60)), &cb);
        running["kafka_hosts"] = json!(bootstrap);
        let queued = next_build(&running, 2, &data_uri(&app(&cluster, 0)));
        shuttle.post(&running).await;
        let pod = running_pod(&cluster, &running).await;
        // The worker's own lines are in its pod log: wait for them, so it has begun.
        shuttle.wait_log(&running, "step-start").await;
        shuttle.post(&queued).await;
        cluster
            .wait_job(&queued, "Queued", BUILD, |j| {
                j["status"]["phase"] == "Queued"
            })
            .await;
        assert_eq!(
            delete(&shuttle, &format!("/{}/2", key(&running))).await,
            200
        );
        exactly_once(&cb, &queued, "failed").await;
        let failed = "Build failed (Cancelled): stopped by request before it started";
        let (log, lines) =
            controller_ended(&cluster, &shuttle, &bootstrap, topic, &queued, failed).await;
        assert_eq!(log, format!("{failed}\nBuild finished\n"), "just the end");
        assert_eq!(lines.len(), 2, "just the end: {lines:#?}");

        // Stopped while running: its worker says it was cut (and stores its log); the end
        // comes after, from the controller, once.
        assert_eq!(
            delete(&shuttle, &format!("/{}/1", key(&running))).await,
            200
        );
        exactly_once(&cb, &running, "failed").await;
        let failed = "Build failed (Cancelled): stopped by request";
        let (log, lines) =
            controller_ended(&cluster, &shuttle, &bootstrap, topic, &running, failed).await;
        assert!(
            log.contains("step-start") && log.contains("Build interrupted: "),
            "the worker's log is kept: {log}"
        );
        wait_gone(&cluster, &pod, None).await;
        match cluster.sim() {
            Some(_) => assert!(
                lines.iter().any(|l| l.starts_with("Build interrupted: ")),
                "the worker's lines come first: {lines:#?}"
            ),
            None => cluster
                .skip("the worker's Kafka lines (worker pods cannot reach this machine's broker)"),
        }
    }
}

/// S3 refuses a worker's log for good (`403 AccessDenied`, which the worker does not try
/// again): before, the log was lost (its spool went with the pod) and the logs route served
/// nothing. Now the worker says so in its termination message, the logs route serves the
/// pod's log meanwhile, and the controller copies it into storage once S3 takes it, holding
/// the BuildJob until then. (Simulator only: the refusing S3 is a proxy on this machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_log_its_worker_could_not_store_is_copied_from_its_pod_and_served_meanwhile() {
    use buildshuttle::storage::{S3Storage, Storage};
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Secret;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const DENIED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
    let cluster = Cluster::start().await;
    let Some(upstream) = cluster
        .s3_endpoint()
        .and_then(|e| e.strip_prefix("http://"))
    else {
        return; // S3 on AWS (a real cluster's run) is not ours to refuse
    };
    let upstream: &'static str = Box::leak(upstream.to_string().into_boxed_str());
    let refusing = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (refuse, count) = (refusing.clone(), refused.clone());
    let front = common::proxy(
        upstream,
        move |method, path, _| {
            let no = refuse.load(Ordering::SeqCst) && method == "PUT" && path.contains(".logs");
            if no {
                count.fetch_add(1, Ordering::SeqCst);
            }
            no.then_some(common::Reply::Status(403, DENIED))
        },
        |_, _| None,
    )
    .await;
    let endpoint = format!("http://{front}");
    // The workers' S3 settings, through the refusing front.
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), cluster.ns());
    let mut env = secrets
        .get(common::cluster::WORKER_ENV)
        .await
        .expect("worker env");
    env.metadata = serde_json::from_value(json!({"name": "worker-env-refusing"})).expect("meta");
    env.data.get_or_insert_with(Default::default).insert(
        "S3_ENDPOINT".into(),
        k8s_openapi::ByteString(endpoint.clone().into_bytes()),
    );
    secrets
        .create(&PostParams::default(), &env)
        .await
        .expect("secret");
    let shuttle = cluster.serve(
        Mode::Host,
        &[
            ("S3_ENDPOINT", &endpoint),
            ("WORKER_ENV_SECRET", "worker-env-refusing"),
        ],
    );
    let cb = Callbacks::start().await;
    let b = cluster.body(&data_uri(&app(&cluster, 0)), &cb);
    shuttle.post(&b).await;
    exactly_once(&cb, &b, "succeeded").await;
    let j = cluster
        .wait_job(&b, "owing a copy of its log", BUILD, |j| {
            j["status"]["logCopied"] == false
        })
        .await;
    assert_eq!(j["status"]["logEnded"], true, "the worker ended it: {j:#}");
    // Served from the pod meanwhile, whole; a follower gets it all and its end.
    let log = shuttle.log(&b).await;
    assert!(log.contains("step-end"), "{log}");
    assert!(log.ends_with("Build finished\n"), "{log}");
    let followed = tokio::time::timeout(Duration::from_secs(30), async {
        let url = shuttle.url(&format!("{}?follow=true", common::logs_path(&b)));
        reqwest::get(url).await.expect("follow").text().await
    })
    .await
    .expect("the follow ends")
    .expect("text");
    assert_eq!(followed, log, "followed");
    // Held while the copy is owed (every callback recorded), the copy tried again meanwhile.
    let j = cluster
        .wait_job(&b, "with its callbacks recorded", BUILD, |j| {
            j["status"]["callbacks"]["final"] == true
        })
        .await;
    assert_eq!(j["status"]["logCopied"], false, "{j:#}");
    assert!(
        j["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "the BuildJob is held: {j:#}"
    );
    let start = Instant::now();
    while refused.load(Ordering::SeqCst) < 3 {
        assert!(start.elapsed() < BUILD, "the copy is not tried again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // S3 takes writes again: the copy lands, once, and is recorded.
    refusing.store(false, Ordering::SeqCst);
    cluster
        .wait_job(&b, "with its log copied and let go", BUILD, |j| {
            j["status"]["logCopied"] == true
                && j["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty())
        })
        .await;
    let bucket = S3Storage::new(&buildshuttle::config::S3Config {
        bucket: common::S3_BUCKET.into(),
        keys: Some((
            buildshuttle::secret::Secret::new(common::S3_ACCESS),
            buildshuttle::secret::Secret::new(common::S3_SECRET),
        )),
        region: Some("us-east-1".into()),
        endpoint: Some(format!("http://{upstream}")),
        attempt_timeout: Duration::from_secs(60),
    })
    .await;
    let key = format!("{}-{}.logs", key(&b), b["build_number"]);
    let obj = bucket
        .get(&key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} is not in the bucket"));
    let bytes: Vec<u8> = obj.body.map(|c| c.expect("chunk").to_vec()).concat().await;
    let stored = String::from_utf8(bytes).expect("utf-8");
    assert_eq!(stored, log, "the stored log is the pod's");
    assert_eq!(stored.matches("Build finished").count(), 1, "{stored}");
    let first = format!("Build {} of ", b["build_number"]);
    assert!(stored.starts_with(&first), "{stored}");
    assert_eq!(shuttle.log(&b).await, stored, "served from storage now");
}
