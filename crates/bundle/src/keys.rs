//! ed25519 keys stored as one line of text: a label naming the kind of key, then the
//! 32 key bytes in hex, such as `ed25519-public-key 3b6a27bc...`. The label keeps a
//! public key from being used where the secret one is expected, and the other way round.

use std::fs;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::BundleError;

const SECRET_LABEL: &str = "ed25519-secret-key";
const PUBLIC_LABEL: &str = "ed25519-public-key";

/// The key a build machine signs bundles with.
#[derive(Debug)]
pub struct SecretKey(SigningKey);

/// The key a device checks bundles against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

/// Generates a new key pair from the operating system's random source.
pub fn generate_key_pair() -> Result<(SecretKey, PublicKey), BundleError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|error| BundleError::InvalidRequest(format!("no random source: {error}")))?;
    let signing = SigningKey::from_bytes(&seed);
    let public = PublicKey(signing.verifying_key());
    Ok((SecretKey(signing), public))
}

impl SecretKey {
    /// Reads a secret key written by [`SecretKey::write`].
    pub fn read(path: &Path) -> Result<SecretKey, BundleError> {
        let bytes = read_key_file(path, SECRET_LABEL)?;
        Ok(SecretKey(SigningKey::from_bytes(&bytes)))
    }

    /// Writes the key as hex, readable by the owner only, refusing to overwrite a key.
    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        let io_error = |source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io_error)?;
        writeln!(file, "{SECRET_LABEL} {}", hex::encode(self.0.to_bytes())).map_err(io_error)?;
        file.sync_all().map_err(io_error)
    }

    /// Signs a message, such as the bytes of a manifest.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Returns the matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl PublicKey {
    /// Reads a public key written by [`PublicKey::write`].
    pub fn read(path: &Path) -> Result<PublicKey, BundleError> {
        let bytes = read_key_file(path, PUBLIC_LABEL)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|error| BundleError::InvalidKey {
                path: path.to_path_buf(),
                reason: format!("not an ed25519 public key: {error}"),
            })
    }

    /// Writes the key as one line of hex.
    pub fn write(&self, path: &Path) -> Result<(), BundleError> {
        let line = format!("{PUBLIC_LABEL} {}\n", hex::encode(self.0.to_bytes()));
        fs::write(path, line).map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// First 16 hex digits of the key, enough to tell keys apart in messages.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0.to_bytes()[..8])
    }

    /// Checks a hex signature file's contents against a message, with the strict
    /// ed25519 rules that reject malleable signatures.
    pub(crate) fn verify(
        &self,
        message: &[u8],
        signature_hex: &[u8],
        signature_path: &Path,
    ) -> Result<(), BundleError> {
        let invalid = |reason: String| BundleError::InvalidSignature {
            path: signature_path.to_path_buf(),
            reason,
        };
        let text = std::str::from_utf8(signature_hex)
            .map_err(|_| invalid("not text".into()))?
            .trim();
        let bytes: [u8; 64] = hex::decode(text)
            .map_err(|error| invalid(format!("not hex: {error}")))?
            .try_into()
            .map_err(|bytes: Vec<u8>| invalid(format!("{} bytes, expected 64", bytes.len())))?;
        self.0
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|_| BundleError::SignatureMismatch {
                path: signature_path.to_path_buf(),
                key_fingerprint: self.fingerprint(),
            })
    }
}

/// Reads a key file written by this module and checks that it contains the `label` kind.
fn read_key_file(path: &Path, label: &str) -> Result<[u8; 32], BundleError> {
    let bytes = fs::read(path).map_err(|source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| BundleError::InvalidKey {
        path: path.to_path_buf(),
        reason,
    };
    let text = String::from_utf8(bytes).map_err(|_| invalid("not a text file".into()))?;
    let (found_label, key_hex) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| invalid(format!("expected \"{label} <64 hex digits>\"")))?;
    if found_label != label {
        let found = match found_label {
            SECRET_LABEL => "a secret key".to_string(),
            PUBLIC_LABEL => "a public key".to_string(),
            other => format!("labelled {other:?}"),
        };
        return Err(invalid(format!("the file is {found}, expected {label}")));
    }
    hex::decode(key_hex)
        .map_err(|error| invalid(format!("not hex: {error}")))?
        .try_into()
        .map_err(|bytes: Vec<u8>| invalid(format!("{} bytes, expected 32", bytes.len())))
}
