//! Test kit: a real `kube::Client` over `tower_test::mock::pair`, and a verifier that plays
//! one scenario (method + path (+ body check) → canned response). Events (events.k8s.io)
//! are answered and collected on the side. A reconciler that makes fewer calls than the
//! scenario expects times out; one that makes an unexpected call fails the verifier.

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::Value;
use std::time::Duration;
use tokio::task::JoinHandle;
use tower_test::mock::Handle;

pub type BodyCheck = Box<dyn Fn(&Value) + Send>;
pub type Reply = Box<dyn Fn(&Value) -> Value + Send>;

pub struct Expect {
    pub method: Method,
    /// Path with query, prefix-matched (the query of a list or log call may vary).
    pub path: String,
    pub check: Option<BodyCheck>,
    pub status: u16,
    /// `None`: echo the request body.
    pub response: Option<Value>,
    /// The response made from the request body (instead of `response`).
    pub reply: Option<Reply>,
    /// No answer: the connection fails after the request reached the server.
    pub lost: bool,
}

impl Expect {
    pub fn new(
        method: Method,
        path: impl Into<String>,
        status: u16,
        response: Option<Value>,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            check: None,
            status,
            response,
            reply: None,
            lost: false,
        }
    }
    pub fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
    pub fn reply(mut self, f: impl Fn(&Value) -> Value + Send + 'static) -> Self {
        self.reply = Some(Box::new(f));
        self
    }
    /// The server handles the request but its answer never arrives.
    pub fn lost(mut self) -> Self {
        self.lost = true;
        self
    }
}

pub fn status_error(code: u16, reason: &str) -> Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

pub fn client() -> (Client, Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "builds"), handle)
}

/// What the verifier saw besides the scenario.
#[derive(Debug, Default)]
pub struct Seen {
    pub events: Vec<Value>,
}

/// Plays `scenario` in order, then answers only events until every client is dropped.
pub fn verify(
    handle: Handle<Request<Body>, Response<Body>>,
    scenario: Vec<Expect>,
) -> JoinHandle<Seen> {
    verify_with(handle, scenario, |v| v)
}

/// As `verify`; echoed bodies (`response: None`) pass through `echo` first (to add what
/// the API server would, such as a uid).
pub fn verify_with(
    mut handle: Handle<Request<Body>, Response<Body>>,
    scenario: Vec<Expect>,
    echo: fn(Value) -> Value,
) -> JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut steps = scenario.into_iter();
        let mut next = steps.next();
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await;
            let Ok(got) = got else {
                panic!(
                    "timed out waiting for {:?}",
                    next.as_ref().map(|e| (&e.method, &e.path))
                );
            };
            let Some((req, send)) = got else {
                assert!(
                    next.is_none(),
                    "the client made fewer calls: still expected {:?}",
                    next.map(|e| (e.method, e.path))
                );
                return seen;
            };
            let method = req.method().clone();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if path.contains("/apis/events.k8s.io/") {
                seen.events.push(body.clone());
                send.send_response(respond(201, &body));
                continue;
            }
            let Some(exp) = next.take() else {
                panic!("unexpected call {method} {path} after the scenario ended");
            };
            assert_eq!(
                (&method, path.starts_with(&exp.path)),
                (&exp.method, true),
                "expected {} {}, got {method} {path}",
                exp.method,
                exp.path
            );
            if let Some(check) = &exp.check {
                check(&body);
            }
            if exp.lost {
                send.send_error("connection reset by peer");
                next = steps.next();
                continue;
            }
            let out = match &exp.reply {
                Some(reply) => reply(&body),
                None => exp.response.clone().unwrap_or_else(|| echo(body)),
            };
            send.send_response(respond(exp.status, &out));
            next = steps.next();
        }
    })
}

fn respond(status: u16, body: &Value) -> Response<Body> {
    let bytes = match body {
        Value::String(s) => s.clone().into_bytes(),
        other => serde_json::to_vec(other).unwrap_or_default(),
    };
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// A callback receiver on 127.0.0.1 recording (Authorization, body) of each POST.
pub struct Receiver {
    pub url: String,
    pub got: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    _task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        use axum::http::HeaderMap;
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        let app = axum::Router::new().route(
            "/cb",
            axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let g = g.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    g.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((auth, body.0));
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/cb"),
            got,
            _task: task,
        }
    }

    pub fn statuses(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, b)| b["status"].as_str().unwrap_or("").to_string())
            .collect()
    }
}
