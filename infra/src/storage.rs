//! S3 storage: any S3-compatible endpoint (Garage, AWS, ...), path-style addressing.
//!
//! Keys come from `syncd_proto::keys`, so writes are deterministic: running a job twice
//! overwrites its objects instead of adding new ones.

use anyhow::{Context, Result};
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use secrecy::ExposeSecret;
use serde::Deserialize;

/// Files larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
const MULTIPART_PART_SIZE: u64 = 32 * 1024 * 1024;

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
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
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
            .map_err(aws_sdk_s3::Error::from)
            .with_context(|| format!("creating bucket {}", self.bucket))?;
        Ok(())
    }

    pub async fn put(&self, key: &str, body: impl Into<Bytes>, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .map_err(aws_sdk_s3::Error::from)
            .with_context(|| format!("uploading s3://{}/{key}", self.bucket))?;
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
            .map_err(aws_sdk_s3::Error::from)
            .with_context(|| {
                format!("starting a multipart upload of s3://{}/{key}", self.bucket)
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
                .map_err(aws_sdk_s3::Error::from)
                .with_context(|| {
                    format!("uploading part {number} of s3://{}/{key}", self.bucket)
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
            .map_err(aws_sdk_s3::Error::from)
            .with_context(|| format!("completing the upload of s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(aws_sdk_s3::Error::from)
            .with_context(|| format!("downloading s3://{}/{key}", self.bucket))?;
        let body = object
            .body
            .collect()
            .await
            .with_context(|| format!("reading s3://{}/{key}", self.bucket))?;
        Ok(body.into_bytes())
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
            let page = page
                .map_err(aws_sdk_s3::Error::from)
                .with_context(|| format!("listing s3://{}/{prefix}", self.bucket))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_string)),
            );
        }
        Ok(keys)
    }
}
