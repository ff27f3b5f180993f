//! Mosquitto's password and ACL files, written from the stored credentials, so an
//! external Mosquitto enforces the same logins and topic rules as the embedded broker.
//!
//! Password entries use the `$7$` format of Mosquitto 2.0's `mosquitto_passwd`:
//! PBKDF2-HMAC-SHA512 with 101 iterations over a 12-byte salt, both base64 with padding.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::Sha512;

use super::AccessError;
use super::acl::DEVICE_PUBLISHES;
use crate::store::access::{Credential, CredentialRole};
use fleet_wire::topic::{self, TopicKind};

/// PBKDF2 iterations, Mosquitto 2.0's default.
const ITERATIONS: u32 = 101;
const SALT_BYTES: usize = 12;
const HASH_BYTES: usize = 64;

/// Hashes `secret` for a Mosquitto password file with a new random salt.
pub fn password_hash(secret: &str) -> Result<String, AccessError> {
    let mut salt = [0u8; SALT_BYTES];
    getrandom::getrandom(&mut salt)?;
    Ok(password_hash_with_salt(secret, &salt))
}

fn password_hash_with_salt(secret: &str, salt: &[u8]) -> String {
    let mut hash = [0u8; HASH_BYTES];
    pbkdf2::pbkdf2_hmac::<Sha512>(secret.as_bytes(), salt, ITERATIONS, &mut hash);
    format!(
        "$7${ITERATIONS}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    )
}

/// Returns the text of a Mosquitto password file with one line per credential.
pub fn password_file(credentials: &[Credential]) -> String {
    credentials
        .iter()
        .map(|credential| format!("{}:{}\n", credential.name, credential.mosquitto_hash))
        .collect()
}

/// Returns the text of a Mosquitto ACL file with the rules of [`super::acl`].
///
/// Ingesters get `user` blocks. Devices share `pattern` rules, in which Mosquitto puts
/// the connecting client's user name for `%u`; device ids never contain `/`, `+` or
/// `#` (see [`topic::validate_device_id`]), so `%u` is always one topic level.
pub fn acl_file(credentials: &[Credential]) -> String {
    let mut text = String::from(
        "# Written by `fleet-server mosquitto-config` from the fleet database; edits are\n\
         # lost when it runs again.\n",
    );
    for ingester in credentials
        .iter()
        .filter(|credential| credential.role == CredentialRole::Ingester)
    {
        text.push_str(&format!("\nuser {}\n", ingester.name));
        for kind in DEVICE_PUBLISHES {
            let filter = topic::all_devices(kind);
            text.push_str(&format!("topic read {filter}\n"));
            text.push_str(&format!("topic read $share/+/{filter}\n"));
        }
        text.push_str(&format!(
            "topic write {}\n",
            topic::all_devices(TopicKind::Command)
        ));
    }
    text.push_str("\n# Every device, by its user name.\n");
    for kind in DEVICE_PUBLISHES {
        text.push_str(&format!(
            "pattern write {}\n",
            topic::device_topic("%u", kind)
        ));
    }
    text.push_str(&format!(
        "pattern read {}\n",
        topic::device_topic("%u", TopicKind::Command)
    ));
    text
}

/// Paths of the files [`write_files`] writes.
#[derive(Debug, Clone)]
pub struct MosquittoFiles {
    pub password_file: PathBuf,
    pub acl_file: PathBuf,
}

/// Writes `passwd` and `acl` into `dir`, each replaced atomically (a temporary file
/// renamed over the old one), so a Mosquitto reloading at any moment reads either the
/// old or the new file whole.
pub fn write_files(dir: &Path, credentials: &[Credential]) -> std::io::Result<MosquittoFiles> {
    std::fs::create_dir_all(dir)?;
    let files = MosquittoFiles {
        password_file: dir.join("passwd"),
        acl_file: dir.join("acl"),
    };
    write_atomically(&files.password_file, &password_file(credentials))?;
    write_atomically(&files.acl_file, &acl_file(credentials))?;
    Ok(files)
}

/// Writes `text` to a temporary file beside `path`, syncs it and renames it over `path`.
///
/// The files hold only hashes, but Mosquitto started as root reads them as the
/// `mosquitto` user, so they are left readable (0644) rather than owner-only.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_matches_mosquitto_passwd() {
        // Made by `mosquitto_passwd -c -b FILE alice secret` (Mosquitto 2.0.11).
        let expected = "$7$101$IPsbTj9ej/ip/FiS$yizGqwWey89mM/qlWx0teiVTXtb8yysQy6D5iwn9lF5opbLNxXv0/e2jv0735s++v71EwTpi+lLsZ7g9i+cfgA==";
        let salt = STANDARD.decode("IPsbTj9ej/ip/FiS").unwrap();
        assert_eq!(password_hash_with_salt("secret", &salt), expected);
    }

    #[test]
    fn password_hashes_are_salted() {
        let a = password_hash("secret").unwrap();
        let b = password_hash("secret").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("$7$101$"), "{a}");
    }

    fn credential(name: &str, role: CredentialRole) -> Credential {
        Credential {
            name: name.into(),
            role,
            secret_sha256: "00".into(),
            mosquitto_hash: format!("$7$101$salt-of-{name}$hash"),
            created_ms: 0,
        }
    }

    #[test]
    fn files_list_every_credential_and_rule() {
        let credentials = [
            credential("cam-1", CredentialRole::Device),
            credential("replica-a", CredentialRole::Ingester),
        ];
        let passwords = password_file(&credentials);
        assert_eq!(
            passwords,
            "cam-1:$7$101$salt-of-cam-1$hash\nreplica-a:$7$101$salt-of-replica-a$hash\n"
        );
        let acl = acl_file(&credentials);
        for line in [
            "user replica-a\n",
            "topic read fleet/v1/+/telemetry\n",
            "topic read $share/+/fleet/v1/+/telemetry\n",
            "topic write fleet/v1/+/cmd\n",
            "pattern write fleet/v1/%u/telemetry\n",
            "pattern write fleet/v1/%u/status\n",
            "pattern write fleet/v1/%u/events\n",
            "pattern read fleet/v1/%u/cmd\n",
        ] {
            assert!(acl.contains(line), "{line:?} missing from:\n{acl}");
        }
        assert!(!acl.contains("user cam-1"), "{acl}");
    }
}
