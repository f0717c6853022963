//! The docker-mode kubelet with real containers (needs `bash .ci/services`: dockerd and
//! the test/busybox image): phases, exit codes and termination messages, env from Secrets,
//! config errors, image pull errors, init containers and native sidecars,
//! activeDeadlineSeconds, graceful deletion, logs, runAsUser, privileged containers.

use kubesim::{Sim, SimConfig};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PODS: &str = "/api/v1/namespaces/default/pods";
const BUSYBOX: &str = "test/busybox:latest";

struct C {
    sim: Sim,
    http: reqwest::Client,
}

async fn start() -> C {
    assert!(
        std::path::Path::new("/var/run/docker.sock").exists(),
        "dockerd is not running: run `bash .ci/services` first"
    );
    let sim = Sim::start(SimConfig {
        tls: false,
        ..Default::default()
    })
    .await
    .expect("sim");
    C {
        sim,
        http: reqwest::Client::new(),
    }
}

impl C {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let mut r = self
            .http
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", self.sim.addr()),
            )
            .bearer_auth(&self.sim.shared.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        (
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        )
    }
    async fn create(&self, path: &str, obj: Value) {
        let (code, text) = self.call("POST", path, Some(obj)).await;
        assert_eq!(code, 201, "{text}");
    }
    async fn pod(&self, name: &str) -> Value {
        let (_, t) = self.call("GET", &format!("{PODS}/{name}"), None).await;
        serde_json::from_str(&t).unwrap_or(Value::Null)
    }
    async fn wait(&self, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let p = self.pod(name).await;
            if f(&p) {
                return p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name} never {what}: {p:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pod(name: &str, containers: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": containers}})
}

fn sh(name: &str, script: &str) -> Value {
    // A local-only image: ":latest" would mean imagePullPolicy Always, and a pull from a
    // registry this machine cannot reach (ErrImagePull), as on a real node.
    json!({"name": name, "image": BUSYBOX, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c", script]})
}

fn phase(p: &Value) -> &str {
    p["status"]["phase"].as_str().unwrap_or("")
}

fn waiting_reason(p: &Value) -> &str {
    p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_run_with_env_users_messages_and_exit_codes() {
    let c = start().await;
    c.create(
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds"}, "stringData": {"token": "s3cret", "OTHER": "x"}}),
    )
    .await;
    let mut ctr = sh("main", "echo token=$TOKEN other=$OTHER uid=$(id -u) groups=\"$(id -G)\"; printf failed-because > /dev/termination-log; exit 3");
    ctr["env"] = json!([{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]);
    ctr["envFrom"] = json!([{"secretRef": {"name": "creds"}}]);
    let mut p = pod("runs", json!([ctr]));
    p["spec"]["securityContext"] =
        json!({"runAsUser": 1234, "runAsGroup": 1234, "supplementalGroups": [4321]});
    c.create(PODS, p).await;
    let done = c.wait("runs", "Failed", |p| phase(p) == "Failed").await;
    let t = &done["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(t["exitCode"], 3);
    assert_eq!(t["reason"], "Error");
    assert_eq!(t["message"], "failed-because");
    assert_eq!(done["spec"]["nodeName"], "sim-node-1");
    assert!(done["status"]["startTime"].is_string());
    let (code, log) = c.call("GET", &format!("{PODS}/runs/log"), None).await;
    assert_eq!(code, 200);
    assert!(log.contains("token=s3cret other=x uid=1234"), "{log}");
    assert!(log.contains("4321"), "supplemental group: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_config_and_images_keep_pods_waiting_with_the_real_reasons() {
    let c = start().await;
    let mut ctr = sh("main", "echo $X");
    ctr["env"] =
        json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "x"}}}]);
    c.create(PODS, pod("config", json!([ctr]))).await;
    c.create(
        PODS,
        pod(
            "image",
            json!([{"name": "main", "image": "127.0.0.1:5000/kubesim/no-such-image:1"}]),
        ),
    )
    .await;
    c.create(
        PODS,
        pod(
            "badname",
            json!([{"name": "main", "image": "Not/A Valid:Name"}]),
        ),
    )
    .await;
    let mut priv_ctr = sh("dind", "true");
    priv_ctr["securityContext"] = json!({"privileged": true});
    c.create(PODS, pod("privileged", json!([priv_ctr]))).await;
    let p = c
        .wait("config", "CreateContainerConfigError", |p| {
            waiting_reason(p) == "CreateContainerConfigError"
        })
        .await;
    assert_eq!(phase(&p), "Pending");
    assert!(
        p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("\"later\" not found")
    );
    c.wait("image", "ErrImagePull", |p| {
        waiting_reason(p) == "ErrImagePull" || waiting_reason(p) == "ImagePullBackOff"
    })
    .await;
    c.wait("badname", "InvalidImageName", |p| {
        waiting_reason(p) == "InvalidImageName"
    })
    .await;
    let p = c
        .wait("privileged", "CreateContainerError", |p| {
            waiting_reason(p) == "CreateContainerError"
        })
        .await;
    assert!(
        p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("privileged")
    );
    // The missing Secret appears: the pod starts and completes.
    c.create(
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "later"}, "stringData": {"x": "1"}}),
    )
    .await;
    c.wait("config", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn init_containers_sidecars_deadlines_deletion_and_logs() {
    let c = start().await;
    // An init container, a native sidecar (stopped when main ends), a main container
    // that reads what the init container left in a shared emptyDir.
    let mut init = sh("init", "echo from-init > /shared/f");
    init["volumeMounts"] = json!([{"name": "shared", "mountPath": "/shared"}]);
    let mut sidecar = sh("sidecar", "sleep 600");
    sidecar["restartPolicy"] = json!("Always");
    let mut main = sh(
        "main",
        "cat /shared/f; for i in 1 2 3; do echo line-$i; sleep 0.3; done",
    );
    main["volumeMounts"] = json!([{"name": "shared", "mountPath": "/shared"}]);
    let mut p = pod("withinit", json!([main]));
    p["spec"]["initContainers"] = json!([init, sidecar]);
    p["spec"]["volumes"] = json!([{"name": "shared", "emptyDir": {}}]);
    c.create(PODS, p).await;
    // A deadline, and a pod deleted while running.
    let mut p = pod("deadline", json!([sh("main", "sleep 60")]));
    p["spec"]["activeDeadlineSeconds"] = json!(2);
    c.create(PODS, p).await;
    c.create(PODS, pod("deleted", json!([sh("main", "sleep 60")])))
        .await;

    c.wait("withinit", "Running", |p| phase(p) == "Running")
        .await;
    let (code, followed) = c
        .call(
            "GET",
            &format!("{PODS}/withinit/log?container=main&follow=true"),
            None,
        )
        .await;
    assert_eq!(code, 200);
    assert!(
        followed.contains("from-init") && followed.contains("line-3"),
        "{followed}"
    );
    let done = c
        .wait("withinit", "Succeeded", |p| phase(p) == "Succeeded")
        .await;
    let side = &done["status"]["initContainerStatuses"][1];
    assert_eq!(side["name"], "sidecar");
    assert!(
        side["state"]["terminated"].is_object(),
        "sidecar stopped: {done:#}"
    );
    let (_, tail) = c
        .call(
            "GET",
            &format!("{PODS}/withinit/log?container=main&tailLines=1"),
            None,
        )
        .await;
    assert_eq!(tail.trim(), "line-3");
    let (code, _) = c.call("GET", &format!("{PODS}/withinit/log"), None).await;
    assert_eq!(code, 200, "one main container: no container name needed");

    let p = c
        .wait("deadline", "DeadlineExceeded", |p| {
            p["status"]["reason"] == "DeadlineExceeded"
        })
        .await;
    assert_eq!(phase(&p), "Failed");

    c.wait("deleted", "Running", |p| phase(p) == "Running")
        .await;
    let (code, body) = c.call("DELETE", &format!("{PODS}/deleted"), None).await;
    assert_eq!(code, 200);
    let obj: Value = serde_json::from_str(&body).unwrap();
    assert!(
        obj["metadata"]["deletionTimestamp"].is_string(),
        "graceful: {obj:#}"
    );
    let start = Instant::now();
    while c.call("GET", &format!("{PODS}/deleted"), None).await.0 != 404 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the kubelet never finished the deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = c.call("GET", &format!("{PODS}/deleted/log"), None).await;
    assert_eq!(code, 404, "logs go with the pod");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_faults_evict_oom_kill_and_lose_pods() {
    let c = start().await;
    for n in ["evicted", "oom", "lost"] {
        c.create(PODS, pod(n, json!([sh("main", "sleep 60")])))
            .await;
    }
    for n in ["evicted", "oom", "lost"] {
        c.wait(n, "Running", |p| phase(p) == "Running").await;
    }
    c.sim.evict("default", "evicted").await.unwrap();
    c.sim.oom_kill("default", "oom").await.unwrap();
    c.sim.lose_node("default", "lost").await.unwrap();
    let p = c
        .wait("evicted", "Evicted", |p| p["status"]["reason"] == "Evicted")
        .await;
    assert_eq!(phase(&p), "Failed");
    let dt = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "DisruptionTarget")
        .cloned()
        .unwrap();
    assert_eq!(dt["reason"], "TerminationByKubelet");
    let p = c.wait("oom", "OOMKilled", |p| phase(p) == "Failed").await;
    let t = &p["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(137), Some("OOMKilled"))
    );
    // The lost pod: still Running, and a delete leaves it Terminating.
    let (code, _) = c.call("DELETE", &format!("{PODS}/lost"), None).await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = c.pod("lost").await;
    assert_eq!(phase(&p), "Running");
    assert!(p["metadata"]["deletionTimestamp"].is_string());
}

/// A pod's log without `follow` comes as dockerd reads it, all of it (here 16 MiB), and
/// `limitBytes` cuts it at exactly that many bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_log_is_served_whole_and_limit_bytes_cuts_it_exactly() {
    let c = start().await;
    // 16 MiB in lines of 64 bytes, then the container waits.
    let script = "yes 012345678901234567890123456789012345678901234567890123456789012 | head -c 16777216; sleep 600";
    c.create(PODS, pod("chatty", json!([sh("main", script)])))
        .await;
    c.wait("chatty", "Running", |p| phase(p) == "Running").await;
    let url = format!("http://{}{PODS}/chatty/log", c.sim.addr());
    let start = Instant::now();
    let len = loop {
        let resp = c
            .http
            .get(&url)
            .bearer_auth(&c.sim.shared.token)
            .send()
            .await
            .expect("log");
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await.expect("the whole log");
        if body.len() >= 16 << 20 || start.elapsed() > Duration::from_secs(60) {
            assert!(body.chunks(64).all(|l| l.ends_with(b"\n")));
            break body.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(len, 16 << 20);
    let (code, cut) = c
        .call("GET", &format!("{PODS}/chatty/log?limitBytes=1000"), None)
        .await;
    assert_eq!((code, cut.len()), (200, 1000));
}
