//! The chart `charts/buildshuttle`, rendered without helm (see `tpl`), and the plain
//! manifests of `manifests/` made from it: one source for both.
#![allow(dead_code)]

pub mod tpl;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    root().join("charts/buildshuttle")
}

/// The three plain manifests: (mode, file in manifests/, values file over values.yaml).
pub const MODES: [(&str, &str, &str); 3] = [
    (
        "host",
        "buildshuttle-using-host.yaml",
        "ci/host-values.yaml",
    ),
    (
        "dind",
        "buildshuttle-with-worker.yaml",
        "ci/dind-values.yaml",
    ),
    (
        "external",
        "buildshuttle-with-external-worker.yaml",
        "ci/external-values.yaml",
    ),
];

/// The release the plain manifests stand for: `helm install buildshuttle charts/buildshuttle
/// --namespace buildshuttle`.
pub const NAMESPACE: &str = "buildshuttle";
pub const RELEASE: &str = "buildshuttle";

pub fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `over` merged into `base`, maps key by key (Helm's values merge).
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The chart's values.yaml with `overrides` merged over it.
pub fn values(overrides: &Value) -> Value {
    let mut v = read_yaml(&chart_dir().join("values.yaml"));
    merge(&mut v, overrides);
    v
}

/// Every file of templates/, rendered like `helm template`: (file name, text), in name order.
/// `_*.tpl` files only contribute `define`s; NOTES.txt is included.
pub fn render(
    values: &Value,
    release: &str,
    namespace: &str,
) -> Result<Vec<(String, String)>, String> {
    let chart = read_yaml(&chart_dir().join("Chart.yaml"));
    let root = json!({
        "Values": tpl::helm_values(values),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    });
    let mut names: Vec<String> = std::fs::read_dir(chart_dir().join("templates"))
        .map_err(|e| e.to_string())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut t = tpl::Templates::default();
    for n in &names {
        let src = std::fs::read_to_string(chart_dir().join("templates").join(n))
            .map_err(|e| e.to_string())?;
        t.add(n, &src)?;
    }
    names
        .iter()
        .filter(|n| !n.starts_with('_'))
        .map(|n| Ok((n.clone(), t.render(n, &root)?)))
        .collect()
}

/// The YAML documents of a rendered file ("---" separated), without empty ones.
pub fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            use serde::Deserialize;
            Value::deserialize(d).unwrap_or_else(|e| panic!("{e} in\n{text}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The plain manifest of one mode: a Namespace, then every object of the chart rendered with
/// the mode's values, in an order `kubectl apply -f` can create them.
pub fn manifest(mode: &str) -> String {
    let (_, file, values_file) = MODES.iter().find(|m| m.0 == mode).expect("a known mode");
    let v = values(&read_yaml(&chart_dir().join(values_file)));
    let rendered = render(&v, RELEASE, NAMESPACE).unwrap_or_else(|e| panic!("{mode}: {e}"));
    let mut out = format!(
        "# buildshuttle, builds in mode {mode:?}: a complete install into namespace {NAMESPACE:?}.\n\
         # Generated from charts/buildshuttle with charts/buildshuttle/{values_file} by\n\
         # `UPDATE_MANIFESTS=1 cargo test --test manifests`; do not edit ({file}).\n"
    );
    let privileged = if mode == "external" {
        "baseline"
    } else {
        "privileged"
    };
    out.push_str(&format!(
        "---\n\
         # Worker pods {}: Pod Security admits them in a namespace labelled {privileged:?}.\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    \
         pod-security.kubernetes.io/enforce: {privileged}\n",
        match mode {
            "dind" => "run a privileged dind sidecar",
            "host" => "mount the node's docker socket (hostPath)",
            _ => "need no privileges",
        }
    ));
    const ORDER: [&str; 7] = [
        "crd.yaml",
        "serviceaccount.yaml",
        "secret.yaml",
        "rbac.yaml",
        "service.yaml",
        "deployment.yaml",
        "pdb.yaml",
    ];
    for (name, _) in &rendered {
        if name == "NOTES.txt" {
            continue;
        }
        assert!(
            ORDER.contains(&name.as_str()),
            "templates/{name} is not placed in the plain manifests (add it to ORDER)"
        );
    }
    for name in ORDER {
        let (_, text) = rendered
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("templates/{name} is missing"));
        let (source, text) = if name == "crd.yaml" && documents(text).is_empty() {
            // What `helm install` creates from the chart's crds/ folder.
            let crd = std::fs::read_to_string(chart_dir().join("crds/buildjob.yaml"))
                .unwrap_or_else(|e| panic!("crds/buildjob.yaml of the chart: {e}"));
            ("crds/buildjob.yaml".to_string(), crd)
        } else {
            (format!("templates/{name}"), text.clone())
        };
        if documents(&text).is_empty() {
            continue;
        }
        out.push_str(&format!("---\n# Source: buildshuttle/{source}\n"));
        out.push_str(text.trim_start_matches('\n').trim_end());
        out.push('\n');
    }
    out
}
