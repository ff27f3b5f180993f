//! Broker addresses and TLS for the project's MQTT clients.
//!
//! A broker is named by a URL: `mqtt://HOST:PORT` (or `tcp://`, or a bare `HOST:PORT`)
//! for plain TCP, `mqtts://HOST:PORT` (or `ssl://`) for TLS. Without a port, `mqtt://`
//! means 1883 and `mqtts://` 8883, the IANA-registered MQTT ports.
//!
//! TLS runs on rustls, which rumqttc brings. The broker certificate is checked against
//! a PEM CA file, or against the operating system's trust store when none is given, and
//! a client certificate with its key is presented when the broker requests one (mutual
//! TLS, as AWS IoT Core and Mosquitto's `require_certificate` do).

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

/// Port a `mqtt://` URL without one connects to.
pub const MQTT_PORT: u16 = 1883;
/// Port a `mqtts://` URL without one connects to.
pub const MQTTS_PORT: u16 = 8883;

/// A parsed broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// Whether the connection runs over TLS.
    pub tls: bool,
}

/// A broker URL that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid broker URL {url:?}: {reason}")]
pub struct BrokerUrlError {
    url: String,
    reason: String,
}

impl BrokerUrl {
    /// Parses `mqtt://HOST[:PORT]`, `mqtts://HOST[:PORT]`, their aliases `tcp://` and
    /// `ssl://`, or a bare `HOST:PORT`. IPv6 hosts go in brackets.
    pub fn parse(url: &str) -> Result<BrokerUrl, BrokerUrlError> {
        let error = |reason: &str| BrokerUrlError {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (address, tls, default_port) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false, Some(MQTT_PORT)),
            Some(("mqtts" | "ssl", rest)) => (rest, true, Some(MQTTS_PORT)),
            Some(_) => return Err(error("expected mqtt:// or mqtts://")),
            None => (url, false, None),
        };
        let address = address.trim_end_matches('/');
        let (host, port, bracketed) = match address.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| error("missing ']' after the IPv6 address"))?;
                (host, after.strip_prefix(':'), true)
            }
            None => match address.rsplit_once(':') {
                Some((host, port)) => (host, Some(port), false),
                None => (address, None, false),
            },
        };
        if host.is_empty() {
            return Err(error("the host is empty"));
        }
        if host.contains(['/', '@']) || (!bracketed && host.contains(':')) {
            return Err(error("expected HOST:PORT with no path or user"));
        }
        let port = match (port, default_port) {
            (Some(port), _) => port
                .parse::<u16>()
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| error("the port is not a number from 1 to 65535"))?,
            (None, Some(port)) => port,
            (None, None) => return Err(error("expected HOST:PORT or mqtt://HOST:PORT")),
        };
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// PEM files for a TLS connection, all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates the broker's certificate must chain to; the operating system's
    /// trust store when unset.
    pub ca: Option<PathBuf>,
    /// Client certificate chain, presented when the broker requests one.
    pub client_cert: Option<PathBuf>,
    /// Private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }
}

/// TLS settings that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} contains no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} contains no PEM private key", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error(
        "{} is an encrypted private key, which needs a passphrase; store it decrypted, \
         for example with `openssl pkcs8 -in KEY -out PLAIN_KEY`",
        path.display()
    )]
    EncryptedPrivateKey { path: PathBuf },
    #[error("no CA certificate from {source_name} could be used")]
    NoUsableCa { source_name: String },
    #[error("failed to load the operating system's CA certificates")]
    NativeRoots(#[source] std::io::Error),
    #[error("a client certificate needs its key and a key needs its certificate")]
    IncompleteClientIdentity,
    #[error("TLS files were given for {url}, which is plain TCP: use mqtts://")]
    NotTls { url: BrokerUrl },
    #[error("the client certificate and key do not form a usable identity")]
    ClientIdentity(#[source] rustls::Error),
    #[error(
        "the private key {} does not belong to the client certificate {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the private key {} cannot sign: {reason}", key.display())]
    UnusableKey { key: PathBuf, reason: String },
}

/// Builds the rustls client configuration from `files`.
pub fn client_config(files: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let source_name = match &files.ca {
        Some(path) => {
            let certificates = read_certificates(path)?;
            roots.add_parsable_certificates(certificates);
            path.display().to_string()
        }
        None => {
            let certificates =
                rustls_native_certs::load_native_certs().map_err(TlsError::NativeRoots)?;
            roots.add_parsable_certificates(certificates);
            "the operating system's trust store".to_string()
        }
    };
    if roots.is_empty() {
        return Err(TlsError::NoUsableCa { source_name });
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates(cert_path)?;
            let key = read_private_key(key_path)?;
            // rustls takes any pair, and a broker then fails the handshake with a bare
            // DecryptError, which reads like a broker fault.
            if !key_signs_for(&chain[0], &key).map_err(|reason| TlsError::UnusableKey {
                key: key_path.clone(),
                reason,
            })? {
                return Err(TlsError::KeyMismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                });
            }
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::ClientIdentity)
        }
        _ => Err(TlsError::IncompleteClientIdentity),
    }
}

/// Returns the transport for `url`: TCP, or TLS configured from `files`. TLS files for
/// a plain `mqtt://` URL are an error rather than silently unused.
pub fn transport(url: &BrokerUrl, files: &TlsFiles) -> Result<Transport, TlsError> {
    if !url.tls {
        if files.is_empty() {
            return Ok(Transport::Tcp);
        }
        return Err(TlsError::NotTls { url: url.clone() });
    }
    let config = client_config(files)?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )))
}

/// Builds client options for `url` with the transport from `files`.
pub fn options(
    client_id: String,
    url: &BrokerUrl,
    files: &TlsFiles,
) -> Result<MqttOptions, TlsError> {
    let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
    options.set_transport(transport(url, files)?);
    Ok(options)
}

/// Returns whether a signature made with `key` verifies against the public key of
/// `certificate`, using the signature schemes of rustls' ring provider.
fn key_signs_for(
    certificate: &rustls::pki_types::CertificateDer<'_>,
    key: &rustls::pki_types::PrivateKeyDer<'_>,
) -> Result<bool, String> {
    const MESSAGE: &[u8] = b"fleet-mqtt: does this key belong to the certificate?";
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(key).map_err(|error| error.to_string())?;
    let provider = rustls::crypto::ring::default_provider();
    let mapping = provider.signature_verification_algorithms.mapping;
    let schemes: Vec<_> = mapping.iter().map(|(scheme, _)| *scheme).collect();
    let signer = signing_key
        .choose_scheme(&schemes)
        .ok_or("no signature scheme that rustls verifies fits the key")?;
    let signature = signer.sign(MESSAGE).map_err(|error| error.to_string())?;
    let end_entity = webpki::EndEntityCert::try_from(certificate)
        .map_err(|error| format!("the certificate does not parse: {error:?}"))?;
    let algorithms = mapping
        .iter()
        .find(|(scheme, _)| *scheme == signer.scheme())
        .map_or(&[][..], |(_, algorithms)| algorithms);
    Ok(algorithms.iter().any(|algorithm| {
        end_entity
            .verify_signature(*algorithm, MESSAGE, &signature)
            .is_ok()
    }))
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_certificates(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    let certificates = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    let read_error = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let pem = std::fs::read(path).map_err(read_error)?;
    if let Some(key) = rustls_pemfile::private_key(&mut pem.as_slice()).map_err(read_error)? {
        return Ok(key);
    }
    // rustls_pemfile skips sections it cannot use, encrypted keys among them.
    let encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
    if pem
        .windows(encrypted.len())
        .any(|window| window == encrypted)
    {
        return Err(TlsError::EncryptedPrivateKey {
            path: path.to_path_buf(),
        });
    }
    Err(TlsError::NoPrivateKey {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> BrokerUrl {
        BrokerUrl::parse(url).unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    fn plain(host: &str, port: u16) -> BrokerUrl {
        BrokerUrl {
            host: host.into(),
            port,
            tls: false,
        }
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(parse("mqtt://127.0.0.1:1883"), plain("127.0.0.1", 1883));
        assert_eq!(parse("tcp://broker:1884/"), plain("broker", 1884));
        assert_eq!(parse("localhost:9"), plain("localhost", 9));
        assert_eq!(parse("mqtt://[::1]:1883/"), plain("::1", 1883));
        assert_eq!(parse("mqtt://broker"), plain("broker", MQTT_PORT));
        let secure = parse("mqtts://broker.example");
        assert!(secure.tls);
        assert_eq!(secure.port, MQTTS_PORT);
        assert_eq!(parse("ssl://[::1]").host, "::1");
        assert_eq!(parse("ssl://[::1]").port, MQTTS_PORT);
    }

    #[test]
    fn broker_urls_display_parse_back() {
        for url in [
            "mqtt://broker:1",
            "mqtts://10.0.0.2:8884",
            "mqtts://[::1]:8883",
        ] {
            assert_eq!(parse(url).to_string(), url);
        }
    }

    #[test]
    fn bad_broker_urls_rejected() {
        for (url, reason) in [
            ("nohost", "HOST:PORT"),
            ("http://host:80", "mqtt://"),
            ("mqtt://:1883", "host is empty"),
            ("mqtt://host:99999", "port"),
            ("mqtt://host:0", "port"),
            ("mqtt://host:x", "port"),
            ("mqtt://user@host:1", "no path or user"),
            ("mqtt://host/topic:1", "no path or user"),
            ("mqtts://[::1", "']'"),
        ] {
            let error = BrokerUrl::parse(url).expect_err(url).to_string();
            assert!(error.contains(reason), "{url}: {error}");
            assert!(error.contains(url), "{url}: {error}");
        }
    }

    fn files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> TlsFiles {
        TlsFiles {
            ca: ca.map(Path::to_path_buf),
            client_cert: cert.map(Path::to_path_buf),
            client_key: key.map(Path::to_path_buf),
        }
    }

    #[test]
    fn missing_ca_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("absent.pem");
        let error = client_config(&files(Some(&ca), None, None)).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error}");
        assert!(error.to_string().contains("absent.pem"), "{error}");
    }

    #[test]
    fn ca_file_without_certificate_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let error = client_config(&files(Some(&ca), None, None)).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        assert!(error.to_string().contains("ca.pem"), "{error}");
    }

    #[test]
    fn client_certificate_needs_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.pem");
        let error = client_config(&files(None, Some(&cert), None));
        // Without a trust store on the machine the roots fail first; either way no
        // configuration comes back.
        assert!(
            matches!(
                error,
                Err(TlsError::IncompleteClientIdentity
                    | TlsError::NoUsableCa { .. }
                    | TlsError::NativeRoots(_))
            ),
            "{error:?}"
        );
    }

    #[test]
    fn tls_files_on_plain_url_rejected() {
        let url = parse("mqtt://broker:1883");
        let tls = files(Some(Path::new("ca.pem")), None, None);
        let error = transport(&url, &tls)
            .err()
            .expect("plain URL with a CA file");
        assert!(matches!(error, TlsError::NotTls { .. }), "{error}");
        assert!(error.to_string().contains("mqtts://"), "{error}");
        assert!(matches!(
            transport(&url, &TlsFiles::default()),
            Ok(Transport::Tcp)
        ));
    }

    #[test]
    fn encrypted_client_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        std::fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = read_private_key(&key).unwrap_err();
        assert!(
            matches!(error, TlsError::EncryptedPrivateKey { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("device.key"), "{error}");
    }

    #[test]
    fn client_key_must_match_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let own_key = rcgen::KeyPair::generate().unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["pi-07".to_string()])
            .unwrap()
            .self_signed(&own_key)
            .unwrap();
        let cert = write("device.pem", certificate.pem());
        let own = write("device.key", own_key.serialize_pem());
        let other = write("other.key", other_key.serialize_pem());

        let matching = files(Some(&cert), Some(&cert), Some(&own));
        assert!(client_config(&matching).is_ok());
        let error = client_config(&files(Some(&cert), Some(&cert), Some(&other))).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        assert!(error.to_string().contains("other.key"), "{error}");
        assert!(error.to_string().contains("device.pem"), "{error}");
    }
}
