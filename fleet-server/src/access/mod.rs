//! Identity and access: per-device broker credentials, ingester credentials for server
//! replicas, operator logins, API tokens and console sessions.
//!
//! Every secret is random (256 bits from the operating system), is shown once when it
//! is issued, and is stored only as a hash. Secrets made here are high-entropy, so a
//! single SHA-256 is enough to look them up and check them; operator passwords are
//! chosen by people and get Argon2id instead. [`acl`] holds the topic rules that the
//! embedded broker enforces and that [`mosquitto`] writes for an external Mosquitto.

pub mod acl;
pub mod admin;
pub mod http;
pub mod mosquitto;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::store::access::{Credential, CredentialRole};
use crate::store::{Store, StoreError};

/// Shortest operator password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Errors from issuing or checking identities.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{name:?} already has a credential; pass --rotate to replace its secret")]
    AlreadyProvisioned { name: String },
    #[error("an API token named {name:?} already exists; revoke it first or pick another name")]
    TokenExists { name: String },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("operator password is {chars} characters long; use at least {MIN_PASSWORD_CHARS}")]
    PasswordTooShort { chars: usize },
    #[error("failed to read random bytes from the operating system")]
    Random(#[from] getrandom::Error),
    #[error("failed to hash the password: {0}")]
    Hash(argon2::password_hash::Error),
}

/// Identity behind a request or a broker connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A person logged in to the console, or a script holding an API token.
    Operator { name: String },
    /// A device, by its id.
    Device { id: String },
    /// A fleet server replica connecting to a broker.
    Ingester { name: String },
}

impl Principal {
    fn from_credential(credential: Credential) -> Principal {
        match credential.role {
            CredentialRole::Device => Principal::Device {
                id: credential.name,
            },
            CredentialRole::Ingester => Principal::Ingester {
                name: credential.name,
            },
        }
    }
}

/// Returns a new random secret: 32 bytes from the operating system, base64url without
/// padding (43 characters, safe in MQTT passwords, HTTP headers and file names).
pub fn new_secret() -> Result<String, AccessError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Returns the lowercase hex SHA-256 of `secret`, the form in which secrets are stored.
pub fn sha256_hex(secret: &str) -> String {
    hex_encode(&Sha256::digest(secret.as_bytes()))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Issues a broker credential for a device or an ingester and returns its secret.
///
/// A device's name is its device id. With `rotate`, an existing credential gets a new
/// secret and the old one stops working; without it, an existing name is an error.
pub async fn provision(
    store: &Store,
    name: &str,
    role: CredentialRole,
    rotate: bool,
) -> Result<String, AccessError> {
    fleet_wire::topic::validate_device_id(name).map_err(|reason| AccessError::InvalidName {
        name: name.to_owned(),
        reason,
    })?;
    let secret = new_secret()?;
    let credential = Credential {
        name: name.to_owned(),
        role,
        secret_sha256: sha256_hex(&secret),
        mosquitto_hash: mosquitto::password_hash(&secret)?,
        created_ms: crate::unix_millis() as i64,
    };
    if !store.put_credential(&credential, rotate).await? {
        return Err(AccessError::AlreadyProvisioned {
            name: name.to_owned(),
        });
    }
    tracing::info!(
        name,
        role = role.as_str(),
        rotate,
        "broker credential issued"
    );
    Ok(secret)
}

/// Checks a broker login: returns the principal when `username` has a credential whose
/// secret is `password`, and `None` otherwise.
pub async fn check_broker_login(
    store: &Store,
    username: &str,
    password: &str,
) -> Result<Option<Principal>, AccessError> {
    let Some(credential) = store.credential(username).await? else {
        return Ok(None);
    };
    if !digests_equal(&credential.secret_sha256, &sha256_hex(password)) {
        return Ok(None);
    }
    Ok(Some(Principal::from_credential(credential)))
}

/// Creates an operator, or sets a new password for an existing one.
pub async fn set_operator_password(
    store: &Store,
    name: &str,
    password: &str,
) -> Result<(), AccessError> {
    fleet_wire::topic::validate_device_id(name).map_err(|reason| AccessError::InvalidName {
        name: name.to_owned(),
        reason: reason.replace("device id", "operator name"),
    })?;
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(AccessError::PasswordTooShort { chars });
    }
    let password = password.to_owned();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .expect("password hashing does not panic")?;
    store.put_operator(name, &hash).await?;
    tracing::info!(operator = name, "operator password set");
    Ok(())
}

/// Returns whether `password` is the operator's password; false for unknown operators.
///
/// Argon2 takes tens of milliseconds by design, so it runs on the blocking pool. An
/// unknown name is checked against a dummy hash to take as long as a known one.
pub async fn check_operator_password(
    store: &Store,
    name: &str,
    password: &str,
) -> Result<bool, AccessError> {
    let stored = store.operator_password_hash(name).await?;
    let known = stored.is_some();
    let hash = match stored {
        Some(hash) => hash,
        None => dummy_hash()?,
    };
    let password = password.to_owned();
    let matches = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    })
    .await
    .expect("password checking does not panic");
    Ok(known && matches)
}

/// Creates an API token for scripts and services and returns it.
pub async fn create_api_token(store: &Store, name: &str) -> Result<String, AccessError> {
    if name.is_empty() || name.len() > 64 {
        return Err(AccessError::InvalidName {
            name: name.to_owned(),
            reason: "token names must be 1 to 64 characters long".into(),
        });
    }
    let token = new_secret()?;
    if !store.put_api_token(name, &sha256_hex(&token)).await? {
        return Err(AccessError::TokenExists {
            name: name.to_owned(),
        });
    }
    tracing::info!(token = name, "API token created");
    Ok(token)
}

/// Returns the principal that owns `token`: an API token or console session names an operator, and
/// a broker credential's secret names a device or ingester.
pub async fn principal_for_token(
    store: &Store,
    token: &str,
) -> Result<Option<Principal>, AccessError> {
    let digest = sha256_hex(token);
    if let Some(name) = store.api_token_name(&digest).await? {
        return Ok(Some(Principal::Operator {
            name: format!("token:{name}"),
        }));
    }
    if let Some(name) = store.session_operator(&digest).await? {
        return Ok(Some(Principal::Operator { name }));
    }
    let credential = store.credential_by_secret(&digest).await?;
    Ok(credential.map(Principal::from_credential))
}

fn hash_password(password: &str) -> Result<String, AccessError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(AccessError::Hash)?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(AccessError::Hash)
}

/// A valid Argon2 hash of a random password, made once, for timing-equal rejections.
fn dummy_hash() -> Result<String, AccessError> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(hash) = DUMMY.get() {
        return Ok(hash.clone());
    }
    let hash = hash_password(&new_secret()?)?;
    Ok(DUMMY.get_or_init(|| hash).clone())
}

/// Compares two hex digests in time independent of where they differ.
fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_url_safe() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{a}"
        );
    }

    #[test]
    fn sha256_hex_matches_known_digest() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn digests_equal_compares_whole_strings() {
        assert!(digests_equal("ab12", "ab12"));
        assert!(!digests_equal("ab12", "ab13"));
        assert!(!digests_equal("ab12", "ab1"));
    }

    #[test]
    fn password_hash_verifies_only_its_password() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let parsed = PasswordHash::new(&hash).unwrap();
        let argon = argon2::Argon2::default();
        assert!(
            argon
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
        assert!(argon.verify_password(b"wrong horse", &parsed).is_err());
    }
}
