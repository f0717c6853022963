//! Field ownership for server-side apply: each manager owns a set of field paths
//! (`managedFields`, FieldsV1). Maps are walked into; lists and scalars are leaves, which is
//! what a CRD without `x-kubernetes-list-type` gets from the real server (atomic lists).

use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Manager {
    pub manager: String,
    pub operation: &'static str,
    pub api_version: String,
    pub subresource: String,
    pub time: String,
    pub fields: FieldSet,
}

/// Metadata the server owns: never part of anyone's field set.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// The leaf paths of an object, without apiVersion, kind and server-owned metadata.
pub fn leaves(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(m) = v.as_object() {
        for (k, child) in m {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            if k == "metadata" {
                if let Some(meta) = child.as_object() {
                    for (mk, mv) in meta {
                        if !SERVER_META.contains(&mk.as_str()) {
                            walk(mv, vec!["metadata".into(), mk.clone()], &mut out);
                        }
                    }
                }
                continue;
            }
            walk(child, vec![k.clone()], &mut out);
        }
    }
    out
}

fn walk(v: &Value, path: Path, out: &mut FieldSet) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(k.clone());
                walk(child, p, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

pub fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

/// Removes a leaf, then any map it leaves empty (up to, not including, the top level).
pub fn remove(v: &mut Value, path: &[String]) {
    if path.is_empty() {
        return;
    }
    fn rec(v: &mut Value, path: &[String]) -> bool {
        let Some(m) = v.as_object_mut() else {
            return false;
        };
        if path.len() == 1 {
            m.remove(&path[0]);
        } else if let Some(child) = m.get_mut(&path[0]) {
            if rec(child, &path[1..]) {
                m.remove(&path[0]);
            }
        }
        m.is_empty()
    }
    rec(v, path);
}

/// Deep merge for apply: maps merge, everything else replaces; null removes.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, pv) in p {
                if pv.is_null() {
                    t.remove(k);
                } else if let Some(tv) = t.get_mut(k) {
                    if tv.is_object() && pv.is_object() {
                        merge(tv, pv);
                    } else {
                        *tv = pv.clone();
                    }
                } else {
                    t.insert(k.clone(), pv.clone());
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// An applied value differs from the live one. An empty map applied over a map only
/// asserts the map exists: it conflicts with nothing inside it.
fn differs(current: &Value, applied: &Value, p: &[String]) -> bool {
    let (a, b) = (get(current, p), get(applied, p));
    if let (Some(Value::Object(_)), Some(Value::Object(m))) = (a, b) {
        if m.is_empty() {
            return false;
        }
    }
    a != b
}

fn fmt_path(p: &[String]) -> String {
    format!(".{}", p.join("."))
}

/// Paths whose value differs between `old` and `new` (added, changed or removed leaves).
pub fn changed(old: &Value, new: &Value) -> FieldSet {
    let a = leaves(old);
    let b = leaves(new);
    let mut out = FieldSet::new();
    for p in b.iter() {
        if get(old, p) != get(new, p) {
            out.insert(p.clone());
        }
    }
    for p in a.difference(&b) {
        if get(new, p).is_none() {
            out.insert(p.clone());
        }
    }
    out
}

/// A non-apply write by `manager`: it takes the fields it changed from everyone else.
pub fn record_update(
    managers: &mut Vec<Manager>,
    manager: &str,
    subresource: &str,
    api_version: &str,
    old: &Value,
    new: &Value,
    now: &str,
) {
    let diff = changed(old, new);
    if diff.is_empty() {
        return;
    }
    for m in managers.iter_mut() {
        m.fields.retain(|q| !diff.iter().any(|p| overlaps(p, q)));
    }
    let present: FieldSet = diff.into_iter().filter(|p| get(new, p).is_some()).collect();
    match managers
        .iter_mut()
        .find(|m| m.manager == manager && m.operation == "Update" && m.subresource == subresource)
    {
        Some(m) => {
            m.fields.extend(present);
            m.time = now.to_string();
        }
        None => managers.push(Manager {
            manager: manager.to_string(),
            operation: "Update",
            api_version: api_version.to_string(),
            subresource: subresource.to_string(),
            time: now.to_string(),
            fields: present,
        }),
    }
    prune(managers, new);
}

/// Drops paths no longer present and entries left with nothing.
pub fn prune(managers: &mut Vec<Manager>, obj: &Value) {
    for m in managers.iter_mut() {
        m.fields.retain(|p| get(obj, p).is_some());
    }
    managers.retain(|m| !m.fields.is_empty());
}

/// One field another manager owns with a different value.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub path: String,
}

/// Server-side apply of `applied` by `manager` onto `current`. Returns the new object, or
/// the conflicts when not forced.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    managers: &mut Vec<Manager>,
    manager: &str,
    subresource: &str,
    api_version: &str,
    current: &Value,
    applied: &Value,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let set = leaves(applied);
    let is_me = |m: &Manager| {
        m.manager == manager && m.operation == "Apply" && m.subresource == subresource
    };
    let mut conflicts = Vec::new();
    for m in managers.iter().filter(|m| !is_me(m)) {
        for q in &m.fields {
            for p in set.iter().filter(|p| overlaps(p, q)) {
                if differs(current, applied, p) && m.manager != manager {
                    conflicts.push(Conflict {
                        manager: m.manager.clone(),
                        path: fmt_path(p),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    // Forced (or agreeing): others give up what this manager now applies with a new value;
    // fields with an equal value become shared.
    for m in managers.iter_mut() {
        if is_me(m) {
            continue;
        }
        let take: Vec<Path> = m
            .fields
            .iter()
            .filter(|q| {
                set.iter()
                    .any(|p| overlaps(p, q) && differs(current, applied, p))
            })
            .cloned()
            .collect();
        for q in take {
            m.fields.remove(&q);
        }
    }
    let previous: FieldSet = managers
        .iter()
        .find(|m| is_me(m))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let mut out = current.clone();
    for p in previous.difference(&set) {
        let owned_by_other = managers
            .iter()
            .filter(|m| !is_me(m))
            .any(|m| m.fields.iter().any(|q| overlaps(p, q)));
        if !owned_by_other {
            remove(&mut out, p);
        }
    }
    merge(&mut out, applied);
    match managers.iter_mut().find(|m| is_me(m)) {
        Some(m) => {
            if m.fields != set {
                m.time = now.to_string();
            }
            m.fields = set;
        }
        None => managers.push(Manager {
            manager: manager.to_string(),
            operation: "Apply",
            api_version: api_version.to_string(),
            subresource: subresource.to_string(),
            time: now.to_string(),
            fields: set,
        }),
    }
    prune(managers, &out);
    Ok(out)
}

/// `metadata.managedFields` as the real server renders it (FieldsV1).
pub fn render(managers: &[Manager]) -> Value {
    let entries: Vec<Value> = managers
        .iter()
        .map(|m| {
            let mut root = Map::new();
            for p in &m.fields {
                let mut cur = &mut root;
                for seg in p {
                    let e = cur.entry(format!("f:{seg}")).or_insert_with(|| json!({}));
                    cur = e.as_object_mut().expect("built as objects");
                }
            }
            let mut e = json!({
                "manager": m.manager, "operation": m.operation, "apiVersion": m.api_version,
                "time": m.time, "fieldsType": "FieldsV1", "fieldsV1": Value::Object(root),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    Value::Array(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_removes_what_a_manager_stops_applying() {
        let mut ms = Vec::new();
        let cur = json!({"spec": {}});
        let a = json!({"spec": {"a": 1, "b": 2}});
        let o = apply(&mut ms, "m", "", "v1", &cur, &a, false, "t").unwrap();
        assert_eq!(o["spec"], json!({"a": 1, "b": 2}));
        let o = apply(
            &mut ms,
            "m",
            "",
            "v1",
            &o,
            &json!({"spec": {"a": 1}}),
            false,
            "t",
        )
        .unwrap();
        assert_eq!(o["spec"], json!({"a": 1}));
    }

    #[test]
    fn conflicts_unless_forced_and_shared_when_equal() {
        let mut ms = Vec::new();
        let o = apply(
            &mut ms,
            "x",
            "",
            "v1",
            &json!({}),
            &json!({"spec": {"a": 1}}),
            false,
            "t",
        )
        .unwrap();
        // Same value: no conflict, shared ownership.
        let o = apply(
            &mut ms,
            "y",
            "",
            "v1",
            &o,
            &json!({"spec": {"a": 1}}),
            false,
            "t",
        )
        .unwrap();
        assert_eq!(ms.len(), 2);
        let err = apply(
            &mut ms,
            "y",
            "",
            "v1",
            &o,
            &json!({"spec": {"a": 2}}),
            false,
            "t",
        )
        .unwrap_err();
        assert_eq!(err[0].manager, "x");
        assert_eq!(err[0].path, ".spec.a");
        let o = apply(
            &mut ms,
            "y",
            "",
            "v1",
            &o,
            &json!({"spec": {"a": 2}}),
            true,
            "t",
        )
        .unwrap();
        assert_eq!(o["spec"]["a"], 2);
        assert_eq!(ms.len(), 1, "x lost its only field");
    }
}
