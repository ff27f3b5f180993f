//! Test harness: a signed digit-cnn bundle in a temporary folder, the reference tensors
//! that ship with the model, and the inference API served on a free port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_bundle::{
    Bundle, BundleFile, MANIFEST_FORMAT, Manifest, ModelFile, Postprocessing, Preprocessing,
    ResizeFilter, TensorSpec, generate_key_pair, write_bundle,
};
use fleet_device::api::{self, ApiState};
use fleet_device::model::SharedModel;

/// Returns the workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("device/ has a parent")
        .to_path_buf()
}

/// A signed bundle of the shipped digit CNN and the public key that verifies it.
#[derive(Debug)]
pub struct DigitBundle {
    pub bundle: Bundle,
    pub public_key: PathBuf,
}

/// Writes the digit-cnn bundle into `dir`, signed with a new key.
pub fn digit_bundle(dir: &Path) -> DigitBundle {
    let model = repo().join("models/digit-cnn/digit-cnn.onnx");
    write_digit_bundle(dir, &model, "digit-cnn.onnx", "onnx")
}

/// Writes a digit-cnn bundle for candle into `dir`: the ONNX model converted to a
/// safetensors model file, signed with a new key.
pub fn candle_digit_bundle(dir: &Path) -> DigitBundle {
    let onnx = repo().join("models/digit-cnn/digit-cnn.onnx");
    let model = fleet_train::import_onnx(&onnx, &fleet_train::Device::Cpu).expect("convert");
    let converted = dir.join("digit-cnn.safetensors");
    fleet_train::save_model(&converted, &model).expect("write the model file");
    write_digit_bundle(dir, &converted, "model.safetensors", "safetensors")
}

/// Writes a digit-cnn bundle of `model` (stored as `model_path`, in `format`) into
/// `dir/bundle`, signed with a new key.
fn write_digit_bundle(dir: &Path, model: &Path, model_path: &str, format: &str) -> DigitBundle {
    let models = repo().join("models/digit-cnn");
    let (secret, public) = generate_key_pair().expect("generate a key pair");
    let public_key = dir.join("fleet.pub");
    public.write(&public_key).expect("write the public key");
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "digit-cnn".into(),
        version: "1.0.0".into(),
        target: "any".into(),
        created_by: "fleet-device tests".into(),
        model: ModelFile {
            path: model_path.into(),
            format: format.into(),
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
    };
    let files = [
        BundleFile {
            source: model.to_path_buf(),
            path: model_path.into(),
        },
        BundleFile {
            source: models.join("labels.txt"),
            path: "labels.txt".into(),
        },
    ];
    let bundle = write_bundle(&dir.join("bundle"), manifest, &files, &secret).expect("bundle");
    DigitBundle { bundle, public_key }
}

/// The 16 reference inputs ([16, 1, 28, 28]) and onnxruntime's logits for them
/// ([16, 10]), from `models/digit-cnn/reference`.
#[derive(Debug)]
pub struct Reference {
    pub inputs: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Reference {
    pub const SAMPLES: usize = 16;
    pub const SAMPLE_LEN: usize = 28 * 28;
    pub const CLASSES: usize = 10;

    /// Reads the reference tensors.
    pub fn load() -> Reference {
        let dir = repo().join("models/digit-cnn/reference");
        Reference {
            inputs: read_f32(&dir.join("inputs.f32")),
            logits: read_f32(&dir.join("outputs.f32")),
        }
    }

    /// Returns the input of sample `index`.
    pub fn input(&self, index: usize) -> &[f32] {
        &self.inputs[index * Self::SAMPLE_LEN..(index + 1) * Self::SAMPLE_LEN]
    }

    /// Returns the logits of sample `index`.
    pub fn logits_of(&self, index: usize) -> &[f32] {
        &self.logits[index * Self::CLASSES..(index + 1) * Self::CLASSES]
    }

    /// Returns the class with the largest logit for sample `index`.
    pub fn class_of(&self, index: usize) -> usize {
        let logits = self.logits_of(index);
        (0..Self::CLASSES)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("ten classes")
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().unwrap()))
        .collect()
}

/// The inference API serving a model on a free port, on a runtime of its own; it stops
/// when dropped.
#[derive(Debug)]
pub struct ApiServer {
    pub address: SocketAddr,
    pub state: ApiState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts the API for `model` on 127.0.0.1 with a port the system picks.
    pub fn start(model: SharedModel) -> ApiServer {
        ApiServer::start_with(ApiState::new(model))
    }

    /// Starts the API with `state` on 127.0.0.1 with a port the system picks.
    pub fn start_with(state: ApiState) -> ApiServer {
        let (runtime, listener, address) = bind_loopback(2);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = state.clone();
        let thread = std::thread::spawn(move || {
            runtime
                .block_on(api::serve(listener, serving, async {
                    let _ = stopped.await;
                }))
                .expect("serve the API");
        });
        ApiServer {
            address,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Returns the URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

/// Builds a runtime with `workers` threads and binds a listener on a free loopback port.
pub fn bind_loopback(
    workers: usize,
) -> (tokio::runtime::Runtime, tokio::net::TcpListener, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("build a runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a free port");
    let address = listener.local_addr().expect("local address");
    (runtime, listener, address)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
