//! `compress distill`: trains a small student from a recipe, exports it as ONNX and
//! checks the export in tract.
//!
//! A recipe (`distill.toml`) names the teacher, the data, the student's size, the
//! training settings and the output file; see `models/digit-student/distill.toml`.
//! Paths in it are relative to the recipe's folder.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_train::{
    CacheOutcome, Cnn, CnnConfig, ExportReport, ImageSet, ImageShape, Normalization, RunOptions,
    TeacherLogits, TrainConfig, TrainReport,
};
use serde::Deserialize;

/// A parsed `distill.toml`, with every path made relative to the working directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillRecipe {
    /// Model name, written into the ONNX file's description.
    pub name: String,
    /// ONNX file to write.
    pub output: PathBuf,
    /// Folder for checkpoints, the training log and the teacher-logit cache.
    pub work_dir: PathBuf,
    pub teacher: TeacherSection,
    pub data: DataSection,
    pub student: StudentSection,
    #[serde(default)]
    pub training: TrainConfig,
    #[serde(default)]
    pub export: ExportSection,
}

/// `[teacher]`: the ONNX model whose logits the student learns from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// ONNX file taking float32 `[N, C, H, W]` images scaled to `pixel / 255` and
    /// returning logits `[N, classes]`.
    pub model: PathBuf,
    /// Images per teacher run.
    #[serde(default = "default_teacher_batch")]
    pub batch_size: usize,
}

/// `[data]`: training and evaluation images with their labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub classes: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// An IDX image file, or a folder of images named like `photo_3.jpg`.
    pub train_images: PathBuf,
    /// IDX label file; required for IDX images.
    pub train_labels: Option<PathBuf>,
    pub test_images: PathBuf,
    pub test_labels: Option<PathBuf>,
    /// Train on the first N training images only, for quick trials.
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    pub test_limit: Option<usize>,
}

/// `[student]`: the size of the model to train.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    /// Channels of the first convolution block; each further block doubles them.
    pub width: usize,
    /// Number of convolution blocks.
    pub depth: usize,
    /// Widths of hidden fully connected layers before the classifier.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// `(x - mean) / std` inside the model, for teachers whose inputs are normalised.
    pub normalization: Option<Normalization>,
    /// Rejects a student with more trainable parameters than this.
    pub max_parameters: Option<usize>,
}

/// `[export]`: how the ONNX file is checked against candle.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSection {
    /// Largest absolute logit difference allowed between tract and candle.
    pub tolerance: f32,
    /// Number of test images both run on.
    pub check_images: usize,
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection {
            tolerance: fleet_train::DEFAULT_TOLERANCE,
            check_images: 256,
        }
    }
}

fn default_teacher_batch() -> usize {
    256
}

impl DistillRecipe {
    /// Reads a recipe, resolves its paths against the recipe's folder and checks every
    /// setting that can be checked without loading data.
    pub fn read(path: &Path) -> anyhow::Result<DistillRecipe> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("failed to read recipe {}", path.display()))?;
        let mut recipe: DistillRecipe =
            toml::from_str(&text).with_context(|| format!("invalid recipe {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        recipe.resolve_paths(base);
        recipe
            .validate()
            .with_context(|| format!("invalid recipe {}", path.display()))?;
        Ok(recipe)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| *p = base.join(&*p);
        join(&mut self.output);
        join(&mut self.work_dir);
        join(&mut self.teacher.model);
        join(&mut self.data.train_images);
        join(&mut self.data.test_images);
        for labels in [&mut self.data.train_labels, &mut self.data.test_labels]
            .into_iter()
            .flatten()
        {
            join(labels);
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.training.validate()?;
        let student = self.student_config();
        student.validate()?;
        let parameters = student.parameter_count();
        if let Some(max) = self.student.max_parameters
            && parameters > max
        {
            anyhow::bail!(
                "student.max_parameters is {max}, but width {} and depth {} give {parameters} parameters",
                self.student.width,
                self.student.depth
            );
        }
        if self.teacher.batch_size == 0 || self.export.check_images == 0 {
            anyhow::bail!("teacher.batch_size and export.check_images must be at least 1");
        }
        if !(self.export.tolerance.is_finite() && self.export.tolerance > 0.0) {
            anyhow::bail!(
                "export.tolerance is {}, expected a positive number",
                self.export.tolerance
            );
        }
        for (limit, name) in [
            (self.data.train_limit, "train_limit"),
            (self.data.test_limit, "test_limit"),
        ] {
            if limit == Some(0) {
                anyhow::bail!("data.{name} is 0, so there is nothing to train or evaluate on");
            }
        }
        if !self.teacher.model.is_file() {
            anyhow::bail!(
                "teacher model {} does not exist",
                self.teacher.model.display()
            );
        }
        Ok(())
    }

    /// Shape of the images the student takes.
    pub fn image_shape(&self) -> ImageShape {
        ImageShape {
            channels: self.data.channels,
            height: self.data.height,
            width: self.data.width,
        }
    }

    /// The student architecture the recipe describes.
    pub fn student_config(&self) -> CnnConfig {
        CnnConfig::student(
            self.image_shape(),
            self.data.classes,
            self.student.width,
            self.student.depth,
            self.student.hidden.clone(),
            self.student.normalization,
        )
    }

    /// Folder of the per-epoch checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.work_dir.join("checkpoints")
    }

    /// The JSON-lines training log.
    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join("train-log.jsonl")
    }
}

/// Command-line choices of one `distill` run.
#[derive(Debug, Clone, Default)]
pub struct DistillOptions {
    /// Continue from the latest checkpoint in the work folder.
    pub resume: bool,
    /// Replace the recipe's epoch count.
    pub epochs: Option<usize>,
    pub show_progress: bool,
}

/// Results of a `distill` run: the trained model, its training report and the export.
#[derive(Debug)]
pub struct DistillOutcome {
    pub model: Cnn,
    pub report: TrainReport,
    pub export: ExportReport,
    pub teacher_cache: CacheOutcome,
    pub log_path: PathBuf,
}

/// Loads the data, computes or loads the teacher's logits, trains the student, and
/// writes and checks the ONNX file.
pub fn distill(recipe: &DistillRecipe, options: &DistillOptions) -> anyhow::Result<DistillOutcome> {
    let mut config = recipe.training.clone();
    if let Some(epochs) = options.epochs {
        config.epochs = epochs;
        config.validate()?;
    }
    let train_set = load_set(recipe, Split::Train)?;
    let test_set = load_set(recipe, Split::Test)?;

    let teacher = &recipe.teacher.model;
    let (logits, teacher_cache) = TeacherLogits::load_or_compute(
        teacher,
        &train_set,
        &recipe.work_dir.join("teacher-cache"),
        recipe.teacher.batch_size,
    )
    .with_context(|| {
        format!(
            "failed to compute the logits of teacher {}",
            teacher.display()
        )
    })?;

    let run_options = RunOptions {
        checkpoint_dir: recipe.checkpoint_dir(),
        log_path: Some(recipe.log_path()),
        resume: options.resume,
        show_progress: options.show_progress,
    };
    let (model, report) = fleet_train::distill(
        recipe.student_config(),
        &logits,
        &train_set,
        &test_set,
        &config,
        &run_options,
    )
    .with_context(|| format!("failed to train student {}", recipe.name))?;

    let description = format!(
        "{}: student distilled from {} with fleet-train. Input: [N,{},{},{}] pixels / 255; output: [N,{}] logits.",
        recipe.name,
        teacher.file_name().unwrap_or_default().to_string_lossy(),
        recipe.data.channels,
        recipe.data.height,
        recipe.data.width,
        recipe.data.classes
    );
    let export = fleet_train::export_and_verify(
        &model,
        &recipe.output,
        &description,
        &test_set,
        recipe.export.check_images,
        recipe.export.tolerance,
    )
    .with_context(|| format!("failed to export {}", recipe.output.display()))?;
    Ok(DistillOutcome {
        model,
        report,
        export,
        teacher_cache,
        log_path: recipe.log_path(),
    })
}

#[derive(Debug, Clone, Copy)]
enum Split {
    Train,
    Test,
}

impl Split {
    /// The recipe's key prefix for this split, `train` or `test`.
    fn key(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

fn load_set(recipe: &DistillRecipe, split: Split) -> anyhow::Result<ImageSet> {
    let data = &recipe.data;
    let (images, labels, limit) = match split {
        Split::Train => (&data.train_images, &data.train_labels, data.train_limit),
        Split::Test => (&data.test_images, &data.test_labels, data.test_limit),
    };
    let key = split.key();
    let mut set = if images.is_dir() {
        ImageSet::from_folder(images, recipe.image_shape(), data.classes)
    } else {
        let labels = labels.as_ref().with_context(|| {
            format!(
                "data.{key}_images {} is an IDX file, so data.{key}_labels is required",
                images.display()
            )
        })?;
        ImageSet::from_idx(images, labels, recipe.image_shape(), data.classes)
    }
    .with_context(|| format!("failed to load data.{key}_images {}", images.display()))?;
    if let Some(limit) = limit {
        set.truncate(limit);
    }
    Ok(set)
}
