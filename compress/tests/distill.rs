//! `compress distill`: recipe errors, and a run of a few steps from recipe to checked
//! ONNX file.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_compress::distill::{DistillOptions, DistillRecipe, distill};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Returns a recipe for a tiny student on the first MNIST images, with absolute data
/// paths and the work folder and output inside `dir`. `student` is the body of the
/// `[student]` table and `training` is appended to `[training]`.
fn recipe_text(dir: &Path, student: &str, training: &str) -> String {
    let models = repo_root().join("models");
    format!(
        r#"
name = "tiny-student"
output = "{out}"
work_dir = "{work}"

[teacher]
model = "{models}/digit-cnn/digit-cnn.onnx"
batch_size = 64

[data]
classes = 10
channels = 1
height = 28
width = 28
train_images = "{models}/mnist/train-images-idx3-ubyte.gz"
train_labels = "{models}/mnist/train-labels-idx1-ubyte.gz"
test_images = "{models}/mnist/t10k-images-idx3-ubyte.gz"
test_labels = "{models}/mnist/t10k-labels-idx1-ubyte.gz"
train_limit = 128
test_limit = 64

[student]
{student}

[training]
epochs = 1
batch_size = 64
log_every = 1
eval_batch_size = 64
{training}

[export]
check_images = 16
"#,
        out = dir.join("tiny.onnx").display(),
        work = dir.join("work").display(),
        models = models.display(),
    )
}

const TINY_STUDENT: &str = "width = 4\ndepth = 2\nmax_parameters = 10000";

fn write_recipe(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("distill.toml");
    fs::write(&path, text).unwrap();
    path
}

/// The full error chain, as `anyhow` prints it with `{:#}`.
fn read_error(dir: &Path, text: &str) -> String {
    let path = write_recipe(dir, text);
    format!("{:#}", DistillRecipe::read(&path).unwrap_err())
}

#[test]
fn shipped_recipe_parses() {
    let recipe =
        DistillRecipe::read(&repo_root().join("models/digit-student/distill.toml")).unwrap();
    let parameters = recipe.student_config().parameter_count();
    assert!(parameters <= 39_041, "{parameters} parameters");
}

#[test]
fn recipe_errors_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!(
        "{:#}",
        DistillRecipe::read(&dir.path().join("none.toml")).unwrap_err()
    );
    assert!(missing.contains("failed to read recipe"), "{missing}");

    let cases = [
        (
            recipe_text(dir.path(), TINY_STUDENT, "colour = 3"),
            "unknown field `colour`",
        ),
        (
            recipe_text(dir.path(), TINY_STUDENT, "epochs = 0").replace("epochs = 1\n", ""),
            "epochs = 0",
        ),
        (
            recipe_text(
                dir.path(),
                "width = 64\ndepth = 3\nmax_parameters = 39041",
                "",
            ),
            "max_parameters is 39041",
        ),
        (
            recipe_text(dir.path(), "width = 4\ndepth = 6", ""),
            "shrink a 28x28 image to nothing",
        ),
        (
            recipe_text(dir.path(), TINY_STUDENT, "dropout = 1.5"),
            "dropout is 1.5",
        ),
        (
            recipe_text(dir.path(), TINY_STUDENT, "").replace("digit-cnn.onnx", "missing.onnx"),
            "does not exist",
        ),
        (
            recipe_text(
                dir.path(),
                TINY_STUDENT,
                "[training.loss]\ntemperature = -1.0",
            ),
            "loss.temperature is -1",
        ),
        (
            recipe_text(
                dir.path(),
                TINY_STUDENT,
                "[training.schedule]\nkind = \"linear\"",
            ),
            "unknown variant `linear`",
        ),
    ];
    for (text, expected) in cases {
        let error = read_error(dir.path(), &text);
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
    }
}

#[test]
fn data_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let options = DistillOptions::default();

    let wrong_shape = recipe_text(dir.path(), TINY_STUDENT, "")
        .replace("height = 28\nwidth = 28", "height = 32\nwidth = 32");
    let recipe = DistillRecipe::read(&write_recipe(dir.path(), &wrong_shape)).unwrap();
    let error = format!("{:#}", distill(&recipe, &options).unwrap_err());
    assert!(
        error.contains("images are 1x28x28, expected 1x32x32"),
        "{error}"
    );

    let no_labels = recipe_text(dir.path(), TINY_STUDENT, "").replace(
        &format!(
            "train_labels = \"{}/mnist/train-labels-idx1-ubyte.gz\"\n",
            repo_root().join("models").display()
        ),
        "",
    );
    let recipe = DistillRecipe::read(&write_recipe(dir.path(), &no_labels)).unwrap();
    let error = format!("{:#}", distill(&recipe, &options).unwrap_err());
    assert!(error.contains("data.train_labels is required"), "{error}");

    let half = recipe_text(dir.path(), TINY_STUDENT, "precision = \"f16\"");
    let recipe = DistillRecipe::read(&write_recipe(dir.path(), &half)).unwrap();
    let error = format!("{:#}", distill(&recipe, &options).unwrap_err());
    assert!(
        error.contains("f16 training is not supported on the CPU"),
        "{error}"
    );
}

#[test]
fn tiny_distillation_exports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_recipe(dir.path(), &recipe_text(dir.path(), TINY_STUDENT, ""));
    let recipe = DistillRecipe::read(&path).unwrap();

    let first = distill(&recipe, &DistillOptions::default()).unwrap();
    assert_eq!(first.report.epochs.len(), 1);
    assert!(first.export.max_abs_diff < fleet_train::DEFAULT_TOLERANCE);
    assert!(recipe.output.is_file());
    assert!(matches!(
        first.teacher_cache,
        fleet_train::CacheOutcome::Computed(_)
    ));
    let summary = fleet_compress::inspect(&recipe.output).unwrap();
    assert_eq!(summary.parameters as usize, first.model.parameter_count());

    let options = DistillOptions {
        resume: true,
        epochs: Some(2),
        ..DistillOptions::default()
    };
    let second = distill(&recipe, &options).unwrap();
    assert!(second.report.resumed_from.is_some());
    assert_eq!(second.report.epochs.len(), 1);
    assert_eq!(second.report.epochs[0].epoch, 2);
    assert!(matches!(
        second.teacher_cache,
        fleet_train::CacheOutcome::Hit(_)
    ));
    let log = fs::read_to_string(&second.log_path).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"kind\":\"epoch\""))
            .count(),
        2
    );
}
