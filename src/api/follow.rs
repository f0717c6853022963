//! `GET …/logs?follow=true`: the log as it grows, chunked, ending when the build ends.
//! The reader polls what the build already wrote, so a slow or vanished reader never slows
//! the build: nothing is buffered for it.

use super::ApiError;
use crate::executor::Executor;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(250);

struct Cursor {
    exec: Arc<dyn Executor>,
    app: String,
    app_uuid: String,
    n: u64,
    sent: u64,
}

pub async fn follow(
    exec: Arc<dyn Executor>,
    app: String,
    app_uuid: String,
    n: u64,
) -> Result<Response, ApiError> {
    if exec.follow_supported() {
        let stream = exec
            .follow(&app, &app_uuid, n)
            .await?
            .ok_or(ApiError::NotFound)?;
        return Ok(text_response(Body::from_stream(stream)));
    }
    let known = exec.log(&app, &app_uuid, n, 0).await?.is_some()
        || exec.is_active(&app, &app_uuid, n).await;
    if !known {
        return Err(ApiError::NotFound);
    }
    let cursor = Cursor {
        exec,
        app,
        app_uuid,
        n,
        sent: 0,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            // Read activity first: a build that ended has written its last line by then.
            let active = c.exec.is_active(&c.app, &c.app_uuid, c.n).await;
            let chunk = read_from(&c, c.sent).await;
            if let Some(bytes) = chunk.filter(|b| !b.is_empty()) {
                c.sent += bytes.len() as u64;
                return Some((Ok::<_, std::io::Error>(bytes), c));
            }
            if !active {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    Ok(text_response(Body::from_stream(stream)))
}

fn text_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// What the log holds past `offset` (at most 1 MiB per call).
async fn read_from(c: &Cursor, offset: u64) -> Option<Bytes> {
    let obj = c.exec.log(&c.app, &c.app_uuid, c.n, offset).await.ok()??;
    let mut body = obj.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.ok()?);
        if out.len() >= 1 << 20 {
            break;
        }
    }
    Some(Bytes::from(out))
}
