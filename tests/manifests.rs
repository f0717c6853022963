//! The Helm chart and the plain manifests: one source (the chart, rendered by `chart::tpl`),
//! typed and strict Kubernetes objects, RBAC exactly as wide as the code's API calls, env vars
//! the binary knows, and the CRD the binary prints.
//!
//! `UPDATE_MANIFESTS=1 cargo test --test manifests` rewrites `manifests/*.yaml`,
//! `charts/buildshuttle/crds/buildjob.yaml` and `charts/buildshuttle/templates/crd.yaml`
//! (both from `crds/buildjob.yaml`); without it any difference fails.

mod chart;

use chart::{chart_dir, documents, manifest, read_yaml, render, root, values, MODES};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use regex::Regex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn updating() -> bool {
    std::env::var_os("UPDATE_MANIFESTS").is_some_and(|v| v == "1")
}

/// Writes `want` to `path` when updating, else fails unless the file holds exactly `want`.
fn check_generated(path: &Path, want: &str) {
    if updating() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}); regenerate with \
             `UPDATE_MANIFESTS=1 cargo test --test manifests` and commit it",
            path.display(),
            line + 1
        );
    }
}

fn manifest_path(file: &str) -> PathBuf {
    root().join("manifests").join(file)
}

fn all_manifest_objects() -> Vec<(String, Value)> {
    MODES
        .iter()
        .flat_map(|(_, file, _)| {
            let text = std::fs::read_to_string(manifest_path(file))
                .unwrap_or_else(|e| panic!("manifests/{file}: {e}"));
            documents(&text)
                .into_iter()
                .map(|d| (file.to_string(), d))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

// ---------------------------------------------------------------------------------------
// One source: the chart renders the manifests and the CRD template comes from crds/.

/// `crds/buildjob.yaml` (the output of `buildshuttle crd`) as the chart's template: gated by
/// `crds.install`, kept on uninstall when `crds.keep`.
fn crd_template(crd: &str) -> String {
    assert!(!crd.contains("{{"), "the CRD holds template syntax");
    let mut out = String::from(
        "{{- if .Values.crds.install }}\n\
         # Generated from crds/buildjob.yaml (`buildshuttle crd`) by\n\
         # `UPDATE_MANIFESTS=1 cargo test --test manifests`; do not edit.\n",
    );
    let mut in_metadata = false;
    let mut inserted = false;
    for line in crd.lines() {
        out.push_str(line);
        out.push('\n');
        if line == "metadata:" {
            in_metadata = true;
        } else if in_metadata && line.starts_with("  name: ") && !inserted {
            out.push_str(
                "  {{- if .Values.crds.keep }}\n  annotations:\n    \
                 helm.sh/resource-policy: keep\n  {{- end }}\n",
            );
            inserted = true;
        }
    }
    assert!(inserted, "no metadata.name in crds/buildjob.yaml");
    out.push_str("{{- end }}\n");
    out
}

fn crds_file() -> String {
    let path = root().join("crds/buildjob.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (it comes with the operator: `buildshuttle crd > crds/buildjob.yaml`)",
            path.display()
        )
    })
}

#[test]
fn chart_crd_template_is_generated_from_crds_buildjob_yaml() {
    check_generated(
        &chart_dir().join("templates/crd.yaml"),
        &crd_template(&crds_file()),
    );
    // The default: helm creates the CRD from the chart's crds/ folder once, and a second
    // release (which finds it there) installs without an ownership conflict.
    check_generated(&chart_dir().join("crds/buildjob.yaml"), &crds_file());
}

#[test]
fn manifests_are_the_chart_rendered_per_mode() {
    for (mode, file, _) in MODES {
        check_generated(&manifest_path(file), &manifest(mode));
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(root().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = MODES.iter().map(|m| m.1.to_string()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "manifests/ holds only generated files");
}

#[test]
fn crd_in_chart_and_manifests_equals_crds_buildjob_yaml() {
    let mut want: Value = serde_yaml::from_str(&crds_file()).unwrap();
    for (file, obj) in all_manifest_objects() {
        if obj["kind"] == "CustomResourceDefinition" {
            assert_eq!(obj, want, "the CRD in manifests/{file}");
        }
    }
    for (mode, file, _) in MODES {
        let text = std::fs::read_to_string(manifest_path(file)).unwrap();
        let n = of_kind(&documents(&text), "CustomResourceDefinition").len();
        assert_eq!(n, 1, "{mode}: one CRD in the plain manifest");
    }
    // The value gates: the CRD is no template by default (a second release must not fight
    // the first over it); with crds.install it is one, kept on uninstall unless crds.keep is
    // false.
    let crd_of = |v: Value| {
        let r = render(&values(&with_bucket(v)), "r", "ns").unwrap();
        documents(&r.iter().find(|(n, _)| n == "crd.yaml").unwrap().1)
    };
    assert!(crd_of(json!({})).is_empty(), "not owned by default");
    let unkept = crd_of(json!({"crds": {"install": true, "keep": false}}));
    assert_eq!(unkept, vec![want.clone()]);
    want["metadata"]["annotations"] = json!({"helm.sh/resource-policy": "keep"});
    assert_eq!(crd_of(json!({"crds": {"install": true}})), vec![want]);
}

// ---------------------------------------------------------------------------------------
// YAML and typed, strict Kubernetes objects.

#[test]
fn every_yaml_file_parses() {
    let mut files = vec![
        chart_dir().join("values.yaml"),
        chart_dir().join("Chart.yaml"),
    ];
    for dir in [root().join("manifests"), chart_dir().join("ci")] {
        for e in std::fs::read_dir(dir).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let docs = documents(&text);
        assert!(!docs.is_empty(), "{} holds no YAML document", f.display());
        for d in docs {
            assert!(
                d.is_object(),
                "{}: a document is not a mapping",
                f.display()
            );
        }
    }
    let v = read_yaml(&chart_dir().join("values.yaml"));
    assert!(["dind", "host", "external"].contains(&v["mode"].as_str().unwrap()));
}

/// `v` without null map entries (an omitted field and a null one mean the same to the API).
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// The first path where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &format!("{path}.{k}")),
                (Some(_), None) => Some(format!("{path}.{k} is not a field of the type")),
                (None, Some(_)) => Some(format!("{path}.{k} appeared")),
                (None, None) => None,
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes into `T` and serializes back: a field `T` does not know (a typo) is dropped
/// by the round trip, a value of the wrong shape fails to deserialize; both fail here.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) -> Result<(), String> {
    let original = without_nulls(obj);
    let typed: T = serde_json::from_value(original.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).unwrap();
    match first_difference(&original, &back, "") {
        None => Ok(()),
        Some(d) => Err(d),
    }
}

fn strict_object(obj: &Value) -> Result<(), String> {
    let api = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    match (api, kind) {
        ("v1", "Namespace") => strict::<Namespace>(obj),
        ("v1", "ServiceAccount") => strict::<ServiceAccount>(obj),
        ("v1", "Secret") => strict::<Secret>(obj),
        ("v1", "Service") => strict::<Service>(obj),
        ("apps/v1", "Deployment") => strict::<Deployment>(obj),
        ("policy/v1", "PodDisruptionBudget") => {
            strict::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(obj)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => strict::<Role>(obj),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => strict::<RoleBinding>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => strict::<ClusterRole>(obj),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => strict::<ClusterRoleBinding>(obj),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            strict::<CustomResourceDefinition>(obj)
        }
        _ => Err(format!(
            "{api} {kind} has no typed check here (add it to strict_object)"
        )),
    }
}

#[test]
fn every_object_is_a_strict_typed_kubernetes_object() {
    let objs = all_manifest_objects();
    for (file, obj) in &objs {
        if let Err(e) = strict_object(obj) {
            panic!(
                "manifests/{file}: {} {}: {e}",
                obj["kind"], obj["metadata"]["name"]
            );
        }
    }
    for (mode, file, _) in MODES {
        let kinds: BTreeSet<String> = objs
            .iter()
            .filter(|(f, _)| f == file)
            .map(|(_, o)| o["kind"].as_str().unwrap().to_string())
            .collect();
        let want: BTreeSet<String> = [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "Secret",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
        ]
        .map(String::from)
        .into();
        assert_eq!(kinds, want, "{mode}: a complete install");
    }
}

#[test]
fn the_strict_check_catches_typos_and_wrong_shapes() {
    let objs = all_manifest_objects();
    let deployment = objs
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    assert_eq!(strict_object(deployment), Ok(()));
    let mut typo = deployment.clone();
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = json!({});
    let e = strict_object(&typo).unwrap_err();
    assert!(e.contains("livenesProbe"), "{e}");
    let mut shape = deployment.clone();
    shape["spec"]["replicas"] = json!("two");
    assert!(strict_object(&shape).is_err());
    let mut kind = deployment.clone();
    kind["kind"] = json!("Deploymnet");
    assert!(strict_object(&kind).is_err());
}

// ---------------------------------------------------------------------------------------
// RBAC: exactly what the code calls.

type Grant = (String, String, String); // (apiGroup, resource[/subresource], verb)

fn grant(group: &str, resource: &str, verb: &str) -> Grant {
    (group.into(), resource.into(), verb.into())
}

/// Where each Rust type the code makes an `Api<T>` of lives in the API.
fn resource_of(ty: &str) -> Option<(&'static str, &'static str)> {
    Some(match ty {
        "BuildJob" => ("buildshuttle.akkeris.io", "buildjobs"),
        "Pod" => ("", "pods"),
        "Secret" | "KubeSecret" => ("", "secrets"),
        "ConfigMap" => ("", "configmaps"),
        "Lease" => ("coordination.k8s.io", "leases"),
        "Event" => ("events.k8s.io", "events"),
        "CustomResourceDefinition" => ("apiextensions.k8s.io", "customresourcedefinitions"),
        _ => return None,
    })
}

/// Resources that are not namespaced: granted by a ClusterRole, never by the Role.
const CLUSTER_SCOPED: &[&str] = &["customresourcedefinitions"];

/// The only cluster-scoped object the service may read: its own CRD.
const CRD_NAME: &str = "buildjobs.buildshuttle.akkeris.io";

/// kube's `Api` methods: (subresource, verb).
fn verb_of(method: &str) -> Option<(&'static str, &'static str)> {
    Some(match method {
        "get" | "get_opt" | "get_metadata" | "get_metadata_opt" => ("", "get"),
        "list" | "list_metadata" => ("", "list"),
        "watch" | "watch_metadata" => ("", "watch"),
        "create" => ("", "create"),
        "patch" | "patch_metadata" => ("", "patch"),
        "replace" => ("", "update"),
        "delete" => ("", "delete"),
        "delete_collection" => ("", "deletecollection"),
        "get_status" => ("status", "get"),
        "patch_status" => ("status", "patch"),
        "replace_status" => ("status", "update"),
        "logs" | "log_stream" => ("log", "get"),
        "evict" => ("eviction", "create"),
        _ => return None,
    })
}

/// The API calls in Rust source (tests excluded), read from the text: every identifier bound
/// to an `Api<T>` (let, field, parameter, `fn x() -> Api<T>`, `let x = Api::<T>::…`), the
/// kube methods called on it, what `Controller::new`/`.owns`/`watcher` watch, and what an
/// events `Recorder` needs.
fn grants_in_source(files: &[(String, String)]) -> Result<BTreeSet<Grant>, String> {
    let bind = Regex::new(r"(\w+)\s*:\s*&?\s*(?:kube::)?Api<(\w+)>").unwrap();
    let bind_fn = Regex::new(r"fn\s+(\w+)\s*\([^)]*\)\s*->\s*(?:kube::)?Api<(\w+)>").unwrap();
    let bind_turbofish = Regex::new(r"let\s+(\w+)\s*=\s*(?:kube::)?Api::<(\w+)>::").unwrap();
    let call = Regex::new(r"\b(\w+)(?:\(\))?\s*\.\s*(\w+)\s*(?:::<[^>]*>)?\(").unwrap();
    // (`reflector(writer, watcher(api, …))`: the Api is the watcher's, not the reflector's.)
    let watched = Regex::new(r"(?:Controller::new|\.owns|\bwatcher)\(\s*(\w+)").unwrap();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for (name, src) in files {
        for c in bind
            .captures_iter(src)
            .chain(bind_fn.captures_iter(src))
            .chain(bind_turbofish.captures_iter(src))
        {
            if let Some(old) = types.insert(c[1].to_string(), c[2].to_string()) {
                if old != c[2] {
                    return Err(format!(
                        "{name}: `{}` is an Api<{old}> and an Api<{}> (rename one so the \
                         RBAC check can tell them apart)",
                        &c[1], &c[2]
                    ));
                }
            }
        }
    }
    let resource = |ty: &str, file: &str| {
        resource_of(ty).ok_or_else(|| {
            format!("{file}: Api<{ty}>: add its group and resource to resource_of()")
        })
    };
    let mut out = BTreeSet::new();
    for (name, src) in files {
        // Overlapping matches: in `self.jobs().patch(`, `jobs` is both a method and a receiver.
        let mut at = 0;
        while let Some(c) = call.captures_at(src, at) {
            at = c.get(2).unwrap().start();
            let (Some(ty), Some((sub, verb))) = (types.get(&c[1]), verb_of(&c[2])) else {
                continue;
            };
            let (group, res) = resource(ty, name)?;
            let res = if sub.is_empty() {
                res.to_string()
            } else {
                format!("{res}/{sub}")
            };
            out.insert(grant(group, &res, verb));
        }
        for c in watched.captures_iter(src) {
            let ty = types
                .get(&c[1])
                .ok_or_else(|| format!("{name}: cannot tell what `{}` watches", &c[1]))?;
            let (group, res) = resource(ty, name)?;
            out.insert(grant(group, res, "list"));
            out.insert(grant(group, res, "watch"));
        }
        if src.contains("Recorder::new(") {
            // kube-runtime's Recorder creates events.k8s.io events and patches their series.
            out.insert(grant("events.k8s.io", "events", "create"));
            out.insert(grant("events.k8s.io", "events", "patch"));
        }
    }
    Ok(out)
}

/// Rust files under `dir` with test-only code left out (`#[cfg(test)] mod x;` files and
/// `#[cfg(test)] mod x { … }` blocks, which sit at the end of a file).
fn source_files(dir: &Path) -> Vec<(String, String)> {
    let test_mod =
        Regex::new(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;").unwrap();
    let test_block = Regex::new(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{").unwrap();
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut skip: BTreeSet<PathBuf> = BTreeSet::new();
    let mut all = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let src = std::fs::read_to_string(&p).unwrap();
                let base = match p.file_stem().unwrap().to_str().unwrap() {
                    "mod" | "lib" | "main" => d.clone(),
                    stem => d.join(stem),
                };
                for c in test_mod.captures_iter(&src) {
                    skip.insert(base.join(format!("{}.rs", &c[1])));
                    skip.insert(base.join(&c[1]).join("mod.rs"));
                }
                all.push((p, src));
            }
        }
    }
    for (p, src) in all {
        if skip.contains(&p) {
            continue;
        }
        let code = match test_block.find(&src) {
            Some(m) => src[..m.start()].to_string(),
            None => src,
        };
        let name = p.strip_prefix(root()).unwrap_or(&p).display().to_string();
        out.push((name, code));
    }
    out.sort();
    out
}

/// The Role's rules of a rendered manifest, one grant per (group, resource, verb). A
/// ClusterRole's rules must each be limited to the BuildJob CRD (`resourceNames`).
fn role_grants(role: &Value) -> BTreeSet<Grant> {
    let cluster = role["kind"] == "ClusterRole";
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .unwrap_or_else(|| panic!("a rule without {k}"))
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        let names = if cluster {
            json!([CRD_NAME])
        } else {
            Value::Null
        };
        assert!(
            rule.get("resourceNames").cloned().unwrap_or(Value::Null) == names
                && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape {rule}"
        );
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    assert!(g != "*" && r != "*" && v != "*", "wildcard in {rule}");
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

#[test]
fn role_grants_exactly_what_the_code_calls() {
    let called = grants_in_source(&source_files(&root().join("src"))).unwrap();
    assert!(
        called.iter().any(|g| g.1 == "buildjobs"),
        "no BuildJob API call found in src/ (is the operator merged?)"
    );
    let (cluster, namespaced): (BTreeSet<Grant>, BTreeSet<Grant>) = called
        .into_iter()
        .partition(|g| CLUSTER_SCOPED.contains(&g.1.as_str()));
    assert!(
        cluster.contains(&grant(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "get"
        )),
        "the CRD check's read is found in src/"
    );
    let objs = all_manifest_objects();
    for (file, obj) in &objs {
        let want = match obj["kind"].as_str() {
            Some("Role") => &namespaced,
            Some("ClusterRole") => &cluster,
            _ => continue,
        };
        let granted = role_grants(obj);
        let missing: Vec<_> = want.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "manifests/{file}: the {} misses {missing:?} and grants unused {extra:?} \
             (edit charts/buildshuttle/templates/rbac.yaml)",
            obj["kind"]
        );
    }
    // Each ClusterRole is bound to the service's account alone, by a ClusterRoleBinding of
    // the same name.
    for (mode, file, _) in MODES {
        let mine: Vec<Value> = objs
            .iter()
            .filter(|(f, _)| f == file)
            .map(|(_, o)| o.clone())
            .collect();
        let roles = of_kind(&mine, "ClusterRole");
        let bindings = of_kind(&mine, "ClusterRoleBinding");
        assert_eq!((roles.len(), bindings.len()), (1, 1), "{mode}");
        let sa = of_kind(&mine, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"]
            .clone();
        let ns = of_kind(&mine, "Deployment")[0]["metadata"]["namespace"].clone();
        let b = bindings[0];
        assert_eq!(
            b["metadata"]["name"], roles[0]["metadata"]["name"],
            "{mode}"
        );
        assert_eq!(
            b["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                   "name": roles[0]["metadata"]["name"]}),
            "{mode}"
        );
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": ns}]),
            "{mode}"
        );
    }
}

#[test]
fn cluster_scoped_names_differ_between_releases_of_one_name_in_two_namespaces() {
    let names = |ns: &str| -> Vec<String> {
        let r = render(&values(&with_bucket(json!({}))), "bs", ns).unwrap();
        r.iter()
            .filter(|(n, _)| n != "NOTES.txt")
            .flat_map(|(_, t)| documents(t))
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding")
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (a, b) = (names("team-a"), names("team-b"));
    assert_eq!(a, ["bs-team-a-crd-reader", "bs-team-a-crd-reader"]);
    assert!(a.iter().all(|n| !b.contains(n)), "{a:?} {b:?}");
}

#[test]
fn the_source_scan_finds_each_kind_of_call() {
    let src = r#"
        fn jobs(&self) -> Api<BuildJob> { Api::namespaced(c, ns) }
        struct L { api: Api<Lease> }
        async fn f(jobs_ref: &Api<BuildJob>, client: Client) {
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let secrets: Api<KubeSecret> = Api::namespaced(client, ns);
            let leases = kube::Api::<Lease>::namespaced(client, ns);
            leases.create(&pp, &l).await;
            self.jobs()
                .patch(name, &pp, &p).await;
            jobs_ref.patch_status(name, &pp, &p).await;
            pods.logs(name, &lp).await;
            secrets.get_opt(name).await;
            self.api.replace(&n, &pp, &l).await;
            let c = Controller::new(jobs_ref, cfg).owns(pods, cfg);
            let r = Recorder::new(client, reporter);
            let m = map.get(&k);
            let crds: Api<CustomResourceDefinition> = Api::all(client);
            crds.get_opt(name).await;
        }
        #[cfg(test)]
        mod tests { fn t(pods: Api<Pod>) { pods.delete_collection(&dp, &lp); } }
    "#;
    let files = source_files_from(src);
    let got = grants_in_source(&files).unwrap();
    let want: BTreeSet<Grant> = [
        grant("buildshuttle.akkeris.io", "buildjobs", "patch"),
        grant("buildshuttle.akkeris.io", "buildjobs/status", "patch"),
        grant("buildshuttle.akkeris.io", "buildjobs", "list"),
        grant("buildshuttle.akkeris.io", "buildjobs", "watch"),
        grant("", "pods", "list"),
        grant("", "pods", "watch"),
        grant("", "pods/log", "get"),
        grant("", "secrets", "get"),
        grant("coordination.k8s.io", "leases", "update"),
        grant("coordination.k8s.io", "leases", "create"),
        grant("events.k8s.io", "events", "create"),
        grant("events.k8s.io", "events", "patch"),
        grant("apiextensions.k8s.io", "customresourcedefinitions", "get"),
    ]
    .into();
    assert_eq!(got, want);
    let unknown = vec![(
        "x.rs".to_string(),
        "let c: Api<Node> = a; c.list(&lp);".to_string(),
    )];
    assert!(grants_in_source(&unknown)
        .unwrap_err()
        .contains("resource_of"));
}

/// A one-file source tree, with the test block cut as `source_files` does.
fn source_files_from(src: &str) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lib.rs"), src).unwrap();
    source_files(dir.path())
}

// ---------------------------------------------------------------------------------------
// The Deployment's args and env are the binary's.

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_buildshuttle"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "buildshuttle {args:?} --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn env_names_in_help(help: &str) -> BTreeSet<String> {
    Regex::new(r"\[env: ([A-Z0-9_]+)")
        .unwrap()
        .captures_iter(help)
        .map(|c| c[1].to_string())
        .collect()
}

#[test]
fn deployment_args_and_env_are_known_to_the_binary() {
    let objs = all_manifest_objects();
    for (mode, file, _) in MODES {
        let mine: Vec<Value> = objs
            .iter()
            .filter(|(f, _)| f == file)
            .map(|(_, o)| o.clone())
            .collect();
        let d = of_kind(&mine, "Deployment")[0];
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args.first(), Some(&"serve"), "{mode}");
        let serve_help = help(&args);
        let known = env_names_in_help(&serve_help);
        assert!(known.contains("USE_KUBERNETES"), "{serve_help}");
        let mut set: BTreeMap<String, String> = BTreeMap::new();
        for e in c["env"].as_array().unwrap() {
            set.insert(e["name"].as_str().unwrap().into(), "env".into());
        }
        // The Secret the container imports whole (envFrom) is also every worker pod's.
        let secret_name = c["envFrom"][0]["secretRef"]["name"].as_str().unwrap();
        let secret = of_kind(&mine, "Secret")
            .into_iter()
            .find(|s| s["metadata"]["name"] == secret_name)
            .unwrap_or_else(|| panic!("{mode}: envFrom names a Secret the manifest lacks"));
        let env = c["env"].as_array().unwrap();
        let value_of = |n: &str| {
            env.iter()
                .find(|e| e["name"] == n)
                .and_then(|e| e["value"].as_str())
        };
        assert_eq!(value_of("WORKER_ENV_SECRET"), Some(secret_name), "{mode}");
        assert_eq!(value_of("WORKER_DOCKER_MODE"), Some(mode), "{mode}");
        let secret_keys: Vec<String> = secret["stringData"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for k in &secret_keys {
            set.insert(k.clone(), "envFrom Secret".into());
        }
        let unknown: Vec<_> = set.iter().filter(|(n, _)| !known.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "manifests/{file}: `buildshuttle serve` does not read {unknown:?}"
        );
        let worker_known = env_names_in_help(&help(&["worker"]));
        for k in &secret_keys {
            assert!(
                worker_known.contains(k),
                "{mode}: worker pods import {k} from the Secret but `buildshuttle worker` \
                 does not read it"
            );
        }
        // Values the binary parses itself must parse: JSON settings are JSON.
        for n in [
            "DOCKER_BUILD_SETTINGS",
            "EXTRA_BUILD_ARGS",
            "WORKER_POD_OVERRIDES",
        ] {
            if let Some(v) = value_of(n) {
                serde_json::from_str::<Value>(v).unwrap_or_else(|e| panic!("{mode} {n}: {e}"));
            }
        }
        if let Some(v) = secret["stringData"]["DOCKER_BUILD_SETTINGS"].as_str() {
            let s: Value = serde_json::from_str(v).unwrap();
            assert_eq!(
                s["protocol"], "https",
                "{mode}: an external dockerd over TLS"
            );
            for k in ["ca", "cert", "key"] {
                assert!(
                    s[k].as_str().is_some_and(|p| p.contains("-----BEGIN")),
                    "{k}"
                );
            }
        }
    }
}

#[test]
fn env_check_reads_the_binarys_help() {
    let known = env_names_in_help(&help(&["serve"]));
    for n in [
        "PORT",
        "MAXIMUM_PARALLEL_BUILDS",
        "TIMEOUT_IN_MS",
        "EXTRA_DOCKER_REGISTRY_CONFIG",
    ] {
        assert!(known.contains(n), "{n} missing from {known:?}");
    }
    assert!(!known.contains("NOT_A_BUILDSHUTTLE_VARIABLE"));
}

// ---------------------------------------------------------------------------------------
// The chart's options.

/// `over` on top of the one value every install needs (the chart refuses to render without
/// it).
fn with_bucket(over: Value) -> Value {
    let mut v = json!({"s3": {"bucket": "builds-bucket"}, "host": {"socketGid": 998}});
    chart::merge(&mut v, &over);
    v
}

fn rendered(over: Value) -> Result<Vec<Value>, String> {
    rendered_exactly(with_bucket(over))
}

/// The chart rendered with only `over` set over values.yaml.
fn rendered_exactly(over: Value) -> Result<Vec<Value>, String> {
    let r = render(&values(&over), "bs", "builds")?;
    Ok(r.iter()
        .filter(|(n, _)| n != "NOTES.txt")
        .flat_map(|(_, t)| documents(t))
        .collect())
}

fn container(objs: &[Value]) -> Value {
    of_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0].clone()
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap_or_default().to_string())
}

#[test]
fn chart_options_shape_the_objects() {
    // Defaults (mode dind): a chart-made Secret, every object strict, names from the release.
    let objs = rendered(json!({})).unwrap();
    for o in &objs {
        strict_object(o).unwrap_or_else(|e| panic!("{}: {e}", o["kind"]));
        let cluster_scoped = [
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        assert!(
            cluster_scoped.contains(&o["kind"].as_str().unwrap_or(""))
                || o["metadata"]["namespace"] == "builds"
        );
    }
    let c = container(&objs);
    assert_eq!(
        env_value(&c, "DIND_IMAGE").as_deref(),
        Some(buildshuttle::config::DEFAULT_DIND_IMAGE)
    );
    assert_eq!(
        env_value(&c, "LEASE_NAME").as_deref(),
        Some("bs-controller")
    );
    assert_eq!(env_value(&c, "DOCKER_BUILD_SETTINGS"), None);
    // Workers run the API's image and are pulled as it is.
    assert_eq!(
        env_value(&c, "WORKER_IMAGE_PULL_POLICY"),
        c["imagePullPolicy"].as_str().map(String::from)
    );
    // A leader whose watches fail leaves the Service (readiness) and is not restarted.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/octhc");
    assert_eq!(of_kind(&objs, "Secret")[0]["metadata"]["name"], "bs-env");
    // A drain evicts one replica at a time, and the replicas prefer different nodes: both
    // select exactly the Deployment's pods.
    let selector = &of_kind(&objs, "Deployment")[0]["spec"]["selector"]["matchLabels"];
    let pdb = of_kind(&objs, "PodDisruptionBudget")[0];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let spread = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"]
        ["topologySpreadConstraints"][0];
    assert_eq!(&spread["labelSelector"]["matchLabels"], selector);
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
    let without =
        rendered(json!({"podDisruptionBudget": {"enabled": false}, "spreadAcrossNodes": false}))
            .unwrap();
    assert!(of_kind(&without, "PodDisruptionBudget").is_empty());
    assert!(
        of_kind(&without, "Deployment")[0]["spec"]["template"]["spec"]["topologySpreadConstraints"]
            .is_null()
    );

    // host: the socket path reaches the workers through DOCKER_BUILD_SETTINGS.
    let objs =
        rendered(json!({"mode": "host", "host": {"socketPath": "/run/docker.sock"}})).unwrap();
    let c = container(&objs);
    assert_eq!(
        env_value(&c, "DOCKER_BUILD_SETTINGS").as_deref(),
        Some(r#"{"socketPath":"/run/docker.sock"}"#)
    );
    assert_eq!(env_value(&c, "DIND_IMAGE"), None);
    assert_eq!(
        env_value(&c, "WORKER_DOCKER_SOCKET_GID").as_deref(),
        Some("998")
    );

    // existingSecret: no Secret made, and it is the one imported; S3 values are then unused
    // (and not required: the binary refuses to start if the Secret lacks S3_BUCKET).
    let objs = rendered_exactly(json!({"existingSecret": "mine"})).unwrap();
    assert!(of_kind(&objs, "Secret").is_empty());
    let c = container(&objs);
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "mine");
    assert_eq!(env_value(&c, "WORKER_ENV_SECRET").as_deref(), Some("mine"));

    // Secrets and settings from values.
    let objs = rendered(json!({
        "s3": {"bucket": "b", "endpoint": "http://minio:9000", "accessKey": "AK", "secretKey": "SK"},
        "extraDockerRegistryConfig": {"r.example": {"username": "u", "password": "p"}},
        "config": {"extraBuildArgs": {"A": "1"}, "extraEnv": [{"name": "DEBUG", "value": "1"}],
                   "maximumParallelBuilds": 9},
        "worker": {"image": "w:1"},
    }))
    .unwrap();
    let s = &of_kind(&objs, "Secret")[0]["stringData"];
    assert_eq!(s["S3_BUCKET"], "b");
    assert_eq!(s["S3_ENDPOINT"], "http://minio:9000");
    assert_eq!(s["S3_SECRET_KEY"], "SK");
    assert_eq!(
        serde_json::from_str::<Value>(s["EXTRA_DOCKER_REGISTRY_CONFIG"].as_str().unwrap()).unwrap(),
        json!({"r.example": {"username": "u", "password": "p"}})
    );
    let c = container(&objs);
    assert_eq!(
        env_value(&c, "EXTRA_BUILD_ARGS").as_deref(),
        Some(r#"{"A":"1"}"#)
    );
    assert_eq!(env_value(&c, "DEBUG").as_deref(), Some("1"));
    assert_eq!(
        env_value(&c, "MAXIMUM_PARALLEL_BUILDS").as_deref(),
        Some("9")
    );
    assert_eq!(env_value(&c, "DOCKER_BUILD_IMAGE").as_deref(), Some("w:1"));
    let secret_text = serde_json::to_string(&c).unwrap();
    assert!(!secret_text.contains("SK"), "no secret in the Deployment");

    // Mistakes fail the render, as with helm.
    let e = rendered(json!({"mode": "docker"})).unwrap_err();
    assert!(e.contains("mode must be"), "{e}");
    let e = rendered(json!({"mode": "external", "external": {"host": "d"}})).unwrap_err();
    assert!(e.contains("external.tls.ca"), "{e}");
    let e = rendered(json!({"s3": {"bucket": "b", "accessKey": "AK"}})).unwrap_err();
    assert!(e.contains("s3.secretKey"), "{e}");
}

#[test]
fn a_real_install_starts_drains_rotates_and_splits_as_a_cluster_needs() {
    let objs = rendered(json!({})).unwrap();
    let c = container(&objs);
    // A slow or blocked S3 at start shows its error instead of liveness restarts: the
    // startup probe waits as long as the start's S3 check can take (5 attempts).
    let startup = &c["startupProbe"];
    assert_eq!(startup["httpGet"]["path"], "/metrics");
    let budget =
        startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(budget >= 600, "{startup}");
    // A percentage stays one: `int64` made "50%" a 0, which blocks every drain.
    let pct = rendered(json!({"podDisruptionBudget": {"maxUnavailable": "50%"}})).unwrap();
    assert_eq!(
        of_kind(&pct, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"],
        "50%"
    );
    // A changed Secret rolls the pods (they read it only at start).
    let annotations = |over: Value| {
        let objs = rendered(over).unwrap();
        of_kind(&objs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"].clone()
    };
    let before = annotations(json!({"s3": {"accessKey": "AK", "secretKey": "one"}}));
    let after = annotations(json!({"s3": {"accessKey": "AK", "secretKey": "two"}}));
    assert!(before["checksum/env"].is_string(), "{before}");
    assert_ne!(before["checksum/env"], after["checksum/env"]);
    // An API-only release labels its BuildJobs for the release whose controller runs them.
    let api = rendered(json!({"controller": {"enabled": false}, "instanceName": "ctl"})).unwrap();
    assert_eq!(
        env_value(&container(&api), "INSTANCE_NAME").as_deref(),
        Some("ctl")
    );
    assert_eq!(env_value(&c, "INSTANCE_NAME").as_deref(), Some("bs"));
    // How to uninstall without leaving BuildJobs that only a controller can let go.
    assert!(notes(json!({})).contains("kubectl -n builds delete bj --all --wait"));
}

fn notes(over: Value) -> String {
    let r = render(&values(&with_bucket(over)), "bs", "builds").unwrap();
    r.into_iter().find(|(n, _)| n == "NOTES.txt").unwrap().1
}

#[test]
fn notes_tell_how_to_send_and_watch_a_first_build() {
    let notes = notes(json!({}));
    assert!(notes.contains("kubectl -n builds get bj -w"), "{notes}");
    assert!(notes.contains("data:application/gzip;base64,"), "{notes}");
    assert!(notes.contains("svc/bs 9000:80"), "{notes}");
}

#[test]
fn notes_say_how_to_label_the_namespace_for_privileged_worker_pods() {
    const LABEL: &str =
        "kubectl label namespace builds pod-security.kubernetes.io/enforce=privileged";
    for mode in ["dind", "host"] {
        let n = notes(json!({"mode": mode}));
        assert!(n.contains(LABEL), "{mode}: {n}");
    }
    let external = json!({"mode": "external", "external": {"host": "d",
        "tls": {"ca": "C", "cert": "T", "key": "K"}}});
    let n = notes(external);
    assert!(!n.contains(LABEL) && n.contains("restricted"), "{n}");
    // The plain manifests' Namespace carries the label their worker pods need.
    for (mode, file, _) in MODES {
        let text = std::fs::read_to_string(manifest_path(file)).unwrap();
        let docs = documents(&text);
        let ns = &of_kind(&docs, "Namespace")[0]["metadata"]["labels"];
        let want = if mode == "external" {
            "baseline"
        } else {
            "privileged"
        };
        assert_eq!(ns["pod-security.kubernetes.io/enforce"], want, "{mode}");
    }
}

// ---------------------------------------------------------------------------------------
// What the chart refuses, and what it hands the controller for worker pods.

#[test]
fn host_mode_refuses_to_render_without_the_sockets_group() {
    // Helm's `required` lets 0 through (root's group is a real answer); only unset fails.
    let e = rendered_exactly(json!({"mode": "host", "s3": {"bucket": "b"}})).unwrap_err();
    assert_eq!(
        e,
        "execution error at (templates/deployment.yaml): host.socketGid is required in mode \
         host: the group id owning the nodes' docker socket (stat -c %g /var/run/docker.sock on \
         a node)"
    );
    for (gid, want) in [(json!(0), "0"), (json!(998), "998")] {
        let objs = rendered(json!({"mode": "host", "host": {"socketGid": gid}})).unwrap();
        let c = container(&objs);
        assert_eq!(
            env_value(&c, "WORKER_DOCKER_SOCKET_GID").as_deref(),
            Some(want)
        );
    }
    // The plain host manifest sets it (to a value marked EDIT).
    let text = std::fs::read_to_string(manifest_path("buildshuttle-using-host.yaml")).unwrap();
    let c = container(&documents(&text));
    assert!(env_value(&c, "WORKER_DOCKER_SOCKET_GID")
        .and_then(|g| g.parse::<u32>().ok())
        .is_some());
    // Other modes need no group.
    rendered_exactly(json!({"s3": {"bucket": "b"}})).unwrap();
}

#[test]
fn the_chart_refuses_to_render_without_shared_storage() {
    let e = rendered_exactly(json!({})).unwrap_err();
    assert!(
        e.starts_with("execution error at (templates/secret.yaml): s3.bucket is required"),
        "{e}"
    );
    assert!(rendered_exactly(json!({"s3": {"bucket": ""}})).is_err());
    let objs = rendered_exactly(json!({"s3": {"bucket": "b"}})).unwrap();
    assert_eq!(of_kind(&objs, "Secret")[0]["stringData"]["S3_BUCKET"], "b");
}

#[test]
fn worker_pods_get_pull_secrets_their_own_service_account_and_pod_settings() {
    use buildshuttle::config::{Cli, Command as Cmd};
    use clap::Parser;
    let objs = rendered(json!({
        "imagePullSecrets": [{"name": "regcred"}, {"name": "other"}],
        "worker": {"dindMtu": 1450, "serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/builds"}},
            "pod": {"nodeSelector": {"pool": "builds"}, "dindStorageSizeLimit": "100Gi"}},
    }))
    .unwrap();
    let c = container(&objs);
    assert_eq!(env_value(&c, "INSTANCE_NAME").as_deref(), Some("bs"));
    assert_eq!(env_value(&c, "DIND_MTU").as_deref(), Some("1450"));
    assert_eq!(
        env_value(&c, "WORKER_SERVICE_ACCOUNT").as_deref(),
        Some("bs-worker")
    );
    // The binary reads the Deployment's settings as the pod builder gets them.
    let mut argv = vec!["buildshuttle".to_string(), "serve".into()];
    for (flag, var) in [
        ("--worker-image-pull-secrets", "WORKER_IMAGE_PULL_SECRETS"),
        ("--worker-pod-overrides", "WORKER_POD_OVERRIDES"),
        ("--dind-mtu", "DIND_MTU"),
        ("--worker-service-account", "WORKER_SERVICE_ACCOUNT"),
        ("--instance-name", "INSTANCE_NAME"),
        ("--s3-bucket", "S3_BUCKET"),
    ] {
        let v = env_value(&c, var)
            .or_else(|| {
                of_kind(&objs, "Secret")[0]["stringData"][var]
                    .as_str()
                    .map(String::from)
            })
            .unwrap_or_else(|| panic!("{var} is not set"));
        argv.extend([flag.to_string(), v]);
    }
    argv.extend(["--use-kubernetes".into(), "true".into()]);
    let Cmd::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("serve")
    };
    let k = args.validate().unwrap().kubernetes;
    assert_eq!(k.worker_image_pull_secrets, ["regcred", "other"]);
    assert_eq!(k.dind_mtu, Some(1450));
    assert_eq!(k.instance_name.as_deref(), Some("bs"));
    assert!(!k.worker_automount_token);
    assert_eq!(k.worker_pod.node_selector["pool"], "builds");
    assert_eq!(
        k.worker_pod
            .dind_storage_size_limit
            .map(|q| q.as_str().to_string()),
        Some("100Gi".into())
    );
    // The worker ServiceAccount: annotated for IRSA, no token, and bound to no Role.
    let sa = of_kind(&objs, "ServiceAccount")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "bs-worker")
        .expect("the worker ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::1:role/builds"
    );
    for rb in of_kind(&objs, "RoleBinding")
        .into_iter()
        .chain(of_kind(&objs, "ClusterRoleBinding"))
    {
        for s in rb["subjects"].as_array().unwrap() {
            assert_ne!(s["name"], "bs-worker", "worker pods need no API access");
        }
    }
    // Without pull secrets the variable is not set; with create=false the named account.
    let objs =
        rendered(json!({"worker": {"serviceAccount": {"create": false, "name": "mine"}}})).unwrap();
    let c = container(&objs);
    assert_eq!(env_value(&c, "WORKER_IMAGE_PULL_SECRETS"), None);
    assert_eq!(env_value(&c, "DIND_MTU"), None);
    assert_eq!(
        env_value(&c, "WORKER_SERVICE_ACCOUNT").as_deref(),
        Some("mine")
    );
    assert_eq!(of_kind(&objs, "ServiceAccount").len(), 1);
}

#[test]
fn the_charts_worker_pod_defaults_are_the_binarys() {
    let c = container(&rendered(json!({})).unwrap());
    let json = env_value(&c, "WORKER_POD_OVERRIDES").expect("WORKER_POD_OVERRIDES");
    let from_chart = buildshuttle::config::WorkerPodOverrides::parse(Some(&json))
        .unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(
        from_chart,
        buildshuttle::config::WorkerPodOverrides::default()
    );
    assert!(from_chart.dind_storage_size_limit.is_some());
    assert!(from_chart
        .dind_resources
        .limits
        .contains_key("ephemeral-storage"));
    assert_eq!(
        env_value(&c, "DIND_IMAGE").as_deref(),
        Some(buildshuttle::config::DEFAULT_DIND_IMAGE)
    );
    assert!(!buildshuttle::config::DEFAULT_DIND_IMAGE.contains("latest"));
}

/// Bytes of memory the facade holds per byte of a request body it is accepting: the body,
/// the parsed JSON's copy of the `data:` URI, the build spec's copy and the decoding buffers.
/// Measured: one POST with a 64 MiB and a 128 MiB `data:` body raised the service's peak RSS
/// (VmHWM) by 3.9x the body size. Documented in values.yaml (`config.maxRequestBytes`).
const UPLOAD_MEMORY_FACTOR: f64 = 4.0;
/// The process without any upload (runtime, clients, caches).
const BASE_MEMORY: f64 = 128.0 * 1024.0 * 1024.0;

#[test]
fn the_facades_memory_limit_covers_an_upload_of_max_request_bytes() {
    use buildshuttle::config::Quantity;
    let check = |objs: &[Value], what: &str| -> Result<(), String> {
        let c = container(objs);
        let max: f64 = env_value(&c, "MAX_REQUEST_BYTES")
            .expect("MAX_REQUEST_BYTES is set")
            .parse()
            .unwrap();
        let limit = c["resources"]["limits"]["memory"]
            .as_str()
            .expect("a memory limit");
        let limit = Quantity::parse(limit).unwrap().value();
        let need = UPLOAD_MEMORY_FACTOR * max + BASE_MEMORY;
        if limit < need {
            return Err(format!(
                "{what}: limits.memory {limit} < {UPLOAD_MEMORY_FACTOR} x MAX_REQUEST_BYTES + 128Mi = {need}"
            ));
        }
        Ok(())
    };
    check(&rendered(json!({})).unwrap(), "defaults").unwrap();
    for (mode, file, _) in MODES {
        let text = std::fs::read_to_string(manifest_path(file)).unwrap();
        check(&documents(&text), mode).unwrap();
    }
    // The check bites: a larger body limit without more memory.
    let big = rendered(json!({"config": {"maxRequestBytes": 1073741824}})).unwrap();
    assert!(check(&big, "1 GiB bodies").is_err());
}
