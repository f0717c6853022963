//! Storage in an S3 bucket (AWS or any S3-compatible server through `S3_ENDPOINT`), same
//! keys as local storage. Uploads stream from the file (multipart above one part), downloads
//! stream to the reader: memory stays flat whatever the object size.

use super::{check_key, Object, Storage, StorageError};
use crate::config::S3Config;
use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Objects up to this size go in one PUT; larger ones in parts of this size (S3 allows at
/// most 10 000 parts, so up to ~160 GB).
pub const PART_SIZE: u64 = 16 * 1024 * 1024;
/// Parts uploaded at once. Each streams from the file, so this bounds sockets, not memory.
const PARTS_IN_FLIGHT: usize = 4;
/// Attempts per request (the first included); the SDK backs off between them and only
/// retries what is transient (throttling, 5xx, connection errors, timeouts).
const MAX_ATTEMPTS: u32 = 5;

#[derive(Clone)]
pub struct S3Storage {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Where the bucket lives, for messages: the endpoint, or "AWS".
    location: String,
    has_keys: bool,
    has_endpoint: bool,
    /// The credentials may read objects but not list the bucket (no `s3:ListBucket`): S3 then
    /// answers a missing object with 403 `AccessDenied` instead of 404, and a read takes
    /// that for "missing". Found by `check`.
    denied_means_missing: Arc<AtomicBool>,
}

// The client's config holds the credentials: never print it.
impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

fn s3_error<E, R>(op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        _ => status_of(&e).is_some_and(is_transient_status),
    };
    StorageError::S3 {
        op,
        key: key.to_string(),
        message: DisplayErrorContext(&e).to_string(),
        transient,
    }
}

/// Throttling (429, S3's 503 SlowDown) and server errors pass; other answers are refusals.
fn is_transient_status(status: u16) -> bool {
    status == 429 || status >= 500
}

fn status_of<E, R>(e: &SdkError<E, R>) -> Option<u16>
where
    R: HttpStatus,
{
    match e {
        SdkError::ServiceError(ctx) => Some(ctx.raw().status_code()),
        SdkError::ResponseError(ctx) => Some(ctx.raw().status_code()),
        _ => None,
    }
}

/// The HTTP status of a raw response (the SDK's response type, abstracted for `status_of`).
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl S3Storage {
    /// Builds the client. Makes no request: `check` does.
    pub async fn new(cfg: &S3Config) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some((id, secret)) = &cfg.keys {
            loader = loader.credentials_provider(Credentials::new(
                id.expose(),
                secret.expose(),
                None,
                None,
                "S3_ACCESS_KEY",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            // A dead endpoint fails fast and is retried; an attempt may last as long as a
            // part's upload on a slow link, but not forever (a server that accepts and never
            // answers held a POST, the start, or a shutdown's log hand-over).
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(cfg.attempt_timeout)
                    .build(),
            )
            // S3-compatible servers differ in their support for the newer checksum trailers;
            // send checksums only where S3 requires them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            // S3-compatible servers mostly ignore the region, but SigV4 needs one.
            builder = builder.region(Region::from_static("us-east-1"));
        }
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder
                .endpoint_url(endpoint.clone())
                .force_path_style(true);
        }
        let location = match &cfg.endpoint {
            Some(e) => e.clone(),
            None => format!(
                "AWS ({})",
                cfg.region.as_deref().unwrap_or("default region")
            ),
        };
        Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            location,
            has_keys: cfg.keys.is_some(),
            has_endpoint: cfg.endpoint.is_some(),
            denied_means_missing: Arc::default(),
        }
    }

    /// Checks at start that the bucket is there and ours (HeadBucket). The error names the
    /// setting to fix.
    pub async fn check(&self) -> Result<(), StorageError> {
        let unusable = |var: &'static str, problem: String| StorageError::Unusable { var, problem };
        let err = match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if status_of(&err) == Some(403) && self.objects_readable_without_listing().await {
            return Ok(());
        }
        let (bucket, at) = (&self.bucket, &self.location);
        let detail = DisplayErrorContext(&err).to_string();
        Err(match (&err, status_of(&err)) {
            (_, Some(403)) | (_, Some(401)) => unusable(
                if self.has_keys { "S3_ACCESS_KEY" } else { "S3_ACCESS_KEY (unset; default AWS credentials)" },
                format!("access to bucket {bucket:?} at {at} was denied: check S3_ACCESS_KEY and S3_SECRET_KEY"),
            ),
            (_, Some(404)) => unusable("S3_BUCKET", format!("bucket {bucket:?} does not exist at {at}")),
            (_, Some(301)) | (_, Some(400)) if !self.has_endpoint => unusable(
                "S3_REGION",
                format!("bucket {bucket:?} is not in the configured region (set S3_REGION or S3_LOCATION)"),
            ),
            (_, Some(status)) => unusable(
                if self.has_endpoint { "S3_ENDPOINT" } else { "S3_BUCKET" },
                format!("S3 at {at} answered HTTP {status} for bucket {bucket:?}"),
            ),
            (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_), _) if self.has_endpoint => {
                unusable("S3_ENDPOINT", format!("cannot reach {at}: {detail}"))
            }
            _ if !self.has_keys && detail.contains("credentials") => unusable(
                "S3_ACCESS_KEY",
                format!("unset, and the default AWS credential chain found no credentials: {detail}"),
            ),
            _ => unusable("S3_BUCKET", format!("cannot use bucket {bucket:?} at {at}: {detail}")),
        })
    }

    /// HeadBucket was denied. That needs `s3:ListBucket`, which a least-privilege policy may
    /// leave out; HEAD answers carry no error code, so a GET of a key that does not exist
    /// tells wrong keys (`InvalidAccessKeyId`, `SignatureDoesNotMatch`, …) from valid keys
    /// without that permission (`AccessDenied`, or 404 where listing is allowed after all).
    async fn objects_readable_without_listing(&self) -> bool {
        let probe = format!(".buildshuttle-start-check/{}", uuid::Uuid::new_v4());
        let err = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&probe)
            .send()
            .await
        {
            Ok(_) => return true,
            Err(e) => e,
        };
        match (status_of(&err), err.code()) {
            (Some(404), Some("NoSuchKey")) => true,
            (Some(403), Some("AccessDenied")) => {
                self.denied_means_missing.store(true, Ordering::Relaxed);
                tracing::warn!(
                    bucket = %self.bucket,
                    "these S3 credentials cannot list the bucket (s3:ListBucket is not granted), so S3 answers a missing object with 403; buildshuttle reads that as missing. Grant s3:ListBucket on the bucket to tell a missing object from a denied one"
                );
                true
            }
            _ => false,
        }
    }

    /// Whether a read's error means the object is not there: 404, or 403 from a bucket these
    /// credentials cannot list (see `check`).
    fn is_missing<E, R>(&self, e: &SdkError<E, R>) -> bool
    where
        R: HttpStatus,
    {
        match status_of(e) {
            Some(404) => true,
            Some(403) => self.denied_means_missing.load(Ordering::Relaxed),
            _ => false,
        }
    }

    async fn put_multipart(&self, key: &str, path: &Path, len: u64) -> Result<(), StorageError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error("multipart upload", key, e))?;
        let upload_id = created.upload_id().ok_or_else(|| StorageError::S3 {
            op: "multipart upload",
            key: key.to_string(),
            message: "the server returned no upload id".into(),
            transient: false,
        })?;
        // A caller that gives up (a stopped or timed-out build drops its store task) leaves
        // the upload open, its parts billed for ever: the guard aborts it then.
        let mut open = OpenUpload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: Some(upload_id.to_string()),
        };
        let parts = len.div_ceil(PART_SIZE);
        let uploaded: Result<Vec<CompletedPart>, StorageError> = futures::stream::iter(0..parts)
            .map(|i| self.upload_part(key, path, upload_id, i, len))
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await;
        let completed = match uploaded {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_error("multipart upload", key, e)),
            Err(e) => Err(e),
        };
        let upload_id = open.upload_id.take();
        if let (Err(_), Some(upload_id)) = (&completed, upload_id) {
            // Parts of an unfinished upload are billed until aborted.
            abort_upload(&self.client, &self.bucket, key, &upload_id).await;
        }
        completed
    }
}

/// A multipart upload not yet completed or aborted: dropped as such, it is aborted in the
/// background.
struct OpenUpload {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl Drop for OpenUpload {
    fn drop(&mut self) {
        let (Some(upload_id), Ok(rt)) =
            (self.upload_id.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
        rt.spawn(async move { abort_upload(&client, &bucket, &key, &upload_id).await });
    }
}

async fn abort_upload(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) {
    if let Err(abort) = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await
    {
        tracing::warn!(key, error = %DisplayErrorContext(&abort), "could not abort a multipart upload");
    }
}

impl S3Storage {
    async fn upload_part(
        &self,
        key: &str,
        path: &Path,
        upload_id: &str,
        index: u64,
        len: u64,
    ) -> Result<CompletedPart, StorageError> {
        let offset = index * PART_SIZE;
        let size = PART_SIZE.min(len - offset);
        // The body re-reads the file range on each attempt, so retries need no buffering.
        let body = file_body(key, path, offset, size).await?;
        // Part numbers start at 1.
        let number = i32::try_from(index + 1).map_err(|_| StorageError::S3 {
            op: "upload",
            key: key.to_string(),
            message: "too many parts".into(),
            transient: false,
        })?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(body)
            .send()
            .await
            .map_err(|e| s3_error("upload", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .build())
    }
}

/// `len` bytes of the file at `path` from `offset`, read from disk as the request is sent
/// (and again on a retry), never buffered whole.
async fn file_body(
    key: &str,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<ByteStream, StorageError> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .build()
        .await
        .map_err(|e| StorageError::S3 {
            op: "upload",
            key: key.to_string(),
            message: format!("cannot read {}: {e}", path.display()),
            transient: false,
        })
}

/// `body` with its errors naming the object and what went wrong. The SDK cuts a download
/// whose body sends nothing for 5 s (its stalled-stream protection, on by default), but its
/// error reads only "streaming error"; the cause is further down the chain.
fn named_errors(
    body: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    key: &str,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    let key = key.to_string();
    body.map_err(move |e| {
        let mut why = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        std::io::Error::new(
            e.kind(),
            format!("S3 stopped sending the object {key} part-way ({why}); check the S3 endpoint and anything in front of it"),
        )
    })
    .boxed()
}

#[async_trait]
impl Storage for S3Storage {
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        check_key(key)?;
        let io = |source| StorageError::Io {
            key: key.to_string(),
            source,
        };
        let len = tokio::fs::metadata(path).await.map_err(io)?.len();
        if len > PART_SIZE {
            return self.put_multipart(key, path, len).await;
        }
        let body = file_body(key, path, 0, len).await?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| s3_error("upload", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StorageError> {
        self.get_from(key, 0).await
    }

    async fn get_from(&self, key: &str, offset: u64) -> Result<Option<Object>, StorageError> {
        check_key(key)?;
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        // No range from 0: an empty object has no byte 0, and S3 refuses such a range.
        if offset > 0 {
            request = request.range(format!("bytes={offset}-"));
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) if self.is_missing(&e) => return Ok(None),
            // 416: the object exists and ends at or before `offset`.
            Err(e) if status_of(&e) == Some(416) => {
                return Ok(Some(Object {
                    len: Some(0),
                    body: futures::stream::empty().boxed(),
                }))
            }
            Err(e) => return Err(s3_error("download", key, e)),
        };
        let len = out.content_length().and_then(|l| u64::try_from(l).ok());
        // A server that ignores ranges answers with the whole object: skip the bytes here.
        let ignored_range = offset > 0 && out.content_range().is_none();
        let reader = out.body.into_async_read();
        let body = tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024);
        let obj = Object {
            len,
            body: named_errors(body, key),
        };
        Ok(Some(if ignored_range {
            super::skip(obj, offset)
        } else {
            obj
        }))
    }

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if self.is_missing(&e) => Ok(false),
            Err(e) => Err(s3_error("lookup", key, e)),
        }
    }

    fn describe(&self) -> String {
        format!("S3 bucket {} at {}", self.bucket, self.location)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that fails part-way: the error names the object and keeps its cause.
    #[tokio::test]
    async fn a_body_that_fails_part_way_names_the_object_and_the_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("minimum throughput was not met")]
        struct Stalled;
        let cut = std::io::Error::other(Stalled);
        let body = futures::stream::iter([Ok(Bytes::from_static(b"first")), Err(cut)]);
        let mut body = named_errors(body, "app-uuid-1.logs");
        assert_eq!(body.next().await.unwrap().unwrap(), "first");
        let e = body.next().await.unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            "S3 stopped sending the object app-uuid-1.logs part-way (minimum throughput was not met); check the S3 endpoint and anything in front of it"
        );
    }
}
