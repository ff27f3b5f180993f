//! The candle inference backend: runs a model file of this crate (safetensors with the
//! architecture in its metadata) behind the runtime's [`Backend`] trait, so bundles in
//! that format run on devices beside ONNX bundles run by tract.

use std::path::Path;

use candle_core::Device;
use fleet_runtime::{Backend, RuntimeError, Tensor};

use crate::checkpoint::load_model;
use crate::model::Cnn;

/// Name of the backend in logs, reports and the runtime's errors.
const NAME: &str = "candle";

/// A [`Cnn`] loaded for one input shape.
pub struct CandleBackend {
    model: Cnn,
    input_shape: Vec<usize>,
}

impl std::fmt::Debug for CandleBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleBackend")
            .field("architecture", &self.model.config().to_string())
            .field("device", &self.model.device())
            .field("input_shape", &self.input_shape)
            .finish()
    }
}

impl CandleBackend {
    /// Loads the model file at `path` onto `device` for batches of `input_shape` (batch,
    /// channels, height, width), which must match the saved architecture's image shape.
    pub fn load(
        path: &Path,
        input_shape: &[usize],
        device: &Device,
    ) -> Result<CandleBackend, RuntimeError> {
        let model = load_model(path, device).map_err(|error| RuntimeError::Load {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        let image = model.config().input;
        let expected = [image.channels, image.height, image.width];
        if input_shape.len() != 4 || input_shape[1..] != expected || input_shape[0] == 0 {
            return Err(RuntimeError::ShapeMismatch {
                expected: [&[input_shape.first().copied().unwrap_or(1)][..], &expected].concat(),
                found: input_shape.to_vec(),
            });
        }
        tracing::info!(model = %path.display(), shape = ?input_shape, device = ?device, "candle model ready");
        Ok(CandleBackend {
            model,
            input_shape: input_shape.to_vec(),
        })
    }

    /// Returns the device the model runs on.
    pub fn device(&self) -> &Device {
        self.model.device()
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    fn run(&mut self, input: Tensor) -> Result<Tensor, RuntimeError> {
        input.check_shape(&self.input_shape)?;
        let batch = self.input_shape[0];
        let logits =
            self.model
                .predict(&input.data, batch)
                .map_err(|error| RuntimeError::Inference {
                    backend: NAME,
                    reason: error.to_string(),
                })?;
        let classes = logits.len() / batch;
        Tensor::new(vec![batch, classes], logits)
    }
}

/// Bundle model format that tract runs.
pub const ONNX_FORMAT: &str = "onnx";
/// Bundle model format that candle runs: a model file written by [`crate::save_model`].
pub const SAFETENSORS_FORMAT: &str = "safetensors";

/// Environment variable that picks the candle device: `cpu`, or `cuda` (the first GPU,
/// in builds with the `cuda` feature). Unset, builds with `cuda` use a GPU when one is
/// present and the CPU otherwise.
pub const CANDLE_DEVICE_VARIABLE: &str = "FLEET_CANDLE_DEVICE";

/// Loads a bundle's model file with the backend its `format` needs: tract for `onnx`,
/// candle for `safetensors`, prepared for batches of `input_shape`.
pub fn load_backend(
    format: &str,
    path: &Path,
    input_shape: &[usize],
) -> Result<Box<dyn Backend>, RuntimeError> {
    match format {
        ONNX_FORMAT => Ok(Box::new(fleet_runtime::TractBackend::load_onnx(
            path,
            input_shape,
        )?)),
        SAFETENSORS_FORMAT => {
            let device = inference_device().map_err(|reason| RuntimeError::Load {
                path: path.to_path_buf(),
                reason,
            })?;
            Ok(Box::new(CandleBackend::load(path, input_shape, &device)?))
        }
        other => Err(RuntimeError::Unsupported(format!(
            "model format {other:?}: expected \"{ONNX_FORMAT}\" (run by tract) or \
             \"{SAFETENSORS_FORMAT}\" (run by candle)"
        ))),
    }
}

/// Returns the device the candle backend runs on, as [`CANDLE_DEVICE_VARIABLE`] and the
/// build's features decide. The error names the variable and what is wrong with it.
pub fn inference_device() -> std::result::Result<Device, String> {
    let requested = std::env::var(CANDLE_DEVICE_VARIABLE).ok();
    match requested.as_deref() {
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => Device::new_cuda(0).map_err(|error| {
            format!(
                "{CANDLE_DEVICE_VARIABLE}=cuda, but no CUDA device is usable ({error}); \
                 build with the cuda feature on a machine with an NVIDIA driver"
            )
        }),
        None | Some("") => Ok(default_device()),
        Some(other) => Err(format!(
            "invalid {CANDLE_DEVICE_VARIABLE}={other:?}: expected cpu or cuda"
        )),
    }
}

#[cfg(feature = "cuda")]
fn default_device() -> Device {
    match Device::new_cuda(0) {
        Ok(device) => device,
        Err(error) => {
            tracing::warn!(%error, "no usable CUDA device, so candle runs on the CPU");
            Device::Cpu
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn default_device() -> Device {
    Device::Cpu
}
