//! The simulator's API semantics, over HTTP as a client sees them: metadata, optimistic
//! concurrency, no-op writes, the status subresource, server-side apply ownership, watch
//! resume and 410, finalizers, garbage collection, patches, lists, Table, faults.
//! Plain HTTP and the instant kubelet: no dockerd needed, each test takes milliseconds.

use kubesim::{KubeletMode, Matcher, Sim, SimConfig};
use serde_json::{json, Value};
use std::time::Duration;

struct C {
    sim: Sim,
    http: reqwest::Client,
}

const W: &str = "/apis/example.com/v1/namespaces/default/widgets";

async fn start() -> C {
    let sim = Sim::start(SimConfig {
        tls: false,
        kubelet: KubeletMode::Instant,
        history_limit: 1000,
        bookmark_seconds: 1,
        ..Default::default()
    })
    .await
    .expect("sim");
    let c = C {
        sim,
        http: reqwest::Client::new(),
    };
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                                             {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                                             {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]}]}});
    let (code, _) = c
        .call(
            "PATCH",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com?fieldManager=test",
            Some("application/apply-patch+yaml"),
            Some(crd),
        )
        .await;
    assert_eq!(code, 201);
    c
}

fn widget(name: &str, size: i64) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {"size": size}})
}

fn rv(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion is a string")
        .parse()
        .unwrap()
}

impl C {
    async fn call(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("http://{}{path}", self.sim.addr());
        let mut r = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(&self.sim.shared.token);
        if let Some(b) = body {
            r = r
                .header("content-type", ct.unwrap_or("application/json"))
                .body(serde_json::to_vec(&b).unwrap());
        }
        let resp = r.send().await.expect("request");
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, None).await
    }
    /// `call`, with the `Warning` headers of the answer.
    async fn call_warned(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Value,
    ) -> (u16, Vec<String>, Value) {
        let url = format!("http://{}{path}", self.sim.addr());
        let resp = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(&self.sim.shared.token)
            .header("content-type", ct.unwrap_or("application/json"))
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .expect("request");
        let code = resp.status().as_u16();
        let warnings = resp
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_string())
            .collect();
        (code, warnings, resp.json().await.unwrap_or(Value::Null))
    }
    async fn post(&self, path: &str, b: Value) -> (u16, Value) {
        self.call("POST", path, None, Some(b)).await
    }
    async fn apply(&self, path: &str, manager: &str, force: bool, b: Value) -> (u16, Value) {
        let p = format!("{path}?fieldManager={manager}&force={force}");
        self.call("PATCH", &p, Some("application/apply-patch+yaml"), Some(b))
            .await
    }
    async fn merge(&self, path: &str, b: Value) -> (u16, Value) {
        self.call("PATCH", path, Some("application/merge-patch+json"), Some(b))
            .await
    }
    /// Reads watch events for `wait` (or until `n` arrived).
    async fn watch(&self, path: &str, n: usize, wait: Duration) -> Vec<Value> {
        let url = format!("http://{}{path}", self.sim.addr());
        let mut resp = self
            .http
            .get(url)
            .bearer_auth(&self.sim.shared.token)
            .send()
            .await
            .expect("watch");
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while events.len() < n {
            match tokio::time::timeout_at(deadline, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    buf.extend_from_slice(&chunk);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        events.push(serde_json::from_slice(&line).expect("event JSON"));
                    }
                }
                _ => break,
            }
        }
        events
    }
}

#[tokio::test]
async fn create_sets_server_metadata_and_refuses_what_the_real_server_refuses() {
    let c = start().await;
    let (code, o) = c.post(W, widget("a", 1)).await;
    assert_eq!(code, 201);
    assert!(o["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert_eq!(o["metadata"]["generation"], 1);
    assert_eq!(o["metadata"]["namespace"], "default");
    assert!(o["metadata"]["creationTimestamp"].is_string());
    let (code, e) = c.post(W, widget("a", 1)).await;
    assert_eq!((code, e["reason"].as_str()), (409, Some("AlreadyExists")));
    assert_eq!(e["kind"], "Status");
    let mut other = widget("b", 1);
    other["metadata"]["namespace"] = json!("elsewhere");
    assert_eq!(c.post(W, other).await.0, 400);
    let (code, e) = c
        .post(
            "/apis/example.com/v1/namespaces/nope/widgets",
            widget("c", 1),
        )
        .await;
    assert_eq!((code, e["reason"].as_str()), (404, Some("NotFound")));
    let (code, o) = c
        .post(W, json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"generateName": "gen-"}, "spec": {}}))
        .await;
    assert_eq!(code, 201);
    assert!(o["metadata"]["name"].as_str().unwrap().starts_with("gen-"));
    let (code, e) = c.get(&format!("{W}/missing")).await;
    assert_eq!((code, e["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(e["message"], "widgets.example.com \"missing\" not found");
}

#[tokio::test]
async fn stale_updates_conflict_and_no_op_writes_change_nothing() {
    let c = start().await;
    let (_, o) = c.post(W, widget("a", 1)).await;
    let mut newer = o.clone();
    newer["spec"]["size"] = json!(2);
    let (code, updated) = c
        .call("PUT", &format!("{W}/a"), None, Some(newer.clone()))
        .await;
    assert_eq!(code, 200);
    assert!(rv(&updated) > rv(&o));
    assert_eq!(updated["metadata"]["generation"], 2);
    // The same body again carries the old resourceVersion: 409 Conflict.
    let (code, e) = c.call("PUT", &format!("{W}/a"), None, Some(newer)).await;
    assert_eq!((code, e["reason"].as_str()), (409, Some("Conflict")));
    // A custom resource cannot be updated without a resourceVersion.
    assert_eq!(
        c.call("PUT", &format!("{W}/a"), None, Some(widget("a", 3)))
            .await
            .0,
        422
    );
    // A merge patch that changes nothing: same resourceVersion, no event.
    let (code, same) = c
        .merge(&format!("{W}/a"), json!({"spec": {"size": 2}}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(rv(&same), rv(&updated));
    let events = c
        .watch(
            &format!("{W}?watch=true&resourceVersion={}", rv(&updated)),
            1,
            Duration::from_millis(300),
        )
        .await;
    assert!(events.is_empty(), "{events:?}");
    // A merge patch carrying a stale resourceVersion is a precondition.
    let (code, _) = c
        .merge(&format!("{W}/a"), json!({"metadata": {"resourceVersion": o["metadata"]["resourceVersion"]}, "spec": {"size": 5}}))
        .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn status_subresource_separates_spec_and_status() {
    let c = start().await;
    let mut w = widget("a", 1);
    w["status"] = json!({"phase": "Ignored"});
    let (_, o) = c.post(W, w).await;
    assert!(o["status"].is_null(), "status is not set on create: {o}");
    let (_, o) = c
        .merge(&format!("{W}/a"), json!({"status": {"phase": "X"}}))
        .await;
    assert!(o["status"].is_null(), "the main resource ignores status");
    let (code, s) = c
        .merge(
            &format!("{W}/a/status"),
            json!({"spec": {"size": 9}, "status": {"phase": "Running"}}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(s["status"]["phase"], "Running");
    assert_eq!(s["spec"]["size"], 1, "/status changes only status");
    assert_eq!(
        s["metadata"]["generation"], 1,
        "status changes do not bump generation"
    );
    let (code, _) = c
        .apply(&format!("{W}/zz/status"), "ctl", true, json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "zz"}, "status": {"phase": "A"}}))
        .await;
    assert_eq!(code, 404, "apply to a missing object's status");
}

#[tokio::test]
async fn server_side_apply_tracks_ownership() {
    let c = start().await;
    let path = format!("{W}/a");
    let base = |spec: Value| json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "a"}, "spec": spec});
    let (code, o) = c
        .apply(
            &path,
            "alice",
            false,
            base(json!({"size": 1, "color": "red"})),
        )
        .await;
    assert_eq!(code, 201, "apply creates: {o}");
    assert_eq!(o["metadata"]["managedFields"][0]["manager"], "alice");
    assert_eq!(o["metadata"]["managedFields"][0]["operation"], "Apply");
    assert!(o["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:size"].is_object());
    // Bob applies a different value of alice's field: conflict, unless forced.
    let (code, e) = c.apply(&path, "bob", false, base(json!({"size": 2}))).await;
    assert_eq!((code, e["reason"].as_str()), (409, Some("Conflict")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("alice"));
    let (code, o) = c.apply(&path, "bob", true, base(json!({"size": 2}))).await;
    assert_eq!(code, 200);
    assert_eq!(o["spec"]["size"], 2);
    // Alice stops applying color: nobody else owns it, so it goes.
    let (code, o) = c.apply(&path, "alice", false, base(json!({}))).await;
    assert_eq!(code, 200, "{o}");
    assert!(o["spec"]["color"].is_null(), "{o}");
    assert_eq!(o["spec"]["size"], 2, "bob's field stays");
    // A stale resourceVersion in the applied object is a 409.
    let mut stale = base(json!({"size": 2}));
    stale["metadata"]["resourceVersion"] = json!("1");
    assert_eq!(c.apply(&path, "bob", false, stale).await.0, 409);
    // An update (PUT/merge) takes ownership of what it changes.
    let (_, o) = c.merge(&path, json!({"spec": {"size": 3}})).await;
    let managers: Vec<&str> = o["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(
        !managers.contains(&"bob"),
        "bob lost size to the updater: {managers:?}"
    );
    // No fieldManager: 400.
    let (code, _) = c
        .call(
            "PATCH",
            &path,
            Some("application/apply-patch+yaml"),
            Some(base(json!({}))),
        )
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn patches_follow_the_real_media_types() {
    let c = start().await;
    c.post(W, widget("a", 1)).await;
    let path = format!("{W}/a");
    let (code, e) = c
        .call(
            "PATCH",
            &path,
            Some("application/strategic-merge-patch+json"),
            Some(json!({"spec": {}})),
        )
        .await;
    assert_eq!(
        (code, e["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, o) = c
        .call("PATCH", &path, Some("application/json-patch+json"), Some(json!([{"op": "test", "path": "/spec/size", "value": 1}, {"op": "replace", "path": "/spec/size", "value": 4}])))
        .await;
    assert_eq!((code, o["spec"]["size"].as_i64()), (200, Some(4)));
    let (code, _) = c
        .call(
            "PATCH",
            &path,
            Some("application/json-patch+json"),
            Some(json!([{"op": "test", "path": "/spec/size", "value": 1}])),
        )
        .await;
    assert_eq!(code, 422, "a failed test op");
}

#[tokio::test]
async fn watch_resumes_from_a_version_and_says_410_when_it_is_gone() {
    let c = start().await;
    let (_, a) = c.post(W, widget("a", 1)).await;
    let (_, _b) = c.post(W, widget("b", 1)).await;
    c.merge(&format!("{W}/a"), json!({"spec": {"size": 2}}))
        .await;
    // From "0": the current state as ADDED.
    let ev = c
        .watch(
            &format!("{W}?watch=true&resourceVersion=0"),
            2,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| e["type"] == "ADDED"));
    // From a's creation: b ADDED, then a MODIFIED, in order.
    let ev = c
        .watch(
            &format!("{W}?watch=true&resourceVersion={}", rv(&a)),
            2,
            Duration::from_secs(2),
        )
        .await;
    let kinds: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds, [("ADDED", "b"), ("MODIFIED", "a")]);
    // Bookmarks when allowed.
    let ev = c
        .watch(
            &format!(
                "{W}?watch=true&resourceVersion={}&allowWatchBookmarks=true",
                rv(&a) + 100
            ),
            1,
            Duration::from_secs(3),
        )
        .await;
    assert_eq!(
        ev.first().map(|e| e["type"].clone()),
        Some(json!("BOOKMARK"))
    );
    // Compacted history: one ERROR event with a 410 Status.
    c.sim.compact();
    let ev = c
        .watch(
            &format!("{W}?watch=true&resourceVersion={}", rv(&a)),
            1,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    // A label selector sees a label change as ADDED / DELETED.
    let wpath = format!(
        "{W}?watch=true&labelSelector=team%3Dblue&resourceVersion={}",
        c.sim.store().current_rv()
    );
    let watch = c.watch(&wpath, 2, Duration::from_secs(2));
    let writes = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.merge(
            &format!("{W}/b"),
            json!({"metadata": {"labels": {"team": "blue"}}}),
        )
        .await;
        c.merge(
            &format!("{W}/b"),
            json!({"metadata": {"labels": {"team": "red"}}}),
        )
        .await;
    };
    let (ev, _) = tokio::join!(watch, writes);
    let kinds: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ADDED", "DELETED"]);
}

#[tokio::test]
async fn finalizers_hold_deletion_and_garbage_collection_follows_owners() {
    let c = start().await;
    let mut w = widget("a", 1);
    w["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
    let (_, owner) = c.post(W, w).await;
    let dep = |name: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name,
        "ownerReferences": [{"apiVersion": "example.com/v1", "kind": "Widget", "name": "a", "uid": owner["metadata"]["uid"]}]}})
    };
    let cms = "/api/v1/namespaces/default/configmaps";
    assert_eq!(c.post(cms, dep("child")).await.0, 201);
    let (code, o) = c.call("DELETE", &format!("{W}/a"), None, None).await;
    assert_eq!(code, 200);
    assert!(o["metadata"]["deletionTimestamp"].is_string(), "{o}");
    assert_eq!(o["metadata"]["generation"], 2);
    assert_eq!(
        c.get(&format!("{W}/a")).await.0,
        200,
        "held by its finalizer"
    );
    let (code, _) = c
        .merge(
            &format!("{W}/a"),
            json!({"metadata": {"finalizers": ["example.com/other"]}}),
        )
        .await;
    assert_eq!(code, 422, "no new finalizers while deleting");
    c.merge(&format!("{W}/a"), json!({"metadata": {"finalizers": null}}))
        .await;
    assert_eq!(c.get(&format!("{W}/a")).await.0, 404);
    let mut gone = false;
    for _ in 0..50 {
        if c.get(&format!("{cms}/child")).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the dependent was garbage-collected");
    // Orphan propagation keeps dependents and strips the reference.
    let (_, owner) = c.post(W, widget("b", 1)).await;
    let mut d = dep("kept");
    d["metadata"]["ownerReferences"][0]["uid"] = owner["metadata"]["uid"].clone();
    d["metadata"]["ownerReferences"][0]["name"] = json!("b");
    c.post(cms, d).await;
    c.call(
        "DELETE",
        &format!("{W}/b"),
        None,
        Some(json!({"propagationPolicy": "Orphan"})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, kept) = c.get(&format!("{cms}/kept")).await;
    assert_eq!(code, 200);
    assert!(
        kept["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{kept}"
    );
    // Delete preconditions.
    let (code, _) = c
        .call(
            "DELETE",
            &format!("{cms}/kept"),
            None,
            Some(json!({"preconditions": {"uid": "not-it"}})),
        )
        .await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn lists_select_and_page() {
    let c = start().await;
    for i in 0..5 {
        let mut w = widget(&format!("w{i}"), i);
        w["metadata"]["labels"] = json!({"parity": if i % 2 == 0 { "even" } else { "odd" }});
        c.post(W, w).await;
    }
    let (_, l) = c.get(&format!("{W}?labelSelector=parity%3Deven")).await;
    assert_eq!(l["items"].as_array().unwrap().len(), 3);
    assert_eq!(l["kind"], "WidgetList");
    let (_, l) = c
        .get(&format!("{W}?labelSelector=parity%20notin%20(even)"))
        .await;
    assert_eq!(l["items"].as_array().unwrap().len(), 2);
    let (_, p1) = c.get(&format!("{W}?limit=2")).await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    assert_eq!(p1["metadata"]["remainingItemCount"], 3);
    let tok = p1["metadata"]["continue"].as_str().unwrap();
    let (_, p2) = c.get(&format!("{W}?limit=10&continue={tok}")).await;
    let names: Vec<&str> = p2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["w2", "w3", "w4"]);
    let (code, _) = c
        .get(&format!("{W}?fieldSelector=status.phase%3DRunning"))
        .await;
    assert_eq!(code, 400, "field selectors the server does not index");
    let (code, l) = c
        .get(&format!("{W}?fieldSelector=metadata.name%3Dw1"))
        .await;
    assert_eq!((code, l["items"].as_array().unwrap().len()), (200, 1));
}

#[tokio::test]
async fn tables_show_printer_columns() {
    let c = start().await;
    c.post(W, widget("a", 7)).await;
    let url = format!("http://{}{W}", c.sim.addr());
    let t: Value = c
        .http
        .get(url)
        .bearer_auth(&c.sim.shared.token)
        .header(
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Name", "Size", "Phase", "Age"]);
    assert_eq!(t["rows"][0]["cells"][0], "a");
    assert_eq!(t["rows"][0]["cells"][1], 7);
    assert!(t["rows"][0]["cells"][3].as_str().unwrap().ends_with('s'));
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
}

#[tokio::test]
async fn pods_bind_complete_and_obey_admission_and_faults() {
    let c = start().await;
    c.sim.set_instant_message(r#"{"status":"ok"}"#);
    let pods = "/api/v1/namespaces/default/pods";
    let pod = |name: &str, privileged: bool| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "worker", "image": "x:1", "securityContext": {"privileged": privileged}}]}})
    };
    c.sim.set_refuse_privileged(true);
    let (code, e) = c.post(pods, pod("p0", true)).await;
    assert_eq!((code, e["reason"].as_str()), (403, Some("Forbidden")));
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("violates PodSecurity \"baseline:latest\": privileged"));
    c.sim.set_refuse_privileged(false);
    // Injected errors answer the next matching call once.
    c.sim
        .inject(Matcher::new("create", "pods"), 500, "InternalError");
    assert_eq!(c.post(pods, pod("p1", false)).await.0, 500);
    assert_eq!(c.post(pods, pod("p1", false)).await.0, 201);
    let mut done = Value::Null;
    for _ in 0..50 {
        let (_, p) = c.get(&format!("{pods}/p1")).await;
        if p["status"]["phase"] == "Succeeded" {
            done = p;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(done["spec"]["nodeName"], "sim-node-1");
    assert_eq!(
        done["status"]["containerStatuses"][0]["state"]["terminated"]["message"],
        r#"{"status":"ok"}"#
    );
    let (_, l) = c
        .get(&format!("{pods}?fieldSelector=status.phase%3DSucceeded"))
        .await;
    assert_eq!(l["items"].as_array().unwrap().len(), 1);
    // Unschedulable: PodScheduled False with the scheduler's message.
    c.sim.set_unschedulable(true);
    c.post(pods, pod("p2", false)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, p) = c.get(&format!("{pods}/p2")).await;
    let cond = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap();
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("Unschedulable"))
    );
    assert_eq!(p["status"]["phase"], "Pending");
    // An unbound pod goes at once on delete.
    let (code, _) = c.call("DELETE", &format!("{pods}/p2"), None, None).await;
    assert_eq!(code, 200);
    assert_eq!(c.get(&format!("{pods}/p2")).await.0, 404);
    // Counters: list and watch calls are counted per resource.
    c.get(pods).await;
    let counts = c.sim.counters();
    assert_eq!(counts.get("list pods"), Some(&2));
    assert!(counts.get("create pods").is_some_and(|n| *n >= 3));
}

#[tokio::test]
async fn a_black_hole_holds_calls_until_cleared() {
    let c = start().await;
    c.sim.black_hole(Matcher::new("get", "widgets").name("a"));
    let held = tokio::time::timeout(Duration::from_millis(300), c.get(&format!("{W}/a"))).await;
    assert!(held.is_err(), "no answer while black-holed");
    let other = c.get(&format!("{W}/b")).await;
    assert_eq!(other.0, 404, "other names answer");
    let apath = format!("{W}/a");
    let pending = c.get(&apath);
    let clear = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.sim.clear_black_holes();
    };
    let ((code, _), _) = tokio::join!(pending, clear);
    assert_eq!(code, 404);
}

#[tokio::test]
async fn malformed_bodies_are_400_never_a_crash() {
    let c = start().await;
    c.post(W, widget("a", 1)).await;
    for bad in [
        json!("a string"),
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": "x"}),
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "b", "labels": [1]}}),
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "b"}, "spec": 5}),
    ] {
        assert_eq!(c.post(W, bad.clone()).await.0, 400, "{bad}");
        let (code, _) = c.apply(&format!("{W}/b"), "m", true, bad.clone()).await;
        assert_eq!(code, 400, "apply {bad}");
    }
    let (code, _) = c.merge(&format!("{W}/a"), json!({"metadata": "x"})).await;
    assert_eq!(code, 400);
    let (code, _) = c
        .post("/api/v1/namespaces/default/pods", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [1]}}))
        .await;
    assert_eq!(code, 400);
    // Still serving.
    assert_eq!(c.get(&format!("{W}/a")).await.0, 200);
}

const G: &str = "/apis/example.com/v1/namespaces/default/gadgets";
const GCRD: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.example.com";

/// A CRD with a structural schema (no preserve-unknown-fields at the root): `spec.size`,
/// a map of strings, a list of named parts, a nested object, a free-form `config`; status
/// with a phase and a map of counts. `extra`: more spec properties.
fn gadget_crd(extra: Value) -> Value {
    let mut spec = json!({
        "size": {"type": "integer"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "parts": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "nested": {"type": "object", "properties": {"a": {"type": "string"}}},
        "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                   "properties": {"typed": {"type": "object", "properties": {"k": {"type": "string"}}}}},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    json!({
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.example.com"},
    "spec": {"group": "example.com", "scope": "Namespaced",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": spec},
                "status": {"type": "object", "properties": {
                    "phase": {"type": "string"},
                    "counts": {"type": "object", "additionalProperties": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                }},
            }}}}]}})
}

async fn with_gadgets() -> C {
    let c = start().await;
    let (code, _) = c.apply(GCRD, "test", true, gadget_crd(json!({}))).await;
    assert_eq!(code, 201);
    c
}

fn gadget(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Gadget",
           "metadata": {"name": name, "labels": {"l": "1"}, "annotations": {"a": "1"}}, "spec": spec})
}

fn warned(paths: &[&str]) -> Vec<String> {
    paths
        .iter()
        .map(|p| format!("299 - \"unknown field \\\"{p}\\\"\""))
        .collect()
}

#[tokio::test]
async fn writes_drop_what_the_schema_does_not_declare_main_resource() {
    let c = with_gadgets().await;
    // Create: unknown fields go, at any depth; maps keep their keys, each value pruned by
    // the map's schema; a preserve-unknown-fields subtree keeps everything but what its own
    // declared properties do not declare; metadata, apiVersion and kind stay.
    let (code, warnings, o) = c
        .call_warned(
            "POST",
            G,
            None,
            gadget(
                "a",
                json!({"size": 1, "foo": true, "labels": {"x": "1"}, "parts": [{"name": "p", "weight": 3}],
                       "nested": {"a": "1", "b": "2"},
                       "config": {"anything": {"deep": [1]}, "typed": {"k": "v", "z": 1}}}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{o}");
    let want = json!({"size": 1, "labels": {"x": "1"}, "parts": [{"name": "p"}],
                      "nested": {"a": "1"}, "config": {"anything": {"deep": [1]}, "typed": {"k": "v"}}});
    assert_eq!(o["spec"], want);
    assert_eq!(
        (o["apiVersion"].as_str(), o["kind"].as_str()),
        (Some("example.com/v1"), Some("Gadget"))
    );
    assert_eq!(o["metadata"]["labels"], json!({"l": "1"}));
    assert_eq!(o["metadata"]["annotations"], json!({"a": "1"}));
    let mut warnings = warnings;
    warnings.sort();
    assert_eq!(
        warnings,
        warned(&[
            "spec.config.typed.z",
            "spec.foo",
            "spec.nested.b",
            "spec.parts[0].weight"
        ])
    );
    assert_eq!(
        c.get(&format!("{G}/a")).await.1["spec"],
        want,
        "stored pruned"
    );

    // Replace (PUT), merge patch, JSON patch, server-side apply: the same.
    let mut put = o.clone();
    put["spec"]["bar"] = json!(1);
    let (code, warnings, o) = c.call_warned("PUT", &format!("{G}/a"), None, put).await;
    assert_eq!((code, warnings), (200, warned(&["spec.bar"])));
    assert!(o["spec"]["bar"].is_null(), "{o}");
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a"),
            Some("application/merge-patch+json"),
            json!({"spec": {"size": 2, "baz": 1, "nested": {"c": 1}}}),
        )
        .await;
    assert_eq!(
        (code, warnings),
        (200, warned(&["spec.baz", "spec.nested.c"]))
    );
    assert_eq!(o["spec"]["size"], 2);
    assert!(o["spec"]["baz"].is_null() && o["spec"]["nested"]["c"].is_null());
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a"),
            Some("application/json-patch+json"),
            json!([{"op": "add", "path": "/spec/qux", "value": 1}, {"op": "replace", "path": "/spec/size", "value": 3}]),
        )
        .await;
    assert_eq!((code, warnings), (200, warned(&["spec.qux"])));
    assert_eq!(
        (o["spec"]["size"].as_i64(), o["spec"]["qux"].is_null()),
        (Some(3), true)
    );
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a?fieldManager=ctl&force=true"),
            Some("application/apply-patch+yaml"),
            gadget("a", json!({"size": 4, "applied": "x"})),
        )
        .await;
    assert_eq!((code, warnings), (200, warned(&["spec.applied"])));
    assert_eq!(o["spec"]["size"], 4);
    assert!(o["spec"]["applied"].is_null());
    let ctl = o["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["manager"] == "ctl")
        .cloned()
        .unwrap();
    assert!(
        ctl["fieldsV1"]["f:spec"]["f:applied"].is_null(),
        "a pruned field is nobody's: {ctl}"
    );
    // Apply creates: pruned too.
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/b?fieldManager=ctl"),
            Some("application/apply-patch+yaml"),
            gadget("b", json!({"size": 1, "new": 1})),
        )
        .await;
    assert_eq!((code, warnings), (201, warned(&["spec.new"])));
    assert_eq!(o["spec"], json!({"size": 1}));
    // A CRD without a structural schema at the root (widgets preserve unknown fields) keeps
    // everything.
    let (code, warnings, o) = c
        .call_warned("POST", W, None, json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"anything": {"x": 1}}}))
        .await;
    assert_eq!((code, warnings.len()), (201, 0));
    assert_eq!(o["spec"]["anything"]["x"], 1);
}

#[tokio::test]
async fn writes_drop_what_the_schema_does_not_declare_status() {
    let c = with_gadgets().await;
    c.post(G, gadget("a", json!({"size": 1}))).await;
    let status = format!("{G}/a/status");
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &status,
            Some("application/merge-patch+json"),
            json!({"status": {"phase": "Running", "logEnded": true, "counts": {"x": {"n": 1, "m": 2}}}}),
        )
        .await;
    assert_eq!(code, 200, "{o}");
    assert_eq!(
        o["status"],
        json!({"phase": "Running", "counts": {"x": {"n": 1}}})
    );
    let mut warnings = warnings;
    warnings.sort();
    assert_eq!(warnings, warned(&["status.counts.x.m", "status.logEnded"]));
    // Server-side apply of status, as a controller writes it.
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{status}?fieldManager=ctl&force=true"),
            Some("application/apply-patch+yaml"),
            json!({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "a"},
                   "status": {"phase": "Failed", "logEnded": false}}),
        )
        .await;
    assert_eq!((code, warnings), (200, warned(&["status.logEnded"])));
    assert_eq!(o["status"]["phase"], "Failed");
    assert!(o["status"]["logEnded"].is_null(), "{o}");
    // PUT on /status.
    let mut put = o.clone();
    put["status"]["other"] = json!(1);
    let (code, warnings, o) = c.call_warned("PUT", &status, None, put).await;
    assert_eq!((code, warnings), (200, warned(&["status.other"])));
    assert!(o["status"]["other"].is_null());
    assert_eq!(
        c.get(&format!("{G}/a")).await.1["status"]["phase"],
        "Failed"
    );
}

#[tokio::test]
async fn strict_field_validation_refuses_unknown_fields_ignore_drops_them_silently() {
    let c = with_gadgets().await;
    let (code, e) = c
        .post(
            &format!("{G}?fieldValidation=Strict"),
            gadget("a", json!({"size": 1, "foo": 1, "nested": {"b": 1}})),
        )
        .await;
    assert_eq!(
        (code, e["reason"].as_str()),
        (400, Some("BadRequest")),
        "{e}"
    );
    let msg = e["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("strict decoding error: ")
            && msg.contains(r#"unknown field "spec.foo""#)
            && msg.contains(r#"unknown field "spec.nested.b""#),
        "{msg}"
    );
    assert_eq!(c.get(&format!("{G}/a")).await.0, 404, "nothing created");
    // Declared fields only: Strict is happy.
    let (code, _) = c
        .post(
            &format!("{G}?fieldValidation=Strict"),
            gadget("a", json!({"size": 1})),
        )
        .await;
    assert_eq!(code, 201);
    let (code, e) = c
        .call(
            "PATCH",
            &format!("{G}/a/status?fieldValidation=Strict"),
            Some("application/merge-patch+json"),
            Some(json!({"status": {"phase": "X", "logEnded": true}})),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains(r#"unknown field "status.logEnded""#),
        "{e}"
    );
    assert!(
        c.get(&format!("{G}/a")).await.1["status"].is_null(),
        "nothing written"
    );
    let (code, e) = c
        .call(
            "PATCH",
            &format!("{G}/a?fieldManager=ctl&fieldValidation=Strict"),
            Some("application/apply-patch+yaml"),
            Some(gadget("a", json!({"size": 1, "foo": 1}))),
        )
        .await;
    assert_eq!(code, 400, "{e}");
    // Ignore: dropped, no warning.
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a?fieldValidation=Ignore"),
            Some("application/merge-patch+json"),
            json!({"spec": {"foo": 1, "size": 2}}),
        )
        .await;
    assert_eq!((code, warnings.len()), (200, 0));
    assert_eq!(o["spec"], json!({"size": 2}));
    // Anything else is refused.
    let (code, _) = c
        .merge(&format!("{G}/a?fieldValidation=Loose"), json!({"spec": {}}))
        .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn what_is_kept_follows_the_crd_in_force() {
    let c = with_gadgets().await;
    c.post(G, gadget("a", json!({"size": 1, "color": "red"})))
        .await;
    assert!(c.get(&format!("{G}/a")).await.1["spec"]["color"].is_null());
    // The CRD gains the field: now it is kept.
    let (code, _) = c
        .apply(
            GCRD,
            "test",
            true,
            gadget_crd(json!({"color": {"type": "string"}})),
        )
        .await;
    assert_eq!(code, 200);
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a"),
            Some("application/merge-patch+json"),
            json!({"spec": {"color": "red"}}),
        )
        .await;
    assert_eq!((code, warnings.len()), (200, 0));
    assert_eq!(o["spec"]["color"], "red");
    // It loses it again (an older CRD applied): the stored value goes with the next write,
    // without a warning (the client did not send it).
    c.apply(GCRD, "test", true, gadget_crd(json!({}))).await;
    let (code, warnings, o) = c
        .call_warned(
            "PATCH",
            &format!("{G}/a"),
            Some("application/merge-patch+json"),
            json!({"spec": {"size": 5}}),
        )
        .await;
    assert_eq!((code, warnings.len()), (200, 0));
    assert_eq!(o["spec"], json!({"size": 5}));
}

/// A Secret's data (decoded values, `stringData` merged) may hold at most 1 MiB: 422
/// `data: Too long` on create and on an update or patch past it, as ValidateSecret answers.
#[tokio::test]
async fn a_secret_over_one_mib_is_refused_as_the_real_server_refuses_it() {
    let c = start().await;
    const S: &str = "/api/v1/namespaces/default/secrets";
    let secret = |name: &str, a: usize, b: usize| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
               "data": {"a": base64_of(a), "b": base64_of(b)}})
    };
    let (code, e) = c.post(S, secret("big", 1 << 19, (1 << 19) + 1)).await;
    assert_eq!((code, e["reason"].as_str()), (422, Some("Invalid")), "{e}");
    assert_eq!(
        e["message"],
        "Secret \"big\" is invalid: data: Too long: may not be more than 1048576 bytes"
    );
    assert_eq!(e["details"]["causes"][0]["reason"], "FieldValueTooLong");
    assert_eq!(c.get(&format!("{S}/big")).await.0, 404, "nothing stored");
    // Exactly 1 MiB is fine; growing past it by stringData on a patch is not.
    let (code, _) = c.post(S, secret("full", 1 << 19, 1 << 19)).await;
    assert_eq!(code, 201);
    let (code, e) = c
        .merge(&format!("{S}/full"), json!({"stringData": {"c": "x"}}))
        .await;
    assert_eq!((code, e["reason"].as_str()), (422, Some("Invalid")), "{e}");
}

fn base64_of(n: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n])
}
