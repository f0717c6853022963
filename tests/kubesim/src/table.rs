//! Server-side printing (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`): what
//! `kubectl get` shows. CRDs: Name and their printer columns (dates as ages, as the real
//! server renders them); built-in kinds: the columns kubectl users know.

use crate::store::{Column, ResourceType};
use serde_json::{json, Value};

/// kubectl's `HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(ts: &Value) -> Value {
    match ts
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    {
        Some(t) => json!(human_duration(
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
        )),
        None => Value::Null,
    }
}

fn lookup<'a>(obj: &'a Value, path: &str) -> &'a Value {
    let mut cur = obj;
    for seg in path.trim_start_matches('.').split('.') {
        if seg.is_empty() {
            continue;
        }
        cur = &cur[seg];
    }
    cur
}

fn col(name: &str, type_: &str, desc: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        json_path: String::new(),
        description: desc.into(),
        priority,
    }
}

fn columns(rt: &ResourceType) -> Vec<Column> {
    let mut cols = vec![col(
        "Name",
        "string",
        "Name must be unique within a namespace.",
        0,
    )];
    if rt.custom {
        cols.extend(rt.columns.iter().cloned());
        if !rt.columns.iter().any(|c| c.type_ == "date") {
            cols.push(col("Age", "date", "", 0));
        }
        return cols;
    }
    match rt.plural.as_str() {
        "pods" => {
            cols.push(col(
                "Ready",
                "string",
                "The aggregate readiness state of this pod for accepting traffic.",
                0,
            ));
            cols.push(col(
                "Status",
                "string",
                "The aggregate status of the containers in this pod.",
                0,
            ));
            cols.push(col(
                "Restarts",
                "string",
                "The number of times the containers in this pod have been restarted.",
                0,
            ));
            cols.push(col("Age", "string", "", 0));
            cols.push(col("IP", "string", "IP address allocated to the pod.", 1));
            cols.push(col(
                "Node",
                "string",
                "Name of the node where the pod is scheduled.",
                1,
            ));
        }
        "namespaces" => {
            cols.push(col("Status", "string", "The status of the namespace", 0));
            cols.push(col("Age", "string", "", 0));
        }
        "secrets" => {
            cols.push(col("Type", "string", "The type of the secret", 0));
            cols.push(col("Data", "string", "The number of data keys", 0));
            cols.push(col("Age", "string", "", 0));
        }
        "leases" => {
            cols.push(col("Holder", "string", "The holder of the lease", 0));
            cols.push(col("Age", "string", "", 0));
        }
        "nodes" => {
            cols.push(col("Status", "string", "The status of the node", 0));
            cols.push(col("Age", "string", "", 0));
        }
        _ => cols.push(col("Age", "string", "", 0)),
    }
    cols
}

fn pod_status(o: &Value) -> String {
    if !o["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating".into();
    }
    if let Some(r) = o["status"]["reason"].as_str() {
        return r.into();
    }
    for cs in o["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = cs["state"]["waiting"]["reason"].as_str() {
            return r.into();
        }
        if cs["state"]["terminated"].is_object() && o["status"]["phase"] != "Succeeded" {
            if let Some(r) = cs["state"]["terminated"]["reason"].as_str() {
                return r.into();
            }
        }
    }
    match o["status"]["phase"].as_str() {
        Some("Succeeded") => "Completed".into(),
        Some(p) => p.into(),
        None => "Unknown".into(),
    }
}

fn cells(rt: &ResourceType, cols: &[Column], o: &Value) -> Vec<Value> {
    cols.iter()
        .map(|c| match c.name.as_str() {
            "Name" => o["metadata"]["name"].clone(),
            _ if rt.custom => {
                let v = lookup(o, &c.json_path);
                match (c.type_.as_str(), v) {
                    ("date", v) if !v.is_null() => age(v),
                    _ => v.clone(),
                }
            }
            "Age" => age(&o["metadata"]["creationTimestamp"]),
            "Ready" => {
                let cs = o["status"]["containerStatuses"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let total = o["spec"]["containers"]
                    .as_array()
                    .map(|a| a.len())
                    .unwrap_or(0);
                let ready = cs.iter().filter(|c| c["ready"] == true).count();
                json!(format!("{ready}/{total}"))
            }
            "Status" if rt.plural == "pods" => json!(pod_status(o)),
            "Status" if rt.plural == "nodes" => json!("Ready"),
            "Status" => o["status"]["phase"].clone(),
            "Restarts" => json!("0"),
            "IP" => o["status"]["podIP"].clone(),
            "Node" => o["spec"]["nodeName"].clone(),
            "Type" => o["type"].clone(),
            "Data" => json!(o["data"].as_object().map(|m| m.len()).unwrap_or(0)),
            "Holder" => o["spec"]["holderIdentity"].clone(),
            _ => Value::Null,
        })
        .collect()
}

fn partial(o: &Value, include: &str) -> Value {
    match include {
        "None" => Value::Null,
        "Object" => o.clone(),
        _ => {
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
        }
    }
}

/// A Table of `objs`; `headers` false leaves out the column definitions (later watch events).
pub fn table(rt: &ResourceType, objs: &[Value], rv: &str, headers: bool, include: &str) -> Value {
    let cols = columns(rt);
    let defs: Vec<Value> = if headers {
        cols.iter()
            .map(|c| {
                let format = if c.name == "Name" { "name" } else { "" };
                json!({"name": c.name, "type": if c.type_ == "date" { "date" } else { c.type_.as_str() },
                       "format": format, "description": c.description, "priority": c.priority})
            })
            .collect()
    } else {
        vec![]
    };
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| json!({"cells": cells(rt, &cols, o), "object": partial(o, include)}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
           "columnDefinitions": defs, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn ages_as_kubectl_prints_them() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(50 * 3600), "2d2h");
    }
}
