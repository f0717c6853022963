//! Field pruning of custom resources, as the real API server does it for a CRD version with
//! a structural `openAPIV3Schema` (apiextensions-apiserver's `pruning` package): a field the
//! schema does not declare is dropped on every write, main resource and `/status` alike.
//! `properties` declare an object's fields; an `additionalProperties` schema declares any
//! key (a map); `x-kubernetes-preserve-unknown-fields: true` keeps unknown fields at that
//! node (the declared ones below it are still pruned by their own schemas);
//! `apiVersion`, `kind` and `metadata` are never pruned at the root (nor in an
//! `x-kubernetes-embedded-resource`). What the request's `fieldValidation` makes of the
//! dropped fields (ignored, a warning, a 400) is the caller's business.

use serde_json::{Map, Value};

const META_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

/// Drops from `obj` (a whole object) every field `schema` (its CRD version's
/// `openAPIV3Schema`) does not declare. Returns the dropped fields' paths, as the real server
/// reports them (`spec.foo`, `status.conditions[0].bar`), sorted.
pub fn prune(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(obj, Some(schema), true, "", &mut out);
    out.sort();
    out
}

fn preserves(s: &Value) -> bool {
    s["x-kubernetes-preserve-unknown-fields"] == true
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The schema a map key falls under: its property, else the `additionalProperties` schema
/// (`true`: anything). `None` outside: not declared.
fn child_schema<'a>(s: &'a Value, key: &str) -> Option<Option<&'a Value>> {
    if let Some(p) = s["properties"].get(key) {
        return Some(Some(p));
    }
    match &s["additionalProperties"] {
        Value::Object(_) => Some(Some(&s["additionalProperties"])),
        // `additionalProperties: true`: any key, any value (kept whole).
        Value::Bool(true) => Some(None),
        _ => None,
    }
}

/// `schema` `None`: nothing below is declared (every field of a map goes).
fn walk(x: &mut Value, schema: Option<&Value>, root: bool, path: &str, out: &mut Vec<String>) {
    let Some(s) = schema else {
        // Undeclared below a declared node: every field of a map goes.
        match x {
            Value::Object(m) => {
                for k in m.keys() {
                    out.push(join(path, k));
                }
                m.clear();
            }
            Value::Array(a) => {
                for (i, v) in a.iter_mut().enumerate() {
                    walk(v, None, false, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
        return;
    };
    let embedded = root || s["x-kubernetes-embedded-resource"] == true;
    match x {
        Value::Object(m) => {
            let keep_unknown = preserves(s);
            let mut drop = Vec::new();
            for (k, v) in m.iter_mut() {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                match child_schema(s, k) {
                    Some(Some(cs)) => walk(v, Some(cs), false, &join(path, k), out),
                    Some(None) => {}
                    None if keep_unknown => {}
                    None => drop.push(k.clone()),
                }
            }
            remove_keys(m, &drop, path, out);
        }
        Value::Array(a) => {
            let items = s.get("items").filter(|i| i.is_object());
            if items.is_none() && preserves(s) {
                return;
            }
            for (i, v) in a.iter_mut().enumerate() {
                walk(v, items, false, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn remove_keys(m: &mut Map<String, Value>, keys: &[String], path: &str, out: &mut Vec<String>) {
    for k in keys {
        m.remove(k);
        out.push(join(path, k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "a": {"type": "string"},
                "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                "l": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "string"}}}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                         "properties": {"typed": {"type": "object", "properties": {"k": {"type": "string"}}}}},
            }},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        }})
    }

    #[test]
    fn undeclared_fields_go_declared_ones_stay() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a", "whatever": 1},
            "spec": {"a": "1", "b": 2, "m": {"k1": {"x": 1, "y": 2}}, "l": [{"n": "1", "o": 2}],
                     "free": {"any": {"deep": 1}, "typed": {"k": "v", "z": 1}}},
            "status": {"phase": "P", "gone": true}, "extra": {}});
        let pruned = prune(&mut o, &schema());
        assert_eq!(
            o,
            json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a", "whatever": 1},
                "spec": {"a": "1", "m": {"k1": {"x": 1}}, "l": [{"n": "1"}],
                         "free": {"any": {"deep": 1}, "typed": {"k": "v"}}},
                "status": {"phase": "P"}})
        );
        assert_eq!(
            pruned,
            [
                "extra",
                "spec.b",
                "spec.free.typed.z",
                "spec.l[0].o",
                "spec.m.k1.y",
                "status.gone"
            ]
        );
    }

    #[test]
    fn preserving_the_root_keeps_everything_undeclared() {
        let mut o = json!({"spec": {"anything": [1, {"a": 2}]}, "status": {"x": 1}});
        let before = o.clone();
        let s = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
        assert!(prune(&mut o, &s).is_empty());
        assert_eq!(o, before);
    }
}
