//! Stored hard samples: one row per sample content, keyed by its SHA-256, with the
//! prediction the device made and where the file came from.
//!
//! The SQL is the same for both databases, so [`samples_backend!`] writes one
//! [`SampleBackend`] implementation per pool type from a single body, as
//! `updates_backend!` does for updates.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A hard sample the server keeps, as `GET /api/samples` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct SampleRecord {
    /// Lowercase hex SHA-256 of the content, which names the stored file.
    pub sha256: String,
    /// Device that uploaded the content first, from its credential.
    pub device_id: String,
    pub model_name: String,
    pub model_version: String,
    /// Top-1 class index and its name from the bundle's labels.
    pub predicted_class: i64,
    pub predicted_label: String,
    /// Top-1 confidence, 0 to 1.
    pub confidence: f64,
    /// Ground-truth class index, when the device's data set has labels.
    pub true_class: Option<i64>,
    /// Origin of the input on the device, such as `t10k-images-idx3-ubyte.gz#17`.
    pub source: String,
    /// Device clock at capture and server clock at upload, milliseconds since the Unix
    /// epoch.
    pub device_time_ms: i64,
    pub received_ms: i64,
    /// `image/png` or `image/jpeg`.
    pub content_type: String,
    /// Content size in bytes.
    pub size: i64,
}

/// Filters of [`super::Store::samples`]; `None` matches every value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleFilter {
    pub device_id: Option<String>,
    pub model_name: Option<String>,
}

/// Sample operations behind [`super::Store`], one implementation per database.
#[async_trait]
pub(super) trait SampleBackend: Send + Sync + std::fmt::Debug {
    /// Inserts `sample`; returns false, changing nothing, when its SHA-256 is stored.
    async fn put_sample(&self, sample: &SampleRecord) -> Result<bool, StoreError>;
    async fn sample(&self, sha256: &str) -> Result<Option<SampleRecord>, StoreError>;
    /// Lists the latest `limit` samples that match `filter`, newest upload first.
    async fn samples(
        &self,
        filter: &SampleFilter,
        limit: i64,
    ) -> Result<Vec<SampleRecord>, StoreError>;
}

/// Implements [`SampleBackend`] for a backend struct with a `pool` field of a sqlx pool.
macro_rules! samples_backend {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::samples::SampleBackend for $backend {
            async fn put_sample(
                &self,
                sample: &$crate::store::samples::SampleRecord,
            ) -> Result<bool, $crate::store::StoreError> {
                let result = sqlx::query(
                    "INSERT INTO samples (sha256, device_id, model_name, model_version, \
                     predicted_class, predicted_label, confidence, true_class, source, \
                     device_time_ms, received_ms, content_type, size) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                     ON CONFLICT (sha256) DO NOTHING",
                )
                .bind(&sample.sha256)
                .bind(&sample.device_id)
                .bind(&sample.model_name)
                .bind(&sample.model_version)
                .bind(sample.predicted_class)
                .bind(&sample.predicted_label)
                .bind(sample.confidence)
                .bind(sample.true_class)
                .bind(&sample.source)
                .bind(sample.device_time_ms)
                .bind(sample.received_ms)
                .bind(&sample.content_type)
                .bind(sample.size)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn sample(
                &self,
                sha256: &str,
            ) -> Result<Option<$crate::store::samples::SampleRecord>, $crate::store::StoreError>
            {
                let sample = sqlx::query_as("SELECT * FROM samples WHERE sha256 = $1")
                    .bind(sha256)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(sample)
            }

            async fn samples(
                &self,
                filter: &$crate::store::samples::SampleFilter,
                limit: i64,
            ) -> Result<Vec<$crate::store::samples::SampleRecord>, $crate::store::StoreError>
            {
                // A NULL parameter matches every row, so one statement serves each
                // combination of filters.
                let samples = sqlx::query_as(
                    "SELECT * FROM samples \
                     WHERE ($2 IS NULL OR device_id = $2) AND ($3 IS NULL OR model_name = $3) \
                     ORDER BY received_ms DESC, sha256 LIMIT $1",
                )
                .bind(limit)
                .bind(filter.device_id.as_deref())
                .bind(filter.model_name.as_deref())
                .fetch_all(&self.pool)
                .await?;
                Ok(samples)
            }
        }
    };
}

pub(super) use samples_backend;
