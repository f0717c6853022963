//! Request validation for `POST /` and the route parameters. Pure functions: JSON in,
//! `BuildSpec` or the legacy error message out.

use crate::build::{BuildSpec, RegistryAuth};
use crate::pipeline::sources;
use crate::secret::Secret;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

pub const MISSING_FIELDS: &str = "Bad Request - missing fields.";
pub const BAD_BUILD_UUID: &str = "Bad Request - build uuid is invalid.";
/// The build args (EXTRA_BUILD_ARGS included) as JSON, URL-encoded, at most. No count:
/// controller-api sends every config var of an app, and the old shuttle took any number. But
/// dockerd's API takes them in the build request's URL, which the HTTP client caps at 64 KiB
/// with everything else in it (tags, labels, the cache image); past this a build would fail.
pub const MAX_BUILD_ARGS_BYTES: usize = 48 * 1024;

/// The longest string field (names, hosts, the sha, branch, repo, org, a login): far
/// past any real value, and a BuildJob, its Secret and a worker's environment (128 KiB per
/// variable) stay small.
const MAX_FIELD: usize = 4 * 1024;
/// The longest URL (callback, http(s) sources: a presigned URL is 1–2 KiB) or credential
/// (registry tokens and key files run to a few KiB).
const MAX_LONG_FIELD: usize = 16 * 1024;
/// librdkafka starts a thread per broker of a producer.
const MAX_KAFKA_BROKERS: usize = 32;

const REQUIRED: [&str; 8] = [
    "sources",
    "app",
    "space",
    "app_uuid",
    "gm_registry_host",
    "gm_registry_repo",
    "build_number",
    "build_uuid",
];

/// A validation failure; the message goes to the client as `{"status": message}`.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

fn bad(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// A canonical hyphenated UUID, the whole string (no braces, no urn: prefix).
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// controller-api's rule for app names: 1–63 characters of `[A-Za-z0-9]`.
pub fn is_app_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Splits `{app}-{app_uuid}`; `None` when either part is malformed.
pub fn parse_app_key(key: &str) -> Option<(String, String)> {
    let (app, app_uuid) = key.split_once('-')?;
    (is_app_name(app) && parse_uuid(app_uuid).is_some())
        .then(|| (app.to_string(), app_uuid.to_string()))
}

/// A positive build number: a JSON integer or a string of digits.
pub fn parse_build_number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().filter(|n| *n > 0),
        Value::String(s)
            if !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok().filter(|n| *n > 0)
        }
        _ => None,
    }
}

fn present(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, Invalid> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(bad(format!("Bad Request - {name} must be a string."))),
    }
}

fn required_string(obj: &Map<String, Value>, name: &str) -> Result<String, Invalid> {
    string_field(obj, name)?.ok_or_else(|| bad(MISSING_FIELDS))
}

/// Checks a `sources` URI without copying it: a `data:` URI's payload (possibly hundreds of
/// MiB) is not looked at here, only its header; the payload is decoded when it is staged.
pub fn check_sources(uri: &str) -> Result<sources::Source, sources::SourceError> {
    let is_data = uri
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"));
    match uri.find(',') {
        Some(comma) if is_data => sources::parse(&uri[..=comma]),
        _ => sources::parse(uri),
    }
}

/// The body's fields `build_spec` reads; every other key's value is skipped unparsed.
const FIELDS: [&str; 20] = [
    "build_uuid",
    "app",
    "space",
    "app_uuid",
    "build_number",
    "sources",
    "gm_registry_host",
    "gm_registry_repo",
    "gm_registry_auth",
    "build_args",
    "callback",
    "callback_auth",
    "kafka_hosts",
    "sha",
    "branch",
    "repo",
    "org",
    "docker_registry",
    "docker_login",
    "docker_password",
];
/// A field other than `sources` longer than this, as JSON, is refused unparsed: none can be
/// valid (build args past it are more than `MAX_BUILD_ARGS_BYTES` once decoded).
const MAX_FIELD_JSON: usize = 1 << 20;
pub const MALFORMED: &str = "Bad Request - malformed JSON.";
const NOT_AN_OBJECT: &str = "Bad Request - the body must be a JSON object.";

/// Parses a `POST /` body into the object `build_spec` takes, keeping only the fields it
/// reads. Parsing a whole body into a `Value` costs 16–32 times the bytes of a body made of
/// many small values (`[0,0,0,…]`), so a body within MAX_REQUEST_BYTES could exhaust memory:
/// here other keys' values are skipped as they are read, and a known field is parsed only
/// when its JSON is small (or it is `sources`, a string). Duplicate keys: the last wins, as
/// with `JSON.parse`.
pub fn parse_body(body: &[u8]) -> Result<Value, Invalid> {
    let known = match serde_json::from_slice::<Known<'_>>(body) {
        Ok(k) => k,
        Err(e) if e.is_data() => return Err(bad(NOT_AN_OBJECT)),
        Err(_) => return Err(bad(MALFORMED)),
    };
    let mut obj = Map::new();
    for (name, raw) in known.0 {
        let json = raw.get();
        if name != "sources" && json.len() > MAX_FIELD_JSON {
            return Err(bad(format!("Bad Request - {name} is too large.")));
        }
        let value = serde_json::from_str(json).map_err(|_| bad(MALFORMED))?;
        obj.insert(name.to_string(), value);
    }
    Ok(Value::Object(obj))
}

/// The known fields of a body, each as its raw JSON (borrowed from the body).
struct Known<'a>(Vec<(&'static str, &'a serde_json::value::RawValue)>);

impl<'de> serde::Deserialize<'de> for Known<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Known<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Known<'de>, M::Error> {
                let mut found: Vec<(&'static str, &'de serde_json::value::RawValue)> = Vec::new();
                while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                    match FIELDS.iter().find(|f| **f == key) {
                        Some(&name) => {
                            let raw = m.next_value()?;
                            found.retain(|(n, _)| *n != name);
                            found.push((name, raw));
                        }
                        None => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(Known(found))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Validates a `POST /` body and turns it into a spec; `extra_args` (EXTRA_BUILD_ARGS) are
/// merged under the request's own build args. Takes the body by value so the (possibly
/// large) `sources` string moves into the spec instead of being copied.
pub fn build_spec(
    body: Value,
    extra_args: &BTreeMap<String, String>,
) -> Result<BuildSpec, Invalid> {
    let Value::Object(mut obj) = body else {
        return Err(bad("Bad Request - the body must be a JSON object."));
    };
    if !REQUIRED.iter().all(|f| present(obj.get(*f))) {
        return Err(bad(MISSING_FIELDS));
    }
    let build_uuid = required_string(&obj, "build_uuid")?;
    let build_uuid = parse_uuid(&build_uuid).ok_or_else(|| bad(BAD_BUILD_UUID))?;
    let app = required_string(&obj, "app")?;
    if !is_app_name(&app) {
        return Err(bad("Bad Request - app must be 1 to 63 letters or digits."));
    }
    let app_uuid = required_string(&obj, "app_uuid")?;
    if parse_uuid(&app_uuid).is_none() {
        return Err(bad("Bad Request - app uuid is invalid."));
    }
    let build_number = obj
        .get("build_number")
        .and_then(parse_build_number)
        .ok_or_else(|| bad("Bad Request - build number must be a positive integer."))?;
    let sources_uri = match obj.remove("sources") {
        Some(Value::String(s)) => s,
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        _ => return Err(bad("Bad Request - sources must be a string.")),
    };
    if let Err(e) = check_sources(&sources_uri) {
        let msg = match e {
            sources::SourceError::BadDockerRef(_) => {
                "Bad Request - sources is not a valid docker:// image reference."
            }
            sources::SourceError::UnsupportedScheme(_) => {
                "Bad Request - sources must be an http, https, data or docker URI."
            }
            _ => "Bad Request - sources is not a valid URI.",
        };
        return Err(bad(msg));
    }
    let gm_registry_host = required_string(&obj, "gm_registry_host")?;
    let gm_registry_repo = required_string(&obj, "gm_registry_repo")?;
    if gm_registry_host.contains(char::is_whitespace)
        || gm_registry_repo.contains(char::is_whitespace)
    {
        return Err(bad(
            "Bad Request - registry host and repo must not contain spaces.",
        ));
    }

    let mut build_args = extra_args.clone();
    match obj.get("build_args") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => String::new(),
                    _ => return Err(bad("Bad Request - build_args values must be strings.")),
                };
                // The request wins over EXTRA_BUILD_ARGS by the name dockerd sees (keys are
                // stripped to [A-Za-z0-9_]): `NPM-TOKEN` here replaces an extra `NPMTOKEN`.
                let name = crate::build::sanitize_arg_key(k);
                build_args.retain(|e, _| {
                    !(extra_args.contains_key(e) && crate::build::sanitize_arg_key(e) == name)
                });
                build_args.insert(k.clone(), v);
            }
        }
        Some(_) => return Err(bad("Bad Request - build_args must be an object.")),
    }
    let arg_bytes = serde_json::to_string(&build_args).map_or(usize::MAX, |json| {
        url::form_urlencoded::byte_serialize(json.as_bytes())
            .map(str::len)
            .sum()
    });
    if arg_bytes > MAX_BUILD_ARGS_BYTES {
        return Err(bad(format!(
            "Bad Request - build args are too large: {arg_bytes} bytes once URL-encoded, at most {} KiB (dockerd takes them in its request URL).",
            MAX_BUILD_ARGS_BYTES / 1024
        )));
    }

    let gm_registry_auth = match obj.get("gm_registry_auth") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let username = string_field(m, "username")?.unwrap_or_default();
            let password = string_field(m, "password")?.unwrap_or_default();
            (!username.is_empty() || !password.is_empty()).then(|| RegistryAuth {
                username,
                password: Secret::new(password),
            })
        }
        Some(_) => return Err(bad("Bad Request - gm_registry_auth must be an object.")),
    };
    let callback = string_field(&obj, "callback")?.filter(|s| !s.is_empty());
    if let Some(cb) = &callback {
        let ok = reqwest::Url::parse(cb).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !ok {
            return Err(bad("Bad Request - callback must be an http or https URL."));
        }
    }
    let nonempty = |name: &str| -> Result<Option<String>, Invalid> {
        let value = string_field(&obj, name)?.filter(|s| !s.is_empty());
        let long = matches!(name, "callback_auth" | "docker_password");
        let max = if long { MAX_LONG_FIELD } else { MAX_FIELD };
        match value {
            Some(v) if v.len() > max => Err(bad(format!(
                "Bad Request - {name} is too long (at most {} KiB).",
                max / 1024
            ))),
            v => Ok(v),
        }
    };
    for (name, value) in [
        ("space", obj.get("space")),
        ("gm_registry_host", obj.get("gm_registry_host")),
        ("gm_registry_repo", obj.get("gm_registry_repo")),
    ] {
        if value
            .and_then(Value::as_str)
            .is_some_and(|v| v.len() > MAX_FIELD)
        {
            return Err(bad(format!(
                "Bad Request - {name} is too long (at most {} KiB).",
                MAX_FIELD / 1024
            )));
        }
    }
    if callback.as_ref().is_some_and(|c| c.len() > MAX_LONG_FIELD)
        || (!sources_uri
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
            && sources_uri.len() > MAX_LONG_FIELD)
    {
        return Err(bad(format!(
            "Bad Request - callback and http sources URLs are at most {} KiB.",
            MAX_LONG_FIELD / 1024
        )));
    }
    if let Some(hosts) = string_field(&obj, "kafka_hosts")? {
        if hosts.split(',').filter(|h| !h.trim().is_empty()).count() > MAX_KAFKA_BROKERS {
            return Err(bad(format!(
                "Bad Request - kafka_hosts names more than {MAX_KAFKA_BROKERS} brokers."
            )));
        }
    }
    Ok(BuildSpec {
        build_uuid,
        app,
        space: required_string(&obj, "space")?,
        app_uuid,
        build_number,
        sources: Secret::new(sources_uri),
        sources_stored: false,
        sha: nonempty("sha")?,
        branch: nonempty("branch")?,
        repo: nonempty("repo")?,
        org: nonempty("org")?,
        callback,
        callback_auth: nonempty("callback_auth")?.map(Secret::new),
        kafka_hosts: nonempty("kafka_hosts")?,
        gm_registry_host,
        gm_registry_repo,
        gm_registry_auth,
        build_args,
        docker_registry: nonempty("docker_registry")?,
        docker_login: nonempty("docker_login")?,
        docker_password: nonempty("docker_password")?.map(Secret::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_body_keeps_the_known_fields_and_skips_the_rest_unparsed() {
        let text = serde_json::to_vec(&body()).unwrap();
        assert_eq!(parse_body(&text).unwrap(), body());
        // Unknown keys, however large, are skipped; the last of a repeated key wins.
        let mut padded = br#"{"junk":["#.to_vec();
        padded.extend(std::iter::repeat_n(&b"0,"[..], 100_000).flatten());
        padded.extend_from_slice(br#"0],"app":"first","app":"second","n\u0061me":{"x":[1]}}"#);
        assert_eq!(parse_body(&padded).unwrap(), json!({"app": "second"}));
        assert_eq!(parse_body(b"[1,2]"), Err(bad(NOT_AN_OBJECT)));
        assert_eq!(parse_body(b"5"), Err(bad(NOT_AN_OBJECT)));
        assert_eq!(parse_body(br#"{"app": "#), Err(bad(MALFORMED)));
        assert_eq!(parse_body(br#"{"app": 1} x"#), Err(bad(MALFORMED)));
        // A known field too large to be valid is refused before it is parsed.
        let mut huge = br#"{"build_args":{"a":["#.to_vec();
        huge.extend(std::iter::repeat_n(&b"0,"[..], MAX_FIELD_JSON / 2).flatten());
        huge.extend_from_slice(br#"0]}}"#);
        assert_eq!(
            parse_body(&huge),
            Err(bad("Bad Request - build_args is too large."))
        );
        // `sources` may be as large as the body allows.
        let big = format!(
            r#"{{"sources":"data:base64,{}"}}"#,
            "A".repeat(2 * MAX_FIELD_JSON)
        );
        assert_eq!(
            parse_body(big.as_bytes()).unwrap()["sources"]
                .as_str()
                .unwrap()
                .len(),
            2 * MAX_FIELD_JSON + 12
        );
    }

    fn body() -> Value {
        json!({
            "sha": "abc", "app": "myapp", "space": "default", "branch": "master",
            "callback": "http://127.0.0.1:1/cb", "callback_auth": "tok",
            "build_uuid": "6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11",
            "app_uuid": "0b1c2d3e-aaaa-bbbb-cccc-111122223333", "build_number": 12,
            "sources": "data:base64,AAAA", "gm_registry_host": "127.0.0.1:5000",
            "gm_registry_repo": "akkeris", "gm_registry_auth": {"username": "u", "password": "p"},
            "build_args": {"A": "1", "N": 2}
        })
    }

    fn err(mut f: impl FnMut(&mut Map<String, Value>)) -> String {
        let mut b = body();
        f(b.as_object_mut().unwrap());
        build_spec(b, &BTreeMap::new()).unwrap_err().0
    }

    #[test]
    fn a_controller_api_body_is_accepted() {
        let extra = BTreeMap::from([
            ("A".to_string(), "extra".to_string()),
            ("E".to_string(), "e".to_string()),
        ]);
        let s = build_spec(body(), &extra).unwrap();
        assert_eq!(s.build_number, 12);
        assert_eq!(s.build_args["A"], "1", "the request wins on a clash");
        assert_eq!(s.build_args["E"], "e");
        assert_eq!(s.build_args["N"], "2");
        assert_eq!(s.gm_registry_auth.unwrap().password.expose(), "p");
    }

    #[test]
    fn the_request_wins_by_the_name_dockerd_sees() {
        // Both are `NPMTOKEN` once stripped to [A-Za-z0-9_].
        let extra = BTreeMap::from([("NPMTOKEN".to_string(), "extra".to_string())]);
        let mut b = body();
        b["build_args"] = json!({"NPM-TOKEN": "request"});
        let s = build_spec(b, &extra).unwrap();
        assert_eq!(s.docker_build_args()["NPMTOKEN"], "request");
        assert_eq!(s.docker_build_args().len(), 1);
    }

    #[test]
    fn each_required_field_is_required() {
        for f in REQUIRED {
            assert_eq!(
                err(|o| {
                    o.remove(f);
                }),
                MISSING_FIELDS,
                "{f}"
            );
            assert_eq!(
                err(|o| {
                    o.insert(f.into(), Value::Null);
                }),
                MISSING_FIELDS,
                "{f}"
            );
        }
    }

    #[test]
    fn overlong_fields_and_too_many_brokers_are_named() {
        for (field, len) in [
            ("sha", MAX_FIELD),
            ("space", MAX_FIELD),
            ("gm_registry_repo", MAX_FIELD),
            ("docker_password", MAX_LONG_FIELD),
        ] {
            let e = err(|o| {
                o.insert(field.into(), json!("a".repeat(len + 1)));
            });
            assert!(e.contains(field) && e.contains("too long"), "{field}: {e}");
            let mut b = body();
            b[field] = json!("a".repeat(len));
            assert!(
                build_spec(b, &BTreeMap::new()).is_ok(),
                "{field} at its limit"
            );
        }
        let long_url = format!("http://127.0.0.1/{}", "a".repeat(MAX_LONG_FIELD));
        for field in ["callback", "sources"] {
            let e = err(|o| {
                o.insert(field.into(), json!(long_url));
            });
            assert!(e.contains("at most 16 KiB"), "{field}: {e}");
        }
        let brokers = vec!["127.0.0.1:9092"; MAX_KAFKA_BROKERS + 1].join(",");
        assert!(err(|o| {
            o.insert("kafka_hosts".into(), json!(brokers));
        })
        .contains("kafka_hosts"));
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            err(|o| {
                o.insert("build_uuid".into(), json!("nope"));
            }),
            BAD_BUILD_UUID
        );
        assert_eq!(
            err(|o| {
                o.insert(
                    "build_uuid".into(),
                    json!("x6f1b1e3c-8a3e-4b52-9a47-0b6a3e0f3c11"),
                );
            }),
            BAD_BUILD_UUID
        );
        assert!(err(|o| {
            o.insert("app".into(), json!("my-app"));
        })
        .contains("app"));
        assert!(err(|o| {
            o.insert("app".into(), json!("a".repeat(64)));
        })
        .contains("app"));
        assert!(err(|o| {
            o.insert("app_uuid".into(), json!("../../etc"));
        })
        .contains("app uuid"));
        assert!(err(|o| {
            o.insert("build_number".into(), json!(0));
        })
        .contains("build number"));
        assert!(err(|o| {
            o.insert("build_number".into(), json!("1e3"));
        })
        .contains("build number"));
        assert!(err(|o| {
            o.insert("build_number".into(), json!(-1));
        })
        .contains("build number"));
        assert!(err(|o| {
            o.insert("sources".into(), json!("file:///etc/passwd"));
        })
        .contains("sources"));
        assert!(err(|o| {
            o.insert("sources".into(), json!("docker://BAD REF"));
        })
        .contains("docker"));
        assert!(err(|o| {
            o.insert("callback".into(), json!("gopher://x"));
        })
        .contains("callback"));
        // Many small ones are fine (an app with a thousand config vars); too many bytes not.
        let mut b = body();
        let many: Map<String, Value> = (0..1000).map(|i| (format!("K{i}"), json!("v"))).collect();
        b["build_args"] = Value::Object(many);
        assert!(build_spec(b, &BTreeMap::new()).is_ok());
        assert!(err(|o| {
            o.insert("build_args".into(), json!({"K": "x".repeat(48 * 1024)}));
        })
        .contains("at most 48 KiB"));
        // URL-encoding counts: a third of that in characters that encode as %XX is too much.
        assert!(err(|o| {
            o.insert("build_args".into(), json!({"K": "/".repeat(17 * 1024)}));
        })
        .contains("too large"));
    }

    #[test]
    fn build_number_forms() {
        assert_eq!(parse_build_number(&json!("42")), Some(42));
        assert_eq!(parse_build_number(&json!(42)), Some(42));
        assert_eq!(parse_build_number(&json!(1.5)), None);
        assert_eq!(parse_build_number(&json!("")), None);
    }

    #[test]
    fn app_keys() {
        assert_eq!(
            parse_app_key("myapp-0b1c2d3e-aaaa-bbbb-cccc-111122223333"),
            Some((
                "myapp".into(),
                "0b1c2d3e-aaaa-bbbb-cccc-111122223333".into()
            ))
        );
        assert_eq!(parse_app_key("myapp-../../x"), None);
        assert_eq!(parse_app_key("0b1c2d3e-aaaa-bbbb-cccc-111122223333"), None);
    }
}
