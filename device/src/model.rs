//! The loaded model, shared by the agent's inference loop and the local inference API.
//!
//! The backend sits behind a mutex that is held only while the model runs, so the two
//! callers take turns and preprocessing happens outside the lock. Both callers run on
//! threads of their own (the loop's thread, tokio's blocking pool for the API), so
//! waiting for the lock never stalls the async runtime.
//!
//! TODO: `fleet_runtime::Classifier` returns only the five best classes, but the API
//! returns whole output rows. This module therefore drives the backend itself and repeats
//! the classifier's input check; fold it back once the runtime exposes rows.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use fleet_bundle::{Bundle, Postprocessing, Preprocessing, TensorSpec};
use fleet_runtime::{Backend, RuntimeError, Tensor, softmax};

/// Description of the model and its input, readable without the lock.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// The input as the manifest declares it, with -1 for the batch dimension when the
    /// model takes any batch size.
    pub input: TensorSpec,
    /// The first output as the manifest declares it.
    pub output: TensorSpec,
    pub preprocessing: Preprocessing,
    pub postprocessing: Postprocessing,
    /// Class names in index order, possibly empty.
    pub labels: Vec<String>,
}

impl ModelInfo {
    /// Returns the number of floats in one preprocessed sample.
    pub fn sample_len(&self) -> usize {
        let (channels, height, width) = self.preprocessing.sample_shape();
        channels * height * width
    }

    /// Returns the name of class `class`, or its index when the bundle has no labels.
    pub fn label(&self, class: usize) -> String {
        self.labels
            .get(class)
            .cloned()
            .unwrap_or_else(|| class.to_string())
    }

    /// Turns one row of model output into confidences, as the bundle's postprocessing
    /// specifies.
    pub fn confidences(&self, scores: &[f32]) -> Vec<f32> {
        match self.postprocessing {
            Postprocessing::Softmax => softmax(scores),
            Postprocessing::Identity => scores.to_vec(),
        }
    }
}

/// A bundle's model, cheap to clone and safe to use from several threads.
#[derive(Clone)]
pub struct SharedModel {
    info: Arc<ModelInfo>,
    backend: Arc<Mutex<Box<dyn Backend>>>,
}

impl std::fmt::Debug for SharedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedModel")
            .field("name", &self.info.name)
            .field("version", &self.info.version)
            .finish()
    }
}

impl SharedModel {
    /// Loads the bundle's model, with tract for ONNX and candle for safetensors, for one
    /// sample per run or for the model's own batch size when its input declares a fixed
    /// one.
    pub fn load(bundle: &Bundle) -> Result<SharedModel, RuntimeError> {
        let manifest = &bundle.manifest;
        let (Some(input), Some(output)) = (manifest.inputs.first(), manifest.outputs.first())
        else {
            return Err(RuntimeError::Unsupported(
                "manifest declares no input or no output".into(),
            ));
        };
        let (channels, height, width) = manifest.preprocessing.sample_shape();
        let batch = match input.shape.first() {
            Some(&fixed) if fixed > 0 => fixed as usize,
            _ => 1,
        };
        let shape = [batch, channels, height, width];
        check_declared_input(input, &shape)?;
        let backend = fleet_train::load_backend(
            &manifest.model.format,
            &bundle.path_of(&manifest.model.path),
            &shape,
        )?;
        let info = ModelInfo {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            input: input.clone(),
            output: output.clone(),
            preprocessing: manifest.preprocessing.clone(),
            postprocessing: manifest.postprocessing,
            labels: bundle.labels()?,
        };
        Ok(SharedModel {
            info: Arc::new(info),
            backend: Arc::new(Mutex::new(backend)),
        })
    }

    /// Wraps `backend`, described by `info`. [`SharedModel::load`] builds both from a
    /// bundle; this serves backends built another way, such as test doubles.
    pub fn with_backend(info: ModelInfo, backend: Box<dyn Backend>) -> SharedModel {
        SharedModel {
            info: Arc::new(info),
            backend: Arc::new(Mutex::new(backend)),
        }
    }

    /// Returns the name of the backend running the model, `tract` or `candle`.
    pub fn backend_name(&self) -> &'static str {
        self.backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .name()
    }

    /// Returns the model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs the model on `samples` preprocessed samples laid out one after another, and
    /// returns the raw output, one row per sample. Batches are padded with zeros whose
    /// results are dropped. Blocks while another caller runs the model.
    pub fn run(&self, samples: usize, data: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let sample_len = self.info.sample_len();
        if data.len() != samples * sample_len {
            return Err(RuntimeError::ShapeMismatch {
                expected: vec![samples, sample_len],
                found: vec![data.len()],
            });
        }
        let mut backend = self.backend.lock().unwrap_or_else(PoisonError::into_inner);
        let shape = backend.input_shape().to_vec();
        let batch = shape[0];
        let mut rows = Vec::with_capacity(samples);
        for chunk in data.chunks(batch * sample_len) {
            let in_chunk = chunk.len() / sample_len;
            let mut input = chunk.to_vec();
            input.resize(batch * sample_len, 0.0);
            let output = backend.run(Tensor::new(shape.clone(), input)?)?;
            rows.extend((0..in_chunk).map(|row| output.row(row).to_vec()));
        }
        Ok(rows)
    }
}

/// The model the agent runs now. An update replaces it as a whole. Callers take a
/// [`SharedModel`] from it per request, so a request that started on the old model
/// finishes on it.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    current: Arc<RwLock<SharedModel>>,
}

impl ModelSlot {
    pub fn new(model: SharedModel) -> ModelSlot {
        ModelSlot {
            current: Arc::new(RwLock::new(model)),
        }
    }

    /// Returns the model in use.
    pub fn current(&self) -> SharedModel {
        // Replacing is a single assignment, so a poisoned lock still holds a whole model.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `model` in use and returns the one it replaces.
    pub fn replace(&self, model: SharedModel) -> SharedModel {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, model)
    }
}

/// Returns the index and value of the largest element, the first one on ties.
pub fn top1(confidences: &[f32]) -> (usize, f32) {
    confidences
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (class, value)| {
            if value > best.1 { (class, value) } else { best }
        })
}

/// Compares the manifest's declared input with the shape preprocessing produces, so a
/// bundle whose preprocessing does not fit its model fails at load time.
fn check_declared_input(declared: &TensorSpec, shape: &[usize]) -> Result<(), RuntimeError> {
    let fits = declared.shape.len() == shape.len()
        && declared
            .shape
            .iter()
            .zip(shape)
            .all(|(&d, &actual)| d < 0 || d as usize == actual);
    if fits {
        return Ok(());
    }
    Err(RuntimeError::PreprocessingMismatch(format!(
        "model input {:?} has shape {:?}, but the preprocessing produces {:?} (batch, \
         channels, height, width); check its kind, width and height",
        declared.name, declared.shape, shape
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_takes_the_first_maximum() {
        assert_eq!(top1(&[0.1, 0.7, 0.7, 0.2]), (1, 0.7));
        assert_eq!(top1(&[-3.0]), (0, -3.0));
    }
}
