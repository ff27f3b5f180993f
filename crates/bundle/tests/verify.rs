//! Tampering with any part of a bundle is caught, and the error names the part.

use std::fs;
use std::path::Path;

use fleet_bundle::{
    Bundle, BundleError, BundleFile, MANIFEST_FORMAT, Manifest, ModelFile, Postprocessing,
    Preprocessing, ResizeFilter, SecretKey, TensorSpec, generate_key_pair, write_bundle,
};

fn manifest() -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "toy".into(),
        version: "1.0.0".into(),
        target: "any".into(),
        created_by: "test".into(),
        model: ModelFile {
            path: "model.onnx".into(),
            format: "onnx".into(),
        },
        inputs: vec![TensorSpec {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 1, 28, 28],
        }],
        outputs: vec![TensorSpec {
            name: "logits".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 10],
        }],
        preprocessing: Preprocessing::Grayscale {
            width: 28,
            height: 28,
            resize: ResizeFilter::Bilinear,
            scale: 1.0 / 255.0,
            offset: 0.0,
        },
        postprocessing: Postprocessing::Softmax,
        labels: Some("labels.txt".into()),
        metrics: None,
        self_test: None,
        files: Vec::new(),
    }
}

/// Writes a bundle with a fake model and labels; returns its directory and the key.
fn build(root: &Path) -> (std::path::PathBuf, SecretKey, fleet_bundle::PublicKey) {
    let (secret, public) = generate_key_pair().unwrap();
    let model = root.join("model-src.onnx");
    fs::write(&model, vec![7u8; 4096]).unwrap();
    let labels = root.join("labels-src.txt");
    fs::write(&labels, "zero\none\n").unwrap();
    let files = [
        BundleFile {
            source: model,
            path: "model.onnx".into(),
        },
        BundleFile {
            source: labels,
            path: "labels.txt".into(),
        },
    ];
    let dir = root.join("bundle");
    write_bundle(&dir, manifest(), &files, &secret).unwrap();
    (dir, secret, public)
}

#[test]
fn intact_bundle_verifies() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    let bundle = Bundle::open_verified(&dir, &public).unwrap();
    assert_eq!(bundle.manifest.files.len(), 2);
    assert_eq!(bundle.labels().unwrap(), ["zero", "one"]);
    assert!(!root.path().join("bundle.partial").exists());
}

#[test]
fn flipped_model_byte_fails_hash_check() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    let model = dir.join("model.onnx");
    let mut bytes = fs::read(&model).unwrap();
    bytes[100] ^= 0x01;
    fs::write(&model, bytes).unwrap();

    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(error, BundleError::HashMismatch { ref path, .. } if path.ends_with("model.onnx"))
    );
    assert!(error.to_string().contains("model.onnx"), "{error}");
}

#[test]
fn edited_manifest_fails_signature_check() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    let path = dir.join("manifest.json");
    let text = fs::read_to_string(&path).unwrap().replace("1.0.0", "1.0.1");
    fs::write(&path, text).unwrap();

    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(error, BundleError::SignatureMismatch { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("changed after signing"),
        "{error}"
    );
}

#[test]
fn other_key_fails_signature_check() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, _) = build(root.path());
    let (_, stranger) = generate_key_pair().unwrap();
    let error = Bundle::open_verified(&dir, &stranger).unwrap_err();
    assert!(
        matches!(error, BundleError::SignatureMismatch { .. }),
        "{error}"
    );
}

#[test]
fn missing_model_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    fs::remove_file(dir.join("model.onnx")).unwrap();
    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(error, BundleError::MissingFile { ref path } if path.ends_with("model.onnx")),
        "{error}"
    );
}

#[test]
fn truncated_model_is_named() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    let model = dir.join("model.onnx");
    let bytes = fs::read(&model).unwrap();
    fs::write(&model, &bytes[..1000]).unwrap();
    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(
            error,
            BundleError::SizeMismatch {
                expected: 4096,
                found: 1000,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("truncated"), "{error}");
}

#[test]
fn unsigned_bundle_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    fs::remove_file(dir.join("manifest.sig")).unwrap();
    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(error, BundleError::MissingFile { ref path } if path.ends_with("manifest.sig")),
        "{error}"
    );

    fs::write(dir.join("manifest.sig"), "zz\n").unwrap();
    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(
        matches!(error, BundleError::InvalidSignature { .. }),
        "{error}"
    );
}

#[test]
fn signed_path_escaping_the_bundle_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let (dir, secret, public) = build(root.path());
    let mut evil = manifest();
    evil.files = vec![fleet_bundle::FileEntry {
        path: "../outside".into(),
        size: 0,
        sha256: String::new(),
    }];
    evil.model.path = "../outside".into();
    evil.labels = None;
    let bytes = serde_json::to_vec(&evil).unwrap();
    fs::write(dir.join("manifest.json"), &bytes).unwrap();
    fs::write(dir.join("manifest.sig"), hex::encode(secret.sign(&bytes))).unwrap();

    let error = Bundle::open_verified(&dir, &public).unwrap_err();
    assert!(matches!(error, BundleError::UnsafePath { .. }), "{error}");
}

#[test]
fn keys_round_trip_through_files() {
    let root = tempfile::tempdir().unwrap();
    let (secret, public) = generate_key_pair().unwrap();
    let secret_path = root.path().join("fleet.key");
    let public_path = root.path().join("fleet.pub");
    secret.write(&secret_path).unwrap();
    public.write(&public_path).unwrap();
    assert_eq!(SecretKey::read(&secret_path).unwrap().public_key(), public);
    assert_eq!(fleet_bundle::PublicKey::read(&public_path).unwrap(), public);
    assert!(
        secret.write(&secret_path).is_err(),
        "an existing key was overwritten"
    );
}

#[test]
fn archive_round_trip_is_deterministic() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _, public) = build(root.path());
    let (size, sha256) =
        fleet_bundle::archive::pack_to_file(&dir, &root.path().join("a.tar")).unwrap();
    let digest = fleet_bundle::archive::archive_digest(&dir).unwrap();
    assert_eq!(
        digest,
        (size, sha256.clone()),
        "packing twice gives the same bytes"
    );

    let manifest = fleet_bundle::archive::read_manifest(&root.path().join("a.tar")).unwrap();
    assert_eq!(manifest.name, "toy");
    let unpacked = root.path().join("unpacked");
    fleet_bundle::archive::unpack(&root.path().join("a.tar"), &unpacked).unwrap();
    let bundle = Bundle::open_verified(&unpacked, &public).unwrap();
    assert_eq!(bundle.manifest.files.len(), 2);
    assert!(!root.path().join("unpacked.partial").exists());
}

/// Appends one entry with a raw name, so paths the tar crate would refuse can be built.
fn append_raw(builder: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: tar::EntryType) {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(if kind == tar::EntryType::Regular {
        3
    } else {
        0
    });
    header.set_cksum();
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"abc"
    } else {
        b""
    };
    builder.append(&header, data).unwrap();
}

#[test]
fn unpack_rejects_links_escapes_and_repeats() {
    let root = tempfile::tempdir().unwrap();
    type Entries = &'static [(&'static [u8], tar::EntryType)];
    let cases: [(&str, Entries, &str); 3] = [
        (
            "link",
            &[(b"model.onnx", tar::EntryType::Symlink)],
            "only regular files",
        ),
        (
            "escape",
            &[(b"../outside.txt", tar::EntryType::Regular)],
            "outside.txt",
        ),
        (
            "repeat",
            &[
                (b"labels.txt", tar::EntryType::Regular),
                (b"labels.txt", tar::EntryType::Regular),
            ],
            "twice",
        ),
    ];
    for (case, entries, expected) in cases {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind) in entries {
            append_raw(&mut builder, name, *kind);
        }
        let archive = root.path().join(format!("{case}.tar"));
        fs::write(&archive, builder.into_inner().unwrap()).unwrap();
        let dest = root.path().join(case);
        let error = fleet_bundle::archive::unpack(&archive, &dest).unwrap_err();
        assert!(error.to_string().contains(expected), "{case}: {error}");
        assert!(!dest.exists(), "{case}: nothing appears at the destination");
    }
    assert!(!root.path().join("outside.txt").exists());
}
