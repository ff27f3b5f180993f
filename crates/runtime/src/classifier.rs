//! A bundle's model with its pre- and postprocessing: samples in, ranked classes out.

use std::path::PathBuf;

use fleet_bundle::{Bundle, Postprocessing, Preprocessing, TensorSpec};

use crate::{Backend, RuntimeError, Sample, Tensor, TractBackend, preprocess};

/// Number of classes kept per prediction.
const TOP_K: usize = 5;

/// One class with its confidence.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassScore {
    pub class: usize,
    /// Softmax probability, or the model's own output for [`Postprocessing::Identity`].
    pub confidence: f32,
}

/// The highest-scoring classes of one sample, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub top: Vec<ClassScore>,
}

impl Prediction {
    /// Returns the best class.
    pub fn top1(&self) -> &ClassScore {
        &self.top[0]
    }
}

/// Everything [`Classifier::new`] needs, usually taken from a bundle manifest.
#[derive(Debug, Clone)]
pub struct ClassifierConfig {
    /// ONNX file.
    pub model: PathBuf,
    /// Declared model inputs; the first is the one fed.
    pub inputs: Vec<TensorSpec>,
    pub preprocessing: Preprocessing,
    pub postprocessing: Postprocessing,
    /// Class names in index order, possibly empty.
    pub labels: Vec<String>,
}

/// Runs a bundle's model on samples, batch by batch.
pub struct Classifier {
    backend: Box<dyn Backend>,
    preprocessing: Preprocessing,
    postprocessing: Postprocessing,
    labels: Vec<String>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("backend", &self.backend.name())
            .field("input_shape", &self.backend.input_shape())
            .finish()
    }
}

impl Classifier {
    /// Loads the bundle's model with tract for batches of `batch_size` samples, or of
    /// the model's own batch size when its input declares a fixed one.
    pub fn load(bundle: &Bundle, batch_size: usize) -> Result<Classifier, RuntimeError> {
        let manifest = &bundle.manifest;
        if manifest.model.format != "onnx" {
            return Err(RuntimeError::Unsupported(format!(
                "model format {:?}, expected \"onnx\"",
                manifest.model.format
            )));
        }
        let config = ClassifierConfig {
            model: bundle.path_of(&manifest.model.path),
            inputs: manifest.inputs.clone(),
            preprocessing: manifest.preprocessing.clone(),
            postprocessing: manifest.postprocessing,
            labels: bundle.labels()?,
        };
        Classifier::new(config, batch_size)
    }

    /// Loads an ONNX model described by `config`; see [`Classifier::load`].
    pub fn new(config: ClassifierConfig, batch_size: usize) -> Result<Classifier, RuntimeError> {
        Classifier::with_backend(config, batch_size, |path, shape| {
            Ok(Box::new(TractBackend::load_onnx(path, shape)?))
        })
    }

    /// Loads the model described by `config` with `load`, which receives the model path
    /// and the input shape (batch first) the backend must be prepared for. The batch is
    /// `batch_size`, or the model's own when its input declares a fixed one.
    pub fn with_backend(
        config: ClassifierConfig,
        batch_size: usize,
        load: impl FnOnce(&std::path::Path, &[usize]) -> Result<Box<dyn Backend>, RuntimeError>,
    ) -> Result<Classifier, RuntimeError> {
        let batch_size = match config.inputs.first().and_then(|input| input.shape.first()) {
            Some(&fixed) if fixed > 0 => fixed as usize,
            _ => batch_size.max(1),
        };
        let (channels, height, width) = config.preprocessing.sample_shape();
        let input_shape = [batch_size, channels, height, width];
        check_declared_input(&config.inputs, &input_shape)?;
        let backend = load(&config.model, &input_shape)?;
        Ok(Classifier {
            backend,
            preprocessing: config.preprocessing,
            postprocessing: config.postprocessing,
            labels: config.labels,
        })
    }

    /// Name of the backend running the model.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Number of samples the backend runs at once.
    pub fn batch_size(&self) -> usize {
        self.backend.batch_size()
    }

    /// Class name of index `class`, or the index itself when the bundle has no labels.
    pub fn label(&self, class: usize) -> String {
        self.labels
            .get(class)
            .cloned()
            .unwrap_or_else(|| class.to_string())
    }

    /// Preprocesses one sample into model input.
    pub fn prepare(&self, sample: &Sample) -> Result<Vec<f32>, RuntimeError> {
        preprocess(sample, &self.preprocessing)
    }

    /// Classifies samples, failing on the first one that cannot be preprocessed.
    pub fn classify(&mut self, samples: &[Sample]) -> Result<Vec<Prediction>, RuntimeError> {
        let inputs = samples
            .iter()
            .map(|sample| self.prepare(sample))
            .collect::<Result<Vec<_>, _>>()?;
        self.classify_prepared(&inputs)
    }

    /// Classifies preprocessed inputs, running full batches and padding the last one
    /// with zeros whose results are dropped.
    pub fn classify_prepared(
        &mut self,
        inputs: &[Vec<f32>],
    ) -> Result<Vec<Prediction>, RuntimeError> {
        let shape = self.backend.input_shape().to_vec();
        let batch = shape[0];
        let sample_len: usize = shape[1..].iter().product();
        let mut predictions = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(batch) {
            let mut data = Vec::with_capacity(batch * sample_len);
            for input in chunk {
                if input.len() != sample_len {
                    return Err(RuntimeError::ShapeMismatch {
                        expected: shape[1..].to_vec(),
                        found: vec![input.len()],
                    });
                }
                data.extend_from_slice(input);
            }
            data.resize(batch * sample_len, 0.0);
            let output = self.backend.run(Tensor::new(shape.clone(), data)?)?;
            for row in 0..chunk.len() {
                predictions.push(self.rank(output.row(row)));
            }
        }
        Ok(predictions)
    }

    fn rank(&self, scores: &[f32]) -> Prediction {
        let confidences = match self.postprocessing {
            Postprocessing::Softmax => softmax(scores),
            Postprocessing::Identity => scores.to_vec(),
        };
        let mut top: Vec<ClassScore> = confidences
            .into_iter()
            .enumerate()
            .map(|(class, confidence)| ClassScore { class, confidence })
            .collect();
        top.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        top.truncate(TOP_K);
        Prediction { top }
    }
}

/// Compares the manifest's declared input with the shape preprocessing produces, so a
/// bundle whose preprocessing does not fit its model fails at load time.
fn check_declared_input(inputs: &[TensorSpec], input_shape: &[usize]) -> Result<(), RuntimeError> {
    let Some(declared) = inputs.first() else {
        return Err(RuntimeError::Unsupported(
            "manifest declares no input".into(),
        ));
    };
    let fits = declared.shape.len() == input_shape.len()
        && declared
            .shape
            .iter()
            .zip(input_shape)
            .skip(1)
            .all(|(&d, &actual)| d < 0 || d as usize == actual);
    let batch_fits = declared
        .shape
        .first()
        .is_some_and(|&d| d < 0 || d as usize == input_shape[0]);
    if fits && batch_fits {
        return Ok(());
    }
    let declared_shape: Vec<String> = declared
        .shape
        .iter()
        .map(|&d| if d < 0 { "N".into() } else { d.to_string() })
        .collect();
    Err(RuntimeError::PreprocessingMismatch(format!(
        "model input {:?} has shape [{}], but the preprocessing produces {:?} (batch, \
         channels, height, width); check its kind, width and height",
        declared.name,
        declared_shape.join(", "),
        input_shape
    )))
}

/// Softmax that subtracts the maximum first, so large logits cannot overflow.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let probabilities = softmax(&[1000.0, 999.0, -1000.0]);
        let sum: f32 = probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(probabilities[0] > probabilities[1]);
        assert!(probabilities.iter().all(|p| p.is_finite()));
    }
}
