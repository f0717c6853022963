//! The legacy HTTP API (CONTRACT.md), byte-compatible with the Node.js shuttle.
//! `app(state)` builds the router so tests drive it in-process with `oneshot`.

mod follow;
pub mod validate;

use crate::executor::{BuildSelector, Executor, ExecutorError};
use crate::pipeline::sources::Source;
use crate::storage::{Object, Storage};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub executor: Arc<dyn Executor>,
    pub storage: Arc<dyn Storage>,
    pub extra_build_args: Arc<BTreeMap<String, String>>,
    pub deny_networks: Arc<crate::pipeline::sources::DenyList>,
    pub max_request_bytes: usize,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set on SIGTERM: `/octhc` fails so load balancers stop sending requests here.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Request bodies being read and parsed, by size.
    pub body_budget: Arc<BodyBudget>,
}

/// MAX_REQUEST_BYTES shared by the `POST /` bodies being read: the chart sizes the facade's
/// memory for one body of the largest size, and two at once must not exceed it.
pub struct BodyBudget {
    units: tokio::sync::Semaphore,
    total: u32,
}

/// The budget's unit, so that any MAX_REQUEST_BYTES fits a semaphore's count.
const BUDGET_UNIT: usize = 1024;

impl BodyBudget {
    pub fn new(max_request_bytes: usize) -> Self {
        let total =
            u32::try_from(max_request_bytes.div_ceil(BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
        Self {
            units: tokio::sync::Semaphore::new(total as usize),
            total,
        }
    }

    /// Waits until `bytes` fit beside the bodies being read (a body larger than the budget
    /// waits for all of it). Held until dropped.
    async fn acquire(&self, bytes: usize) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
        self.units.acquire_many(units.min(self.total)).await.ok()
    }
}

/// Whether reading a body failed because it passed the limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// An error answered as the legacy `{"status": "…"}` body. Internal detail goes to the
/// service log, never to the client.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound,
    Unavailable,
    /// 503 saying what an operator must do first (the message is meant for the client).
    NotReady(String),
    /// 503 with `Retry-After`: the queue is full.
    Busy,
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "Not Found".to_string()),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable - try again shortly.".to_string(),
            ),
            ApiError::NotReady(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Service Unavailable - {why}"),
            ),
            ApiError::Busy => {
                let body = Json(serde_json::json!({
                    "status": "Service Unavailable - the build queue is full; try again later."
                }));
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(
                        header::RETRY_AFTER,
                        HeaderValue::from_static(QUEUE_FULL_RETRY_AFTER),
                    )],
                    body,
                )
                    .into_response();
            }
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error".to_string(),
            ),
        };
        (code, Json(serde_json::json!({ "status": msg }))).into_response()
    }
}

/// Seconds a client is told to wait when the queue is full: about one small build.
const QUEUE_FULL_RETRY_AFTER: &str = "30";

impl From<ExecutorError> for ApiError {
    fn from(e: ExecutorError) -> Self {
        match e {
            // Expected under load and logged by the executor once per episode, not per request.
            ExecutorError::QueueFull(_) => ApiError::Busy,
            ExecutorError::Unavailable(_) => {
                tracing::error!(error = %e, "executor error");
                ApiError::Unavailable
            }
            // Logged by the executor's own check, not per request.
            ExecutorError::NotReady(why) => ApiError::NotReady(why),
        }
    }
}

fn ok() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

pub fn app(state: AppState) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/", axum::routing::post(create_build))
        .route("/octhc", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/{id}",
            get(get_sources).head(head_sources).delete(delete_one),
        )
        .route("/{app_key}/{number}", delete(stop_build))
        .route("/{app_key}/{number}/logs", get(get_logs))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(st): State<AppState>) -> Response {
    if st.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "overall_status=bad").into_response();
    }
    match st.executor.health() {
        Ok(()) => "overall_status=good".into_response(),
        // The reason on a line of its own: what an operator reading the probe must fix.
        Err(why) => {
            tracing::warn!(%why, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("overall_status=bad\n{why}\n"),
            )
                .into_response()
        }
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn create_build(
    State(st): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The body is left unread, so the connection cannot carry another request: said, so a
    // keep-alive client does not send its next request on a connection being closed.
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONNECTION, "close")],
            Json(serde_json::json!({"status": "Payload Too Large - the request body exceeds MAX_REQUEST_BYTES."})),
        )
            .into_response()
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Refused before a byte of it is read.
    if announced.is_some_and(|n| n > st.max_request_bytes as u64) {
        return Ok(too_large());
    }
    // Bodies being read share one budget of MAX_REQUEST_BYTES (each weighs what it announces,
    // or the whole limit): the memory a body costs until it is parsed is then that of one
    // upload of the largest size, however many arrive at once.
    let weight = announced.map_or(st.max_request_bytes, |n| n as usize);
    let _reading = st.body_budget.acquire(weight).await;
    let body = match axum::body::to_bytes(request.into_body(), st.max_request_bytes).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return Ok(too_large()),
        Err(_) => {
            return Err(ApiError::BadRequest(
                "Bad Request - the body could not be read.".into(),
            ))
        }
    };
    // The body is read once (capped by MAX_REQUEST_BYTES) and parsed from that buffer; its
    // strings move into the spec and the buffer is dropped before the build is submitted,
    // so a large data: URI is never held more than twice, and only while parsing.
    let json = validate::parse_body(&body).map_err(|e| ApiError::BadRequest(e.0))?;
    drop(body);
    let spec =
        validate::build_spec(json, &st.extra_build_args).map_err(|e| ApiError::BadRequest(e.0))?;
    if let Ok(Source::Http(url)) = validate::check_sources(spec.sources.expose()) {
        if st.deny_networks.denies_url(&url) {
            return Err(ApiError::BadRequest(
                "Bad Request - the sources address is in a denied network.".into(),
            ));
        }
    }
    st.executor.submit(spec).await?;
    Ok(ok())
}

fn object_response(obj: Object, content_type: &'static str) -> Response {
    // A read that fails part-way (S3 stopped sending) cuts the response: say why in our log.
    let body = futures::TryStreamExt::inspect_err(obj.body, |e| {
        tracing::warn!(error = %e, "reading a stored object failed; its response was cut short");
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(len) = obj.len {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

fn storage_error(e: crate::storage::StorageError) -> ApiError {
    tracing::error!(error = %e, "storage error");
    ApiError::Internal
}

async fn get_sources(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = validate::parse_uuid(&id)
        .ok_or_else(|| ApiError::BadRequest(validate::BAD_BUILD_UUID.to_string()))?;
    let key = crate::build::source_key(&uuid);
    match st.storage.get(&key).await.map_err(storage_error)? {
        Some(obj) => Ok(object_response(obj, "application/octet-stream")),
        None => Err(ApiError::NotFound),
    }
}

async fn head_sources(State(st): State<AppState>, Path(id): Path<String>) -> StatusCode {
    let Some(uuid) = validate::parse_uuid(&id) else {
        return StatusCode::NOT_FOUND;
    };
    match st.storage.exists(&crate::build::source_key(&uuid)).await {
        Ok(true) => StatusCode::OK,
        Ok(false) => StatusCode::NOT_FOUND,
        Err(e) => {
            tracing::error!(error = %e, "storage error");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// `DELETE /{build_uuid}` (kept for compatibility; sources are retained) or
/// `DELETE /{app}-{app_uuid}` (stops every active build of the app).
async fn delete_one(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if validate::parse_uuid(&id).is_some() {
        return Ok(ok());
    }
    // The old shuttle answered `DELETE /{anything}` `200`, as the stop route still does.
    let Some((app, app_uuid)) = validate::parse_app_key(&id) else {
        tracing::info!(id = %id, "delete of an id that is neither a build uuid nor an app key; nothing to do");
        return Ok(ok());
    };
    let n = st
        .executor
        .stop(BuildSelector {
            app,
            app_uuid,
            build_number: None,
        })
        .await?;
    tracing::info!(app = %id, stopped = n, "stop-all requested");
    Ok(ok())
}

fn parse_build_path(app_key: &str, number: &str) -> Result<(String, String, u64), ApiError> {
    let (app, app_uuid) = validate::parse_app_key(app_key)
        .ok_or_else(|| ApiError::BadRequest("Bad Request - app or app uuid is invalid.".into()))?;
    let n = validate::parse_build_number(&serde_json::Value::String(number.to_string()))
        .ok_or_else(|| {
            ApiError::BadRequest("Bad Request - build number must be a positive integer.".into())
        })?;
    Ok((app, app_uuid, n))
}

async fn stop_build(
    State(st): State<AppState>,
    Path((app_key, number)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    // The old shuttle answered every stop `200`: a key no build can have (controller-api
    // sends build number 0 for a build not started yet) stops nothing.
    let Ok((app, app_uuid, n)) = parse_build_path(&app_key, &number) else {
        tracing::info!(app = %app_key, number = %number, "stop of a build key no build has; nothing to stop");
        return Ok(ok());
    };
    let stopped = st
        .executor
        .stop(BuildSelector {
            app,
            app_uuid,
            build_number: Some(n),
        })
        .await?;
    tracing::info!(app = %app_key, number = n, stopped, "stop requested");
    Ok(ok())
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
}

async fn get_logs(
    State(st): State<AppState>,
    Path((app_key, number)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    // A key no build can have names an unknown build: 404, as for any unknown build.
    let (app, app_uuid, n) = parse_build_path(&app_key, &number).map_err(|_| ApiError::NotFound)?;
    let follow = matches!(q.follow.as_deref(), Some("true" | "1" | "yes"));
    if follow {
        return follow::follow(st.executor.clone(), app, app_uuid, n).await;
    }
    match st.executor.log(&app, &app_uuid, n, 0).await? {
        Some(obj) => Ok(object_response(obj, "text/plain; charset=utf-8")),
        None => Err(ApiError::NotFound),
    }
}
