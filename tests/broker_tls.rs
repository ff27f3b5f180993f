//! TLS to an external broker: a real Mosquitto that requires client certificates, an
//! agent and a fleet server that both connect to it over `mqtts://`, and agents whose
//! certificate or CA does not fit, which must stay out without crashing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Workspace, path_str, unique_device_id, wait_for};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority that signs server and client certificates for the test.
struct TestCa {
    certificate: Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.self_signed(&key).unwrap();
        TestCa { certificate, key }
    }

    /// Writes the CA certificate to `path`.
    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.certificate.pem()).unwrap();
        path.to_path_buf()
    }

    /// Issues a certificate for `name` and writes it and its key as `{stem}.pem` and
    /// `{stem}.key` in `dir`. A server certificate also names 127.0.0.1 and localhost.
    fn issue(&self, dir: &Path, stem: &str, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names = if server {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .unwrap();
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, certificate.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

#[test]
fn agent_and_server_over_mutual_tls() {
    let workspace = Workspace::new();
    let pki = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet test CA");
    let ca_file = ca.write(&pki.path().join("ca.pem"));
    let (broker_cert, broker_key) = ca.issue(pki.path(), "broker", "127.0.0.1", true);
    let device_id = unique_device_id("tls");
    let (device_cert, device_key) = ca.issue(pki.path(), "device", &device_id, false);
    let (server_cert, server_key) = ca.issue(pki.path(), "server", "fleet-server", false);
    let stranger = TestCa::new("some other CA");
    let stranger_ca = stranger.write(&pki.path().join("other-ca.pem"));

    // Mosquitto takes only clients whose certificate the CA signed, and uses the
    // certificate's common name as the user name.
    let broker_dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        (&ca_file, "ca.pem"),
        (&broker_cert, "broker.pem"),
        (&broker_key, "broker.key"),
    ] {
        std::fs::copy(from, broker_dir.path().join(to)).unwrap();
    }
    let settings = format!(
        "cafile {dir}/ca.pem\ncertfile {dir}/broker.pem\nkeyfile {dir}/broker.key\n\
         require_certificate true\nuse_identity_as_username true\nallow_anonymous true\n",
        dir = broker_dir.path().display()
    );
    let (_mosquitto, port) = common::start_mosquitto(broker_dir.path(), &settings);
    let broker = format!("mqtts://127.0.0.1:{port}");

    let server = workspace.start_server_with(
        Some(&broker),
        0,
        &[
            "--broker-ca",
            path_str(&ca_file),
            "--broker-client-cert",
            path_str(&server_cert),
            "--broker-client-key",
            path_str(&server_key),
        ],
    );
    let tls = |ca: &Path, cert: Option<(&Path, &Path)>| {
        let mut flags = vec![
            "--interval".to_string(),
            "0.2".to_string(),
            "--broker-ca".to_string(),
            path_str(ca).to_string(),
        ];
        if let Some((cert, key)) = cert {
            flags.extend([
                "--client-cert".to_string(),
                path_str(cert).to_string(),
                "--client-key".to_string(),
                path_str(key).to_string(),
            ]);
        }
        flags
    };
    let start = |id: &str, flags: Vec<String>| {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        workspace.start_device(id, &broker, &flags)
    };

    // Without a client certificate, and trusting a CA that did not sign the broker.
    let no_cert_id = unique_device_id("tls-no-cert");
    let mut no_cert = start(&no_cert_id, tls(&ca_file, None));
    let wrong_ca_id = unique_device_id("tls-wrong-ca");
    let mut wrong_ca = start(
        &wrong_ca_id,
        tls(&stranger_ca, Some((&device_cert, &device_key))),
    );
    let _device = start(&device_id, tls(&ca_file, Some((&device_cert, &device_key))));

    let seqs = wait_for(
        Duration::from_secs(60),
        "five telemetry records over TLS",
        || {
            server.device(&device_id)?;
            let seqs = server.stored_seqs(&device_id);
            (seqs.len() >= 5).then_some(seqs)
        },
    );
    let expected: Vec<i64> = (seqs[0]..seqs[0] + seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "records arrive in order without gaps");
    let entry = server.device(&device_id).expect("device listed");
    assert_eq!(entry["state"], "online", "{entry}");

    // The server lists every device it has heard from, by status or telemetry.
    assert_eq!(
        server.device(&no_cert_id),
        None,
        "an agent without a client certificate got through"
    );
    assert_eq!(
        server.device(&wrong_ca_id),
        None,
        "an agent that cannot verify the broker got through"
    );
    assert!(
        no_cert.is_running(),
        "a refused agent keeps retrying, it does not exit"
    );
    assert!(
        wrong_ca.is_running(),
        "an agent with the wrong CA keeps retrying, it does not exit"
    );
}
