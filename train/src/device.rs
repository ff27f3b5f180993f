//! Choosing the device and the floating-point precision a run trains in.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// The device a run trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// The first NVIDIA GPU, through candle's CUDA backend; needs the `cuda` feature.
    Cuda,
}

/// The dtype of the forward and backward pass. Parameters and optimizer state stay
/// float32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Opens the device and returns it with the compute dtype. Half precision is rejected
/// on the CPU, where candle has no fast half-precision kernels for training.
pub fn select_device(kind: DeviceKind, precision: Precision) -> Result<(Device, DType)> {
    match kind {
        DeviceKind::Cpu => {
            if precision != Precision::F32 {
                return Err(TrainError::UnsupportedPrecision {
                    precision: precision.name().into(),
                    device: "the CPU".into(),
                    reason: "candle's CPU backend has no fast half-precision kernels for \
                             training; set precision = \"f32\", or device = \"cuda\" in a \
                             build with the cuda feature"
                        .into(),
                });
            }
            Ok((Device::Cpu, DType::F32))
        }
        DeviceKind::Cuda => {
            let device = Device::new_cuda(0).map_err(|error| {
                TrainError::InvalidConfig(format!(
                    "device = \"cuda\" is unavailable ({error}); build fleet-train with the \
                     cuda feature on a machine with an NVIDIA driver, or set device = \"cpu\""
                ))
            })?;
            // TODO: half precision on CUDA casts the float32 parameters for each pass
            // and has no loss scaling. This path has not been run on a GPU yet.
            Ok((device, precision.dtype()))
        }
    }
}
