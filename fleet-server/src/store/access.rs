//! Stored identities: broker credentials, operator logins, API tokens and console
//! sessions. Only hashes of secrets are stored; `crate::access` makes and checks them.
//!
//! The SQL is the same for both databases (SQLite accepts PostgreSQL's `$N`
//! placeholders), so [`access_backend!`] writes one [`AccessBackend`] implementation
//! per pool type from a single body.

use async_trait::async_trait;
use serde::Serialize;

use super::StoreError;

/// Role of a broker credential, which sets what its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialRole {
    /// A device: publishes under its own id and reads its own commands.
    Device,
    /// A fleet server replica: reads every device's messages and sends commands.
    Ingester,
}

impl CredentialRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialRole::Device => "device",
            CredentialRole::Ingester => "ingester",
        }
    }

    fn parse(text: &str) -> Result<CredentialRole, StoreError> {
        match text {
            "device" => Ok(CredentialRole::Device),
            "ingester" => Ok(CredentialRole::Ingester),
            other => Err(StoreError::InvalidRole {
                role: other.to_owned(),
            }),
        }
    }
}

/// A stored broker credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// MQTT user name: the device id or the ingester's name.
    pub name: String,
    pub role: CredentialRole,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// The secret hashed for Mosquitto's password file.
    pub mosquitto_hash: String,
    pub created_ms: i64,
}

/// Identity operations behind [`super::Store`], one implementation per database.
#[async_trait]
pub(super) trait AccessBackend: Send + Sync + std::fmt::Debug {
    /// Inserts `credential`, or replaces the one of the same name when `replace`;
    /// returns false when one exists and `replace` is false.
    async fn put_credential(
        &self,
        credential: &Credential,
        replace: bool,
    ) -> Result<bool, StoreError>;
    async fn credential(&self, name: &str) -> Result<Option<Credential>, StoreError>;
    async fn credential_by_secret(&self, sha256: &str) -> Result<Option<Credential>, StoreError>;
    /// Lists every credential, ordered by name.
    async fn credentials(&self) -> Result<Vec<Credential>, StoreError>;
    async fn delete_credential(&self, name: &str) -> Result<bool, StoreError>;

    /// Inserts or replaces an operator's password hash.
    async fn put_operator(
        &self,
        name: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    async fn operator_password_hash(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Inserts a token; returns false when a token of that name exists.
    async fn put_api_token(
        &self,
        name: &str,
        sha256: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    async fn api_token_name(&self, sha256: &str) -> Result<Option<String>, StoreError>;
    async fn delete_api_token(&self, name: &str) -> Result<bool, StoreError>;

    /// Inserts a session and deletes every session that expired before `now_ms`.
    async fn put_session(
        &self,
        sha256: &str,
        operator: &str,
        expires_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Returns the operator of a session that has not expired by `now_ms`.
    async fn session_operator(
        &self,
        sha256: &str,
        now_ms: i64,
    ) -> Result<Option<String>, StoreError>;
    async fn delete_session(&self, sha256: &str) -> Result<(), StoreError>;
}

type CredentialTuple = (String, String, String, String, i64);

pub(super) fn credential_from(row: CredentialTuple) -> Result<Credential, StoreError> {
    let (name, role, secret_sha256, mosquitto_hash, created_ms) = row;
    Ok(Credential {
        role: CredentialRole::parse(&role)?,
        name,
        secret_sha256,
        mosquitto_hash,
        created_ms,
    })
}

pub(super) const CREDENTIAL_COLUMNS: &str = "name, role, secret_sha256, mosquitto_hash, created_ms";

/// Implements [`AccessBackend`] for a backend struct with a `pool` field of a sqlx pool.
macro_rules! access_backend {
    ($backend:ty) => {
        impl $backend {
            /// Returns the credential whose `column` (a column name from this module,
            /// never user input) equals `value`.
            async fn credential_where(
                &self,
                column: &str,
                value: &str,
            ) -> Result<Option<$crate::store::access::Credential>, $crate::store::StoreError>
            {
                let sql = format!(
                    "SELECT {} FROM credentials WHERE {column} = $1",
                    $crate::store::access::CREDENTIAL_COLUMNS
                );
                let row = sqlx::query_as(&sql)
                    .bind(value)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map($crate::store::access::credential_from).transpose()
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::access::AccessBackend for $backend {
            async fn put_credential(
                &self,
                credential: &$crate::store::access::Credential,
                replace: bool,
            ) -> Result<bool, $crate::store::StoreError> {
                let conflict = if replace {
                    "DO UPDATE SET role = excluded.role, secret_sha256 = excluded.secret_sha256, \
                     mosquitto_hash = excluded.mosquitto_hash, created_ms = excluded.created_ms"
                } else {
                    "DO NOTHING"
                };
                let sql = format!(
                    "INSERT INTO credentials (name, role, secret_sha256, mosquitto_hash, created_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) {conflict}"
                );
                let result = sqlx::query(&sql)
                    .bind(&credential.name)
                    .bind(credential.role.as_str())
                    .bind(&credential.secret_sha256)
                    .bind(&credential.mosquitto_hash)
                    .bind(credential.created_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn credential(
                &self,
                name: &str,
            ) -> Result<Option<$crate::store::access::Credential>, $crate::store::StoreError>
            {
                self.credential_where("name", name).await
            }

            async fn credential_by_secret(
                &self,
                sha256: &str,
            ) -> Result<Option<$crate::store::access::Credential>, $crate::store::StoreError>
            {
                self.credential_where("secret_sha256", sha256).await
            }

            async fn credentials(
                &self,
            ) -> Result<Vec<$crate::store::access::Credential>, $crate::store::StoreError> {
                let sql = format!(
                    "SELECT {} FROM credentials ORDER BY name",
                    $crate::store::access::CREDENTIAL_COLUMNS
                );
                let rows: Vec<(String, String, String, String, i64)> =
                    sqlx::query_as(&sql).fetch_all(&self.pool).await?;
                rows.into_iter()
                    .map($crate::store::access::credential_from)
                    .collect()
            }

            async fn delete_credential(&self, name: &str) -> Result<bool, $crate::store::StoreError> {
                let result = sqlx::query("DELETE FROM credentials WHERE name = $1")
                    .bind(name)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn put_operator(
                &self,
                name: &str,
                password_hash: &str,
                now_ms: i64,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO operators (name, password_hash, created_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash",
                )
                .bind(name)
                .bind(password_hash)
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn operator_password_hash(
                &self,
                name: &str,
            ) -> Result<Option<String>, $crate::store::StoreError> {
                let hash: Option<(String,)> =
                    sqlx::query_as("SELECT password_hash FROM operators WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(hash.map(|(hash,)| hash))
            }

            async fn put_api_token(
                &self,
                name: &str,
                sha256: &str,
                now_ms: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                let result = sqlx::query(
                    "INSERT INTO api_tokens (name, token_sha256, created_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(sha256)
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn api_token_name(
                &self,
                sha256: &str,
            ) -> Result<Option<String>, $crate::store::StoreError> {
                let name: Option<(String,)> =
                    sqlx::query_as("SELECT name FROM api_tokens WHERE token_sha256 = $1")
                        .bind(sha256)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(name.map(|(name,)| name))
            }

            async fn delete_api_token(&self, name: &str) -> Result<bool, $crate::store::StoreError> {
                let result = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
                    .bind(name)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn put_session(
                &self,
                sha256: &str,
                operator: &str,
                expires_ms: i64,
                now_ms: i64,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query("DELETE FROM sessions WHERE expires_ms < $1")
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO sessions (token_sha256, operator, expires_ms) VALUES ($1, $2, $3)",
                )
                .bind(sha256)
                .bind(operator)
                .bind(expires_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn session_operator(
                &self,
                sha256: &str,
                now_ms: i64,
            ) -> Result<Option<String>, $crate::store::StoreError> {
                let operator: Option<(String,)> = sqlx::query_as(
                    "SELECT operator FROM sessions WHERE token_sha256 = $1 AND expires_ms >= $2",
                )
                .bind(sha256)
                .bind(now_ms)
                .fetch_optional(&self.pool)
                .await?;
                Ok(operator.map(|(operator,)| operator))
            }

            async fn delete_session(&self, sha256: &str) -> Result<(), $crate::store::StoreError> {
                sqlx::query("DELETE FROM sessions WHERE token_sha256 = $1")
                    .bind(sha256)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(super) use access_backend;
