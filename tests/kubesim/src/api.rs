//! The HTTP face of the API server: discovery, the resource verbs, watch streams, Table
//! printing, the pod log and eviction subresources, and the `/sim/...` admin routes.

use crate::error::ApiError;
use crate::fields;
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, EvType, Event, How, Propagation, ResourceType};
use crate::{table, Injection, Matcher, Shared};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: u16, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.code, &self.status())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1"))
}

/// A write's `fieldValidation`: what becomes of fields a custom resource's schema does not
/// declare (they are pruned in every case but Strict, which refuses the write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    /// The default: pruned, and a `Warning` header per field.
    Warn,
    Strict,
}

fn field_validation(q: &HashMap<String, String>) -> Result<FieldValidation, ApiError> {
    match q.get("fieldValidation").map(String::as_str) {
        None | Some("" | "Warn") => Ok(FieldValidation::Warn),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
        ))),
    }
}

/// Prunes a custom resource's `obj` (a whole object) by its CRD version's schema: the
/// pruned fields' paths, or 400 under Strict, as the real decoder answers.
fn prune_write(
    rt: &ResourceType,
    obj: &mut Value,
    fv: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = rt.schema.as_deref() else {
        return Ok(Vec::new());
    };
    let pruned = crate::prune::prune(obj, schema);
    if fv == FieldValidation::Strict && !pruned.is_empty() {
        let list: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            rt.kind,
            rt.version,
            rt.kind,
            list.join(", ")
        )));
    }
    Ok(if fv == FieldValidation::Warn {
        pruned
    } else {
        Vec::new()
    })
}

/// A stored custom resource as the real server reads it back: pruned by the schema in force
/// now (fields a CRD update dropped from it go, silently).
fn as_read(rt: &ResourceType, obj: &mut Value) {
    if let Some(schema) = rt.schema.as_deref() {
        crate::prune::prune(obj, schema);
    }
}

/// `Warning: 299 - "unknown field \"spec.foo\""` for each field a write pruned.
fn with_warnings(mut r: Response, pruned: &[String]) -> Response {
    for p in pruned {
        let text = format!("299 - \"unknown field \\\"{p}\\\"\"");
        if let Ok(v) = axum::http::HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

/// Which object(s) a request is about.
struct Target {
    rt: ResourceType,
    ns: Option<String>,
    name: Option<String>,
    sub: String,
}

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::bad_request(format!("cannot read the body: {e}")).into_response()
        }
    };
    if let Some(rest) = path.strip_prefix("/sim/") {
        return admin(&sh, &parts.method, rest, &body).await;
    }
    let auth_ok = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", sh.token));
    if !auth_ok {
        return ApiError::new(401, "Unauthorized", "Unauthorized").into_response();
    }
    match dispatch(&sh, &parts.method, &path, &query, &parts.headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn user_agent_manager(h: &HeaderMap) -> String {
    h.get("user-agent")
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

async fn dispatch(
    sh: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return Ok(json_response(200, &version())),
        ["healthz" | "readyz" | "livez", ..] => {
            return Ok(Response::builder()
                .status(200)
                .body(Body::from("ok"))
                .unwrap_or_default())
        }
        ["api"] => return Ok(json_response(200, &api_versions(sh))),
        ["openapi", "v3"] => return Ok(json_response(200, &openapi_root(sh))),
        ["openapi", "v3", rest @ ..] => {
            return match openapi_gv(sh, &rest.join("/")) {
                Some(doc) => Ok(json_response(200, &doc)),
                None => Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )),
            }
        }
        ["apis"] => return Ok(json_response(200, &group_list(sh))),
        ["api", "v1"] => return Ok(json_response(200, &resource_list(sh, "", "v1"))),
        ["apis", g] => {
            return match group_list(sh)["groups"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == *g))
            {
                Some(grp) => {
                    let mut grp = grp.clone();
                    grp["kind"] = json!("APIGroup");
                    grp["apiVersion"] = json!("v1");
                    Ok(json_response(200, &grp))
                }
                None => Err(ApiError::not_found("", "", "")),
            }
        }
        ["apis", g, v] => {
            let l = resource_list(sh, g, v);
            if l["resources"].as_array().is_none_or(|a| a.is_empty()) {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            return Ok(json_response(200, &l));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ))
        }
    };
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    // /namespaces/{ns}/{plural}[/{name}[/{sub}]] or /{plural}[/{name}[/{sub}]]
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !(matches!(*plural, "status" | "finalize") && tail.is_empty()) =>
        {
            (
                Some(ns.to_string()),
                *plural,
                tail.first().copied(),
                tail.get(1).copied(),
            )
        }
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        [] => return Err(not_found()),
    };
    let rt = sh
        .store
        .resolve(group, version, plural)
        .ok_or_else(not_found)?;
    if rt.namespaced && ns.is_none() && name.is_some() {
        return Err(not_found());
    }
    let t = Target {
        ns: if rt.namespaced { ns } else { None },
        rt,
        name: name.map(String::from),
        sub: sub.unwrap_or("").to_string(),
    };
    let verb = match (method.as_str(), t.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if truthy(q, "watch") => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("POST", true) if !t.sub.is_empty() => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed()),
    };
    let resource = if t.sub.is_empty() {
        t.rt.plural.clone()
    } else {
        format!("{}/{}", t.rt.plural, t.sub)
    };
    sh.count(verb, &resource);
    let name = t.name.clone().unwrap_or_default();
    if let Some(inj) = sh.take_injection(verb, &t.rt.plural, &name, &t.sub) {
        let msg = inj
            .message
            .unwrap_or_else(|| format!("injected by kubesim: {} {}", inj.code, inj.reason));
        return Err(ApiError::new(inj.code, &inj.reason, msg));
    }
    sh.black_hole(verb, &t.rt.plural, &name, &t.sub).await;
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) && !matches!(verb, "get" | "list" | "watch") {
        // Better refused than persisted: a dry run here would really write.
        return Err(ApiError::bad_request(
            "kubesim does not support dryRun (see README: Simulated cluster)",
        ));
    }
    let table = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let include = q
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    let ns = t.ns.clone().unwrap_or_default();
    let manager = q
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| user_agent_manager(headers));
    match verb {
        "get" => match t.sub.as_str() {
            "" | "status" => {
                let o = sh.store.get(&t.rt, &ns, &name)?;
                if table {
                    let rv = o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    return Ok(json_response(
                        200,
                        &table::table(&t.rt, &[o], &rv, true, &include),
                    ));
                }
                Ok(json_response(200, &o))
            }
            "log" if t.rt.plural == "pods" => {
                let pod = sh.store.get(&t.rt, &ns, &name)?;
                sh.kubelet.logs(&pod, q).await
            }
            _ => Err(not_found()),
        },
        "list" => list(sh, &t, q, table, &include),
        "watch" => watch(sh, &t, q, table, &include),
        "create" => {
            let mut obj = parse_body(&body, headers)?;
            match t.sub.as_str() {
                "" => {
                    if t.rt.plural == "pods" {
                        admit_pod(sh, &obj)?;
                    }
                    let pruned = prune_write(&t.rt, &mut obj, field_validation(q)?)?;
                    let o = sh.store.create(&t.rt, &ns, obj, How::Update { manager })?;
                    Ok(with_warnings(json_response(201, &o), &pruned))
                }
                "eviction" if t.rt.plural == "pods" => evict(sh, &t.rt, &ns, &name, &obj),
                "binding" if t.rt.plural == "pods" => {
                    let node = obj["target"]["name"].as_str().unwrap_or("").to_string();
                    crate::kubelet::bind(&sh.store, &t.rt, &ns, &name, &node)?;
                    Ok(json_response(
                        201,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                    ))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        "update" => {
            if !matches!(t.sub.as_str(), "" | "status") {
                return Err(ApiError::method_not_allowed());
            }
            let mut obj = parse_body(&body, headers)?;
            let pruned = prune_write(&t.rt, &mut obj, field_validation(q)?)?;
            let rv = obj["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if rv.is_empty() && t.rt.custom {
                return Err(ApiError::invalid(
                    &t.rt.group,
                    &t.rt.kind,
                    &name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            let o = sh.store.update(
                &t.rt,
                &ns,
                &name,
                &t.sub,
                obj,
                Some(&rv),
                How::Update { manager },
            )?;
            Ok(with_warnings(json_response(200, &o), &pruned))
        }
        "patch" => {
            if !matches!(t.sub.as_str(), "" | "status") {
                return Err(ApiError::method_not_allowed());
            }
            patch(sh, &t, &ns, &name, q, headers, &body, manager)
        }
        "delete" => {
            let opts = delete_opts(q, &body)?;
            let (o, gone) = sh.store.delete(&t.rt, &ns, &name, &opts)?;
            if gone && t.rt.plural != "pods" {
                return Ok(json_response(
                    200,
                    &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": t.rt.group, "kind": t.rt.plural, "uid": o["metadata"]["uid"]}}),
                ));
            }
            Ok(json_response(200, &o))
        }
        "deletecollection" => {
            let opts = delete_opts(q, &body)?;
            let labels =
                LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
            let fields = FieldSelector::parse(
                q.get("fieldSelector").map(String::as_str).unwrap_or(""),
                &t.rt.plural,
            )?;
            let (items, rv, _) = sh
                .store
                .list(&t.rt, t.ns.as_deref(), &labels, &fields, None);
            let mut out = Vec::new();
            for o in items {
                let n = o["metadata"]["name"].as_str().unwrap_or("").to_string();
                let ons = o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if let Ok((d, _)) = sh.store.delete(&t.rt, &ons, &n, &opts) {
                    out.push(d);
                }
            }
            Ok(json_response(
                200,
                &json!({"apiVersion": t.rt.api_version(), "kind": format!("{}List", t.rt.kind), "metadata": {"resourceVersion": rv.to_string()}, "items": out}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// A YAML body. Clients mostly send JSON (a subset of YAML): that is parsed as JSON first,
/// which is far cheaper and gives the same value.
fn from_yaml(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

fn parse_body(body: &[u8], headers: &HeaderMap) -> Result<Value, ApiError> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.contains("yaml") {
        return from_yaml(body);
    }
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::unsupported_media(format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})")));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the body of the request was not valid JSON: {e}"))
    })
}

fn delete_opts(q: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOpts, ApiError> {
    let b: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let grace = b["gracePeriodSeconds"]
        .as_i64()
        .or_else(|| q.get("gracePeriodSeconds").and_then(|s| s.parse().ok()));
    let prop = b["propagationPolicy"]
        .as_str()
        .map(String::from)
        .or_else(|| q.get("propagationPolicy").cloned());
    let propagation = match prop.as_deref() {
        None => {
            if b["orphanDependents"] == true {
                Some(Propagation::Orphan)
            } else {
                None
            }
        }
        Some("Background") => Some(Propagation::Background),
        Some("Foreground") => Some(Propagation::Foreground),
        Some("Orphan") => Some(Propagation::Orphan),
        Some(other) => {
            return Err(ApiError::invalid("", "DeleteOptions", "", "propagationPolicy", &format!("Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\"")))
        }
    };
    Ok(DeleteOpts {
        grace,
        propagation,
        uid: b["preconditions"]["uid"].as_str().map(String::from),
        resource_version: b["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from),
    })
}

/// Pod Security "baseline" (when the knob is on): no privileged containers.
fn admit_pod(sh: &Shared, pod: &Value) -> Result<(), ApiError> {
    if !sh.knobs.refuse_privileged.load(Ordering::SeqCst) {
        return Ok(());
    }
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let privileged: Vec<String> = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| pod["spec"][l].as_array().cloned().unwrap_or_default())
        .filter(|c| c["securityContext"]["privileged"] == true)
        .map(|c| format!("\"{}\"", c["name"].as_str().unwrap_or("")))
        .collect();
    if privileged.is_empty() {
        return Ok(());
    }
    let what = if privileged.len() == 1 {
        format!("container {}", privileged[0])
    } else {
        format!("containers {}", privileged.join(", "))
    };
    Err(ApiError::forbidden(format!(
        "pods \"{name}\" is forbidden: violates PodSecurity \"baseline:latest\": privileged ({what} must not set securityContext.privileged=true)"
    )))
}

fn evict(
    sh: &Shared,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    body: &Value,
) -> Result<Response, ApiError> {
    sh.store.get(rt, ns, name)?;
    let _ = sh.store.modify(rt, ns, name, "status", |cur, _| {
        let mut n = cur.clone();
        crate::kubelet::set_condition(
            &mut n,
            "DisruptionTarget",
            "True",
            "EvictionByEvictionAPI",
            "Eviction API: evicting",
        );
        Ok((
            n,
            How::Update {
                manager: "kube-apiserver".into(),
            },
        ))
    });
    let grace = body["deleteOptions"]["gracePeriodSeconds"].as_i64();
    sh.store.delete(
        rt,
        ns,
        name,
        &DeleteOpts {
            grace,
            ..Default::default()
        },
    )?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    sh: &Shared,
    t: &Target,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    manager: String,
) -> Result<Response, ApiError> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let rt = &t.rt;
    let sub = t.sub.as_str();
    let accepted = "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";
    let check_rv = |cur: &Value, n: &Value| -> Result<(), ApiError> {
        let want = n["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !want.is_empty() && want != cur["metadata"]["resourceVersion"].as_str().unwrap_or("") {
            return Err(ApiError::stale(&rt.group, &rt.plural, name));
        }
        Ok(())
    };
    let fv = field_validation(q)?;
    // The fields pruned from what the client sent (reported as warnings under Warn).
    let mut pruned = Vec::new();
    let o = match ct.as_str() {
        "application/apply-patch+yaml" => {
            let Some(fm) = q.get("fieldManager").filter(|s| !s.is_empty()).cloned() else {
                return Err(ApiError::bad_request(
                    "PATCH /apply requests require a fieldManager",
                ));
            };
            let force = truthy(q, "force");
            let mut applied: Value = from_yaml(body)?;
            if applied["apiVersion"].as_str() != Some(rt.api_version().as_str())
                || applied["kind"].as_str() != Some(rt.kind.as_str())
            {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({}) does not match the expected API version ({}) or the kind ({}) does not match {}",
                    applied["apiVersion"].as_str().unwrap_or(""), rt.api_version(), applied["kind"].as_str().unwrap_or(""), rt.kind)));
            }
            crate::store::shape(rt, &applied)?;
            pruned = prune_write(rt, &mut applied, fv)?;
            let an = applied["metadata"]["name"].as_str().unwrap_or("");
            if !an.is_empty() && an != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({an}) does not match the name on the URL ({name})"
                )));
            }
            if sub == "status" {
                let status = applied.get("status").cloned().unwrap_or(json!({}));
                let meta = applied["metadata"].clone();
                applied = json!({"apiVersion": applied["apiVersion"], "kind": applied["kind"], "metadata": meta, "status": status});
                // Only status is applied through /status.
                let rv = applied["metadata"]["resourceVersion"].clone();
                applied["metadata"] = json!({"name": name});
                if !rv.is_null() {
                    applied["metadata"]["resourceVersion"] = rv;
                }
            } else if rt.status {
                applied.as_object_mut().map(|m| m.remove("status"));
            }
            let api_version = rt.api_version();
            match sh.store.current(rt, ns, name) {
                Err(e) if e.code == 404 => {
                    if sub == "status" {
                        return Err(e);
                    }
                    if rt.plural == "pods" {
                        admit_pod(sh, &applied)?;
                    }
                    let mut managers = Vec::new();
                    let mut clean = applied.clone();
                    clean["metadata"]
                        .as_object_mut()
                        .map(|m| m.remove("resourceVersion"));
                    let obj = fields::apply(
                        &mut managers,
                        &fm,
                        "",
                        &api_version,
                        &json!({}),
                        &clean,
                        force,
                        &crate::store::now(),
                    )
                    .map_err(|c| conflict_error(rt, name, &c))?;
                    let mut obj = obj;
                    obj["metadata"]["name"] = json!(name);
                    let o = sh.store.create(rt, ns, obj, How::Applied { managers })?;
                    return Ok(with_warnings(json_response(201, &o), &pruned));
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            sh.store.modify(rt, ns, name, sub, |cur, managers| {
                check_rv(cur, &applied)?;
                let mut ms = managers.to_vec();
                let mut clean = applied.clone();
                clean["metadata"]
                    .as_object_mut()
                    .map(|m| m.remove("resourceVersion"));
                let mut stored = cur.clone();
                as_read(rt, &mut stored);
                let n = fields::apply(
                    &mut ms,
                    &fm,
                    sub,
                    &api_version,
                    &stored,
                    &clean,
                    force,
                    &crate::store::now(),
                )
                .map_err(|c| conflict_error(rt, name, &c))?;
                Ok((n, How::Applied { managers: ms }))
            })?
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            if ct.starts_with("application/strategic") && rt.custom {
                return Err(ApiError::unsupported_media(accepted));
            }
            let p: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            sh.store.modify(rt, ns, name, sub, |cur, _| {
                let mut n = cur.clone();
                as_read(rt, &mut n);
                json_patch::merge(&mut n, &p);
                check_rv(cur, &n)?;
                pruned = prune_write(rt, &mut n, fv)?;
                Ok((n, How::Update { manager }))
            })?
        }
        "application/json-patch+json" => {
            let p: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            sh.store.modify(rt, ns, name, sub, |cur, _| {
                let mut n = cur.clone();
                as_read(rt, &mut n);
                json_patch::patch(&mut n, &p).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
                check_rv(cur, &n)?;
                pruned = prune_write(rt, &mut n, fv)?;
                Ok((n, How::Update { manager }))
            })?
        }
        _ => return Err(ApiError::unsupported_media(accepted)),
    };
    Ok(with_warnings(json_response(200, &o), &pruned))
}

fn conflict_error(rt: &ResourceType, name: &str, c: &[fields::Conflict]) -> ApiError {
    let n = c.len();
    let list: Vec<String> = c
        .iter()
        .map(|c| format!("conflict with \"{}\": {}", c.manager, c.path))
        .collect();
    let mut e = ApiError::new(
        409,
        "Conflict",
        format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            list.join("\n")
        ),
    );
    e.details = Some(json!({
        "name": name, "group": rt.group, "kind": rt.plural,
        "causes": c.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.path})).collect::<Vec<_>>(),
    }));
    e
}

fn continue_token(ns: &str, name: &str, rv: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{rv}\u{0}{ns}\u{0}{name}"))
}

fn list(
    sh: &Shared,
    t: &Target,
    q: &HashMap<String, String>,
    table: bool,
    include: &str,
) -> Result<Response, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        &t.rt.plural,
    )?;
    let limit: usize = q.get("limit").and_then(|s| s.parse().ok()).unwrap_or(0);
    let after = match q.get("continue").filter(|s| !s.is_empty()) {
        Some(tok) => {
            use base64::Engine;
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(tok)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::bad_request("continue key is not valid: illegal base64 data")
                })?;
            let mut it = raw.split('\u{0}');
            let rv: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let ns = it.next().unwrap_or("").to_string();
            let name = it.next().unwrap_or("").to_string();
            Some((rv, ns, name))
        }
        None => None,
    };
    let (mut items, rv, compacted) = sh.store.list(
        &t.rt,
        t.ns.as_deref(),
        &labels,
        &fields,
        after
            .as_ref()
            .map(|(_, a, b)| (a.clone(), b.clone()))
            .as_ref(),
    );
    if let Some((trv, _, _)) = &after {
        if *trv < compacted {
            return Err(ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
        }
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = &items[limit - 1];
        meta["continue"] = json!(continue_token(
            last["metadata"]["namespace"].as_str().unwrap_or(""),
            last["metadata"]["name"].as_str().unwrap_or(""),
            after.as_ref().map(|a| a.0).unwrap_or(rv)
        ));
        meta["remainingItemCount"] = json!(remaining);
    }
    if table {
        let mut tb = table::table(&t.rt, &items, &rv.to_string(), true, include);
        tb["metadata"] = meta;
        return Ok(json_response(200, &tb));
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": t.rt.api_version(), "kind": format!("{}List", t.rt.kind), "metadata": meta, "items": items,
        }),
    ))
}

/// What one watcher sees of an event, given its selectors (a selector transition is an
/// ADDED or DELETED, as the real watch cache reports it).
fn view(
    ev: &Event,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(EvType, Arc<Value>)> {
    let m = |o: &Value| labels.matches(o) && fields.matches(o);
    let now = m(&ev.obj);
    let before = ev.old.as_ref().map(|o| m(o));
    match (ev.ty, now, before) {
        (EvType::Added, true, _) => Some((EvType::Added, ev.obj.clone())),
        (EvType::Modified, true, Some(true)) => Some((EvType::Modified, ev.obj.clone())),
        (EvType::Modified, true, _) => Some((EvType::Added, ev.obj.clone())),
        (EvType::Modified, false, Some(true)) => Some((EvType::Deleted, ev.obj.clone())),
        (EvType::Deleted, _, _) if m(&ev.obj) || before == Some(true) => {
            Some((EvType::Deleted, ev.obj.clone()))
        }
        _ => None,
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn watch(
    sh: &Arc<Shared>,
    t: &Target,
    q: &HashMap<String, String>,
    table: bool,
    include: &str,
) -> Result<Response, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector").map(String::as_str).unwrap_or(""),
        &t.rt.plural,
    )?;
    let rv_param = q.get("resourceVersion").filter(|s| !s.is_empty()).cloned();
    let send_initial = truthy(q, "sendInitialEvents");
    let from = match rv_param.as_deref() {
        None | Some("0") => None,
        Some(_) if send_initial => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        ),
    };
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rt = t.rt.clone();
    let ns = t.ns.clone();
    let start = sh.store.watch_start(&rt, ns.as_deref(), from);
    let (mut brx, initial, start_rv) = match start {
        Ok(s) => s,
        Err(e) => {
            // A too-old version: the stream opens, then one ERROR event with the 410 Status.
            let _ = tx.send(line(&json!({"type": "ERROR", "object": e.status()})));
            drop(tx);
            return Ok(stream_response(rx));
        }
    };
    let sh = sh.clone();
    let include = include.to_string();
    let bookmark_every = Duration::from_secs(sh.bookmark_seconds.max(1));
    tokio::spawn(async move {
        let mut first_table = true;
        let render = |ty: &str, obj: &Value, first: &mut bool| -> Bytes {
            if table {
                let rv = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let tb = table::table(&rt, std::slice::from_ref(obj), &rv, *first, &include);
                *first = false;
                line(&json!({"type": ty, "object": tb}))
            } else {
                line(&json!({"type": ty, "object": obj}))
            }
        };
        // Delivery times: with the delay knob each event waits 50–500 ms, order kept.
        let mut last_due = tokio::time::Instant::now();
        let mut due = |sh: &Shared| {
            let now = tokio::time::Instant::now();
            if sh.knobs.watch_delay.load(Ordering::SeqCst) {
                let d = Duration::from_millis(50 + crate::store::random_u64() % 451);
                last_due = last_due.max(now + d);
            } else {
                last_due = last_due.max(now);
            }
            last_due
        };
        let (dtx, mut drx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Bytes)>();
        let deliver = {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some((at, b)) = drx.recv().await {
                    tokio::time::sleep_until(at).await;
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            })
        };
        for ev in &initial {
            if let Some((ty, obj)) = view(ev, &labels, &fields) {
                let _ = dtx.send((due(&sh), render(ty.as_str(), &obj, &mut first_table)));
            }
        }
        if send_initial {
            let bm = json!({"kind": rt.kind, "apiVersion": rt.api_version(),
                "metadata": {"resourceVersion": start_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
            let _ = dtx.send((due(&sh), line(&json!({"type": "BOOKMARK", "object": bm}))));
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        let mut seen = start_rv;
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = tx.closed() => break,
                _ = tick.tick(), if bookmarks => {
                    let rv = sh.store.current_rv();
                    let bm = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    let _ = dtx.send((due(&sh), line(&json!({"type": "BOOKMARK", "object": bm}))));
                }
                r = brx.recv() => match r {
                    Ok(ev) => {
                        if ev.rv <= seen || ev.group != rt.group || ev.plural != rt.plural || ns.as_deref().is_some_and(|n| n != ev.namespace) {
                            continue;
                        }
                        seen = ev.rv;
                        if let Some((ty, obj)) = view(&ev, &labels, &fields) {
                            let _ = dtx.send((due(&sh), render(ty.as_str(), &obj, &mut first_table)));
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let e = ApiError::gone("too old resource version: the watcher fell behind");
                        let _ = dtx.send((due(&sh), line(&json!({"type": "ERROR", "object": e.status()}))));
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        drop(dtx);
        let _ = deliver.await;
    });
    Ok(stream_response(rx))
}

fn stream_response(rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>) -> Response {
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let stream = futures::StreamExt::map(stream, Ok::<Bytes, std::convert::Infallible>);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// OpenAPI v3, just enough for kubectl: every group version, and for each resource a PATCH
/// operation with its kind and the `fieldValidation` parameter, so kubectl leaves
/// validation to the server (which, here, prunes custom resources' unknown fields and
/// checks no types: see README) instead of downloading schemas this simulator does not have.
fn openapi_root(sh: &Shared) -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<String> = sh
        .store
        .types()
        .iter()
        .map(|t| {
            if t.group.is_empty() {
                "api/v1".to_string()
            } else {
                format!("apis/{}/{}", t.group, t.version)
            }
        })
        .collect();
    gvs.sort();
    gvs.dedup();
    for gv in gvs {
        paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", sh.store.current_rv())}));
    }
    json!({"paths": paths})
}

fn openapi_gv(sh: &Shared, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for t in sh
        .store
        .types()
        .into_iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        paths.insert(path, json!({"patch": {
            "x-kubernetes-group-version-kind": {"group": t.group, "version": t.version, "kind": t.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                           {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}}}}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0-kubesim"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kubesim", "gitCommit": "kubesim",
           "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
           "compiler": "gc", "platform": "linux/amd64"})
}

fn api_versions(sh: &Shared) -> Value {
    let addr = sh
        .addr
        .lock()
        .ok()
        .and_then(|a| *a)
        .map(|a| a.to_string())
        .unwrap_or_default();
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]})
}

fn group_list(sh: &Shared) -> Value {
    let mut groups: Vec<(String, String)> = sh
        .store
        .types()
        .into_iter()
        .filter(|t| !t.group.is_empty())
        .map(|t| (t.group, t.version))
        .collect();
    groups.sort();
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(sh: &Shared, group: &str, version: &str) -> Value {
    let mut res = Vec::new();
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    for t in sh
        .store
        .types()
        .into_iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let mut r = json!({"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                           "kind": t.kind, "verbs": verbs});
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if t.plural == "pods" || t.custom {
            r["categories"] = json!(["all"]);
        }
        res.push(r);
        if t.status {
            res.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                            "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
        for s in &t.extra_subresources {
            let (kind, verbs, grp) = match *s {
                "log" => ("Pod", json!(["get"]), None),
                "eviction" => ("Eviction", json!(["create"]), Some("policy")),
                _ => ("Binding", json!(["create"]), None),
            };
            let mut r = json!({"name": format!("{}/{s}", t.plural), "singularName": "", "namespaced": t.namespaced,
                               "kind": kind, "verbs": verbs});
            if let Some(g) = grp {
                r["group"] = json!(g);
                r["version"] = json!("v1");
            }
            res.push(r);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res})
}

/// `/sim/...`: the knobs for a process that is not the test (kubectl users, the binary's
/// own tests). JSON in, JSON out.
async fn admin(sh: &Arc<Shared>, method: &Method, rest: &str, body: &[u8]) -> Response {
    let b: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let on = b["on"].as_bool().unwrap_or(true);
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let ok = || json_response(200, &json!({"ok": true}));
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["watch-delay"]) => {
            sh.knobs.watch_delay.store(on, Ordering::SeqCst);
            ok()
        }
        ("POST", ["refuse-privileged"]) => {
            sh.knobs.refuse_privileged.store(on, Ordering::SeqCst);
            ok()
        }
        ("POST", ["unschedulable"]) => {
            sh.knobs.unschedulable.store(on, Ordering::SeqCst);
            ok()
        }
        ("POST", ["inject"]) => match serde_json::from_value::<Injection>(b) {
            Ok(i) => {
                sh.inject(i);
                ok()
            }
            Err(e) => ApiError::bad_request(format!(
                "want {{verb, resource, name?, subresource?, code, reason, message?}}: {e}"
            ))
            .into_response(),
        },
        ("POST", ["black-hole"]) => match serde_json::from_value::<Matcher>(b) {
            Ok(m) => {
                sh.black_hole_add(m);
                ok()
            }
            Err(e) => {
                ApiError::bad_request(format!("want {{verb, resource, name?, subresource?}}: {e}"))
                    .into_response()
            }
        },
        ("POST", ["swallow-once"]) => match serde_json::from_value::<Matcher>(b) {
            Ok(m) => {
                sh.swallow_once(m);
                ok()
            }
            Err(e) => {
                ApiError::bad_request(format!("want {{verb, resource, name?, subresource?}}: {e}"))
                    .into_response()
            }
        },
        ("DELETE", ["black-hole"]) => {
            sh.black_hole_clear();
            ok()
        }
        ("GET", ["counters"]) => json_response(200, &json!(sh.counters())),
        ("DELETE", ["counters"]) => {
            sh.reset_counters();
            ok()
        }
        ("POST", ["compact"]) => {
            sh.store.compact();
            ok()
        }
        ("POST", ["instant-message"]) => {
            sh.kubelet
                .set_instant_message(b["message"].as_str().unwrap_or(""));
            ok()
        }
        ("POST", ["pods", ns, name, fault]) => {
            let f = match *fault {
                "evict" => crate::kubelet::Fault::Evict,
                "oom" => crate::kubelet::Fault::Oom,
                "lose-node" => crate::kubelet::Fault::LoseNode,
                _ => {
                    return ApiError::new(404, "NotFound", "faults: evict, oom, lose-node")
                        .into_response()
                }
            };
            match sh.kubelet.fault(ns, name, f).await {
                Ok(()) => ok(),
                Err(e) => e.into_response(),
            }
        }
        _ => ApiError::new(404, "NotFound", "unknown /sim route").into_response(),
    }
}
