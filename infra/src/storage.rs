//! S3 storage: any S3-compatible endpoint (Garage, AWS, ...), path-style addressing.
//!
//! Keys come from `syncd_proto::keys`, so writes are deterministic: running a job twice
//! overwrites its objects instead of adding new ones.
//!
//! Every failed request is a [`StorageError`] that says whether the store was unavailable (no
//! answer, a dropped connection, 5xx, throttling) or the request was wrong, which is what
//! [`crate::outage::classify`] reads. Requests time out instead of hanging on a connection that
//! went silent.

use anyhow::{Context, Result};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use secrecy::ExposeSecret;
use serde::Deserialize;
use std::time::Duration;

/// Files larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
const MULTIPART_PART_SIZE: u64 = 32 * 1024 * 1024;
/// How long to wait for a connection to the store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a response may go without a byte arriving.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per DeleteObjects request (the S3 limit).
const DELETE_BATCH: usize = 1000;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Endpoint URL of a non-AWS store, e.g. `http://127.0.0.1:3900` for Garage.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: secrecy::SecretString,
}

fn default_region() -> String {
    "garage".into()
}

/// Error codes with which S3 stores say "not now" rather than "not this".
const UNAVAILABLE_CODES: [&str; 6] = [
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
];

/// A failed S3 request: what it was for, and whether the store was unavailable rather than the
/// request wrong (a missing key, a refused credential).
#[derive(Debug, thiserror::Error)]
#[error("{action}")]
pub struct StorageError {
    action: String,
    unavailable: bool,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl StorageError {
    /// The store did not answer, or answered that it cannot serve now: retrying later helps.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    fn from_sdk<E>(action: String, error: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let unavailable = match &error {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => true,
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                status >= 500
                    || status == 429
                    || error
                        .code()
                        .is_some_and(|code| UNAVAILABLE_CODES.contains(&code))
            }
            _ => false,
        };
        Self {
            action,
            unavailable,
            source: Box::new(error),
        }
    }

    /// The connection broke while a response body was being read.
    fn interrupted(action: String, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            action,
            unavailable: true,
            source: Box::new(error),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl Storage {
    pub fn new(config: &StorageConfig) -> Self {
        let credentials = Credentials::new(
            config.access_key_id.clone(),
            config.secret_access_key.expose_secret().to_string(),
            None,
            None,
            "syncd-config",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            // The SDK's default CRC checksums are not understood by several S3-compatible
            // stores; send and check them only where the API requires them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Without these a request on a connection that went silent (a half-open TCP
            // connection, a store that hangs) waits forever instead of becoming an outage.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
        }
    }

    /// The same store and credentials, another bucket.
    pub fn for_bucket(&self, bucket: &str) -> Self {
        Self {
            client: self.client.clone(),
            bucket: bucket.to_string(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists already.
    pub async fn ensure_bucket(&self) -> Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|error| {
                StorageError::from_sdk(format!("creating bucket {}", self.bucket), error)
            })?;
        Ok(())
    }

    /// Asks the store whether it serves the bucket: Ok once it answers, whatever the answer.
    /// Used to learn that an outage is over before work is tried again.
    pub async fn probe(&self) -> Result<()> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(error) => {
                let error =
                    StorageError::from_sdk(format!("probing bucket {}", self.bucket), error);
                if error.is_unavailable() {
                    Err(error.into())
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Deletes keys (absent ones are no error), in batches of the S3 limit.
    pub async fn delete(&self, keys: &[String]) -> Result<()> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        for batch in keys.chunks(DELETE_BATCH) {
            let objects = batch
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()
                .context("building a delete request")?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .context("building a delete request")?;
            let answer = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|error| {
                    StorageError::from_sdk(
                        format!("deleting {} keys from s3://{}", batch.len(), self.bucket),
                        error,
                    )
                })?;
            if let Some(failed) = answer.errors().first() {
                anyhow::bail!(
                    "s3://{}/{} was not deleted: {} ({} of {} keys failed)",
                    self.bucket,
                    failed.key().unwrap_or("?"),
                    failed.message().unwrap_or("no reason given"),
                    answer.errors().len(),
                    batch.len()
                );
            }
        }
        Ok(())
    }

    #[tracing::instrument(name = "s3 put", skip_all, fields(key = %key))]
    pub async fn put(&self, key: &str, body: impl Into<Bytes>, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .map_err(|error| {
                StorageError::from_sdk(format!("uploading s3://{}/{key}", self.bucket), error)
            })?;
        Ok(())
    }

    /// Uploads a file; above [`MULTIPART_THRESHOLD`] in parts, since a single PUT is limited in
    /// size and a failed part can be retried alone.
    pub async fn put_file(
        &self,
        key: &str,
        path: &std::path::Path,
        content_type: &str,
    ) -> Result<()> {
        let size = tokio::fs::metadata(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if size <= MULTIPART_THRESHOLD {
            let body = tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            return self.put(key, body, content_type).await;
        }
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|error| {
                StorageError::from_sdk(
                    format!("starting a multipart upload of s3://{}/{key}", self.bucket),
                    error,
                )
            })?;
        let upload_id = upload
            .upload_id()
            .context("the store returned no upload id")?;
        let result = self.upload_parts(key, path, size, upload_id).await;
        if result.is_err() {
            // Leaves no orphaned parts behind; the error that matters is the upload's.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &std::path::Path,
        size: u64,
        upload_id: &str,
    ) -> Result<()> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(path).await?;
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1;
        while offset < size {
            let length = (size - offset).min(MULTIPART_PART_SIZE);
            let mut buffer = vec![0u8; length as usize];
            file.seek(std::io::SeekFrom::Start(offset)).await?;
            file.read_exact(&mut buffer).await?;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buffer))
                .send()
                .await
                .map_err(|error| {
                    StorageError::from_sdk(
                        format!("uploading part {number} of s3://{}/{key}", self.bucket),
                        error,
                    )
                })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            offset += length;
            number += 1;
        }
        self.client
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
            .map_err(|error| {
                StorageError::from_sdk(
                    format!("completing the upload of s3://{}/{key}", self.bucket),
                    error,
                )
            })?;
        Ok(())
    }

    /// Starts downloading an object: its body streams from the answer.
    async fn get_object(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput> {
        Ok(self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| {
                StorageError::from_sdk(format!("downloading s3://{}/{key}", self.bucket), error)
            })?)
    }

    #[tracing::instrument(name = "s3 get", skip_all, fields(key = %key))]
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let object = self.get_object(key).await?;
        let body = object.body.collect().await.map_err(|error| {
            StorageError::interrupted(format!("reading s3://{}/{key}", self.bucket), error)
        })?;
        Ok(body.into_bytes())
    }

    /// Downloads an object into a file, chunk by chunk: a dataset shard is gigabytes, more than
    /// a reader should hold in memory.
    pub async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut object = self.get_object(key).await?;
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        while let Some(chunk) = object.body.try_next().await.map_err(|error| {
            StorageError::interrupted(format!("reading s3://{}/{key}", self.bucket), error)
        })? {
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", path.display()))?;
        }
        file.flush()
            .await
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Every key under a prefix, in the store's (lexicographic) order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| {
                StorageError::from_sdk(format!("listing s3://{}/{prefix}", self.bucket), error)
            })?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_string)),
            );
        }
        Ok(keys)
    }
}
