//! `GET …/logs?follow=true`: the log as it grows, chunked, ending when the build ends.
//! The reader polls what the build already wrote, so a slow or vanished reader never slows
//! the build: nothing is buffered for it.

use super::ApiError;
use crate::executor::Executor;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use futures::stream::BoxStream;
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
    /// Once the build has ended: what remains of its log, read in one go.
    rest: Option<BoxStream<'static, std::io::Result<Bytes>>>,
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
        rest: None,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(rest) = c.rest.as_mut() {
                // The build has ended: the rest of its log in one read, to its end.
                let chunk = rest.next().await?;
                return Some((chunk, c));
            }
            // Read activity first: a build that ended has written its last line by then.
            let active = c.exec.is_active(&c.app, &c.app_uuid, c.n).await;
            if !active {
                let obj = c.exec.log(&c.app, &c.app_uuid, c.n, c.sent).await.ok()??;
                c.rest = Some(obj.body);
                continue;
            }
            let chunk = read_from(&mut c).await;
            if let Some(bytes) = chunk.filter(|b| !b.is_empty()) {
                c.sent += bytes.len() as u64;
                return Some((Ok::<_, std::io::Error>(bytes), c));
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

/// What the log of a running build holds past what was sent (at most 1 MiB per call).
async fn read_from(c: &mut Cursor) -> Option<Bytes> {
    let obj = c.exec.log(&c.app, &c.app_uuid, c.n, c.sent).await.ok()??;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::BuildSpec;
    use crate::executor::{BuildSelector, ExecutorError};
    use crate::storage::Object;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A build whose log is `log`, running for its first `running_checks` activity checks.
    struct OneBuild {
        log: Vec<u8>,
        running_checks: AtomicUsize,
        log_reads: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Executor for OneBuild {
        async fn submit(&self, _: BuildSpec) -> Result<(), ExecutorError> {
            Ok(())
        }
        async fn stop(&self, _: BuildSelector) -> Result<usize, ExecutorError> {
            Ok(0)
        }
        async fn log(
            &self,
            _: &str,
            _: &str,
            _: u64,
            offset: u64,
        ) -> Result<Option<Object>, ExecutorError> {
            self.log_reads.fetch_add(1, Ordering::SeqCst);
            let rest = self.log[(offset as usize).min(self.log.len())..].to_vec();
            let chunks: Vec<_> = rest
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Ok(Some(Object {
                len: Some(rest.len() as u64),
                body: futures::stream::iter(chunks).boxed(),
            }))
        }
        async fn is_active(&self, _: &str, _: &str, _: u64) -> bool {
            self.running_checks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
    }

    async fn followed(build: Arc<OneBuild>) -> Vec<u8> {
        let resp = follow(build, "app".into(), "uuid".into(), 1)
            .await
            .expect("known build");
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body")
            .to_vec()
    }

    fn log_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    }

    #[tokio::test]
    async fn a_finished_builds_log_is_read_once_however_long_it_is() {
        let build = Arc::new(OneBuild {
            log: log_of(7 << 20 | 12345),
            running_checks: AtomicUsize::new(0),
            log_reads: AtomicUsize::new(0),
        });
        assert!(followed(build.clone()).await == build.log);
        // One read to know the build, one for its log: not one per MiB (each of which, from
        // S3, would download the object again).
        assert_eq!(build.log_reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_build_that_ends_while_followed_shows_each_byte_once() {
        let build = Arc::new(OneBuild {
            log: log_of(3 << 20 | 777),
            running_checks: AtomicUsize::new(3),
            log_reads: AtomicUsize::new(0),
        });
        assert!(followed(build.clone()).await == build.log);
    }
}
