//! Quantization end to end: the shipped digit model keeps its accuracy in int8, numbers
//! stay sane on degenerate weights, and bad input is refused with a clear error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fleet_compress::Recipe;
use fleet_compress::calibrate::{CalibrationMethod, Range};
use fleet_compress::graph::{
    self, GraphError, OnnxModel, f32_tensor, ints_attribute, tensor_to_f32,
};
use fleet_compress::quantize::{self, LayerMode};
use fleet_compress::variants::{Compute, QuantizeOptions, Workbench, write_checked};
use prost::Message;
use tract_onnx::pb::{
    GraphProto, ModelProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
    tensor_proto::DataType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension,
    type_proto,
};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn float_value(name: &str, shape: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds a model taking a 1x2x4x4 input through Conv(3x3, 3 channels) -> Relu -> Flatten -> Gemm(2 classes).
/// Output channel 0 of the convolution is all zero and channel 1 nearly so with a large
/// bias, as pruning leaves them.
fn degenerate_model(opset: i64) -> ModelProto {
    let mut conv_weight = vec![0.0f32; 3 * 2 * 3 * 3];
    for (i, w) in conv_weight.iter_mut().enumerate().skip(18) {
        *w = if i < 36 {
            1e-20
        } else {
            ((i % 7) as f32 - 3.0) * 0.1
        };
    }
    let gemm_weight: Vec<f32> = (0..2 * 48).map(|i| ((i % 5) as f32 - 2.0) * 0.05).collect();
    let mut conv = graph::node(
        "Conv",
        "conv",
        &["input", "conv.weight", "conv.bias"],
        &["conv"],
    );
    conv.attribute.push(ints_attribute("pads", &[1, 1, 1, 1]));
    let mut gemm = graph::node("Gemm", "fc", &["flat", "fc.weight", "fc.bias"], &["logits"]);
    gemm.attribute.push(graph::int_attribute("transB", 1));
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(GraphProto {
            name: "degenerate".into(),
            node: vec![
                conv,
                graph::node("Relu", "relu", &["conv"], &["relu"]),
                graph::node("Flatten", "flatten", &["relu"], &["flat"]),
                gemm,
            ],
            initializer: vec![
                f32_tensor("conv.weight", &[3, 2, 3, 3], &conv_weight),
                f32_tensor("conv.bias", &[3], &[0.0, 5000.0, 0.1]),
                f32_tensor("fc.weight", &[2, 48], &gemm_weight),
                f32_tensor("fc.bias", &[2], &[0.1, -0.1]),
            ],
            input: vec![float_value("input", &[1, 2, 4, 4])],
            output: vec![float_value("logits", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, proto: &ModelProto) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

/// Asserts that every scale initializer of a quantized model is finite, positive and normal.
fn assert_scales_are_normal(model: &OnnxModel) {
    let mut checked = 0;
    for tensor in &model.graph().initializer {
        if tensor.name.ends_with("_scale") {
            for scale in tensor_to_f32(tensor).unwrap().iter() {
                assert!(
                    scale.is_normal() && *scale > 0.0,
                    "{} holds scale {scale}",
                    tensor.name
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no scale initializer found");
}

#[test]
fn quantize_keeps_digit_accuracy_on_mnist() {
    let recipe = Recipe::read(&repo_path("models/digit-cnn/bundle.toml")).unwrap();
    let workbench = Workbench::open(&recipe, false).unwrap();
    let float = workbench.measure("fp32", &workbench.float, 5).unwrap();
    let float_accuracy = float.evaluation.unwrap().accuracy.unwrap();
    for compute in [Compute::Integer, Compute::Float] {
        let options = QuantizeOptions {
            method: CalibrationMethod::MinMax,
            compute,
            keep_float: Vec::new(),
            bias_correction: true,
        };
        let (model, report) = workbench.quantize(&workbench.float, &options).unwrap();
        let expected = if compute == Compute::Integer {
            LayerMode::Int8
        } else {
            LayerMode::WeightOnly
        };
        assert!(
            report.layers.values().all(|mode| *mode == expected),
            "{report:?}"
        );
        assert_scales_are_normal(&model);
        let measured = workbench.measure("int8", &model, 5).unwrap();
        let accuracy = measured.evaluation.unwrap().accuracy.unwrap();
        assert_eq!(measured.evaluation.unwrap().samples, 10_000);
        assert!(
            accuracy >= float_accuracy - 0.0005,
            "{compute:?}: int8 top-1 {accuracy} against fp32 {float_accuracy}"
        );
        assert!(
            measured.bytes as f64 <= 0.26 * float.bytes as f64,
            "{compute:?}: int8 is {} bytes, fp32 {}",
            measured.bytes,
            float.bytes
        );
    }
}

#[test]
fn quantize_degenerate_channels_stay_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "degenerate.onnx", &degenerate_model(13));
    let model = OnnxModel::read(&path).unwrap();
    let layers = quantize::layers(&model).unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(
        layers[0].output, "relu",
        "the Relu is fused into the convolution"
    );
    let modes: HashMap<String, LayerMode> = layers
        .iter()
        .map(|layer| (layer.name.clone(), LayerMode::Int8))
        .collect();
    // Ranges as calibration would measure them on inputs in [-1, 1].
    let ranges: HashMap<String, Range> = [
        (
            "input",
            Range {
                min: -1.0,
                max: 1.0,
            },
        ),
        (
            "relu",
            Range {
                min: 0.0,
                max: 5001.0,
            },
        ),
        (
            "flat",
            Range {
                min: 0.0,
                max: 5001.0,
            },
        ),
    ]
    .into_iter()
    .map(|(name, range)| (name.to_string(), range))
    .collect();
    let (quantized, report) = quantize::quantize(&model, &layers, &modes, &ranges.into()).unwrap();
    assert_scales_are_normal(&quantized);
    assert_eq!(report.degenerate_weight_channels, 2, "{report:?}");

    let shape = [1, 2, 4, 4];
    let float_runner = fleet_compress::assess::Runner::new(&model, &shape).unwrap();
    let int8_runner = fleet_compress::assess::Runner::new(&quantized, &shape).unwrap();
    for seed in 0..8 {
        let input: Vec<f32> = (0..32)
            .map(|i| (((i * 7 + seed * 13) % 17) as f32 / 8.0) - 1.0)
            .collect();
        let expected = float_runner.run(&input).unwrap();
        let actual = int8_runner.run(&input).unwrap();
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (e, a) in expected.iter().zip(&actual) {
            // One output step of the 5001-wide activation range, spread over the Gemm.
            assert!(
                (e - a).abs() <= 0.02 * scale,
                "sample {seed}: int8 {actual:?} against float {expected:?}"
            );
        }
    }
}

/// Builds a depthwise 3x3 convolution over 4 channels of 8x8 whose weights all round
/// the same way. Per channel, one weight of 1.0 sets the i8 step to 1/127, and eight of
/// 0.6 steps round up to 1 step. So every output of int8 compute is high by about 3.2
/// steps times the input's mean.
fn biased_rounding_model() -> ModelProto {
    let channel: Vec<f32> = [1.0].into_iter().chain([0.6 / 127.0; 8]).collect();
    let weight: Vec<f32> = channel.repeat(4);
    let mut conv = graph::node(
        "Conv",
        "depthwise",
        &["input", "weight", "bias"],
        &["output"],
    );
    conv.attribute.push(graph::int_attribute("group", 4));
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: "biased-rounding".into(),
            node: vec![conv],
            initializer: vec![
                f32_tensor("weight", &[4, 1, 3, 3], &weight),
                f32_tensor("bias", &[4], &[0.0, 0.1, -0.1, 0.2]),
            ],
            input: vec![float_value("input", &[1, 4, 8, 8])],
            output: vec![float_value("output", &[1, 4, 6, 6])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn bias_correction_removes_rounding_shift() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "biased.onnx", &biased_rounding_model());
    let model = OnnxModel::read(&path).unwrap();
    let layers = quantize::layers(&model).unwrap();
    let modes: HashMap<String, LayerMode> = [("depthwise".to_string(), LayerMode::Int8)].into();
    let shape = [1, 4, 8, 8];
    // Inputs between 1 and 3, so every channel's mean is far from zero.
    let inputs: Vec<Vec<f32>> = (0..16)
        .map(|seed| {
            (0..256)
                .map(|i| 1.0 + ((i * 37 + seed * 11) % 101) as f32 / 50.0)
                .collect()
        })
        .collect();
    let samples: Vec<tract_onnx::prelude::Tensor> = inputs
        .iter()
        .map(|input| tract_onnx::prelude::Tensor::from_shape(&shape, input).unwrap())
        .collect();
    let calibration = fleet_compress::calibrate::calibrate(
        &model,
        &shape,
        &quantize::calibration_tensors(&layers),
        &samples,
        CalibrationMethod::MinMax,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(calibration.channel_means["input"].len(), 4);

    let mean_error = |calibration: &fleet_compress::calibrate::Calibration| {
        let (quantized, report) = quantize::quantize(&model, &layers, &modes, calibration).unwrap();
        let float_runner = fleet_compress::assess::Runner::new(&model, &shape).unwrap();
        let int8_runner = fleet_compress::assess::Runner::new(&quantized, &shape).unwrap();
        let mut sum = 0.0f64;
        let mut count = 0;
        for input in &inputs {
            let expected = float_runner.run(input).unwrap();
            let actual = int8_runner.run(input).unwrap();
            for (e, a) in expected.iter().zip(&actual) {
                sum += (a - e) as f64;
                count += 1;
            }
        }
        (sum / count as f64, report.bias_corrected_layers)
    };
    let mut without_means = calibration.clone();
    without_means.channel_means.clear();
    let (uncorrected, uncorrected_layers) = mean_error(&without_means);
    let (corrected, corrected_layers) = mean_error(&calibration);
    assert_eq!((uncorrected_layers, corrected_layers), (0, 1));
    // 8 x 0.4 steps of 1/127 on inputs averaging 2 is a shift of about 0.05.
    assert!(uncorrected > 0.03, "uncorrected mean error {uncorrected}");
    assert!(
        corrected.abs() < 0.2 * uncorrected,
        "corrected mean error {corrected} against {uncorrected} uncorrected"
    );
}

#[test]
fn read_rejects_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = degenerate_model(13).encode_to_vec();
    let path = dir.path().join("truncated.onnx");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let error = OnnxModel::read(&path).unwrap_err();
    assert!(matches!(error, GraphError::Decode { .. }), "{error}");
    assert!(error.to_string().contains("truncated.onnx"), "{error}");
}

#[test]
fn read_rejects_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.onnx");
    std::fs::write(&path, b"").unwrap();
    let error = OnnxModel::read(&path).unwrap_err();
    assert!(matches!(error, GraphError::Empty { .. }), "{error}");
    assert!(error.to_string().contains("empty.onnx"), "{error}");
}

#[test]
fn read_rejects_unknown_opset() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "old.onnx", &degenerate_model(9));
    let error = OnnxModel::read(&path).unwrap_err();
    assert!(
        matches!(error, GraphError::UnsupportedOpset { opset: 9, .. }),
        "{error}"
    );
}

#[test]
fn read_rejects_escaping_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::write(dir.path().join("secret.bin"), [0u8; 72]).unwrap();
    let mut proto = degenerate_model(13);
    let weight = &mut proto.graph.as_mut().unwrap().initializer[0];
    weight.raw_data.clear();
    weight.data_location = Some(1);
    weight.external_data = vec![tract_onnx::pb::StringStringEntryProto {
        key: "location".into(),
        value: "../secret.bin".into(),
    }];
    let path = write_model(&models, "escaping.onnx", &proto);
    let error = OnnxModel::read(&path).unwrap_err();
    match &error {
        GraphError::ExternalData { tensor, .. } => assert_eq!(tensor, "conv.weight"),
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn read_rejects_dangling_node_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut proto = degenerate_model(13);
    proto.graph.as_mut().unwrap().node[1].input[0] = "missing".into();
    let path = write_model(dir.path(), "dangling.onnx", &proto);
    let error = OnnxModel::read(&path).unwrap_err().to_string();
    assert!(
        error.contains("relu") && error.contains("missing"),
        "{error}"
    );
}

#[test]
fn write_checked_rejects_unknown_operator() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = Recipe::read(&repo_path("models/digit-cnn/bundle.toml")).unwrap();
    let workbench = Workbench::open(&recipe, false).unwrap();
    let mut model = workbench.float.clone();
    let relu = model
        .nodes_mut()
        .iter_mut()
        .find(|node| node.op_type == "Relu")
        .unwrap();
    relu.op_type = "NotAnOperator".into();
    let out = dir.path().join("out.onnx");
    std::fs::write(&out, b"previous model").unwrap();
    let error = format!("{:#}", write_checked(&workbench, &model, &out).unwrap_err());
    assert!(error.contains("NotAnOperator"), "{error}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous model");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "a temporary file was left"
    );
}

#[test]
fn calibrate_rejects_wrong_input_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "degenerate.onnx", &degenerate_model(13));
    let model = OnnxModel::read(&path).unwrap();
    let sample = tract_onnx::prelude::Tensor::zero::<f32>(&[1, 3, 4, 4]).unwrap();
    let error = fleet_compress::calibrate::calibrate(
        &model,
        &[1, 2, 4, 4],
        &["input".to_string()],
        &[sample],
        CalibrationMethod::MinMax,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("[1, 3, 4, 4]") && error.contains("[1, 2, 4, 4]"),
        "{error}"
    );
}

fn digit_recipe_with_pipeline(dir: &Path, pipeline: &str) -> Recipe {
    let text = std::fs::read_to_string(repo_path("models/digit-cnn/bundle.toml")).unwrap();
    let without = text.split("\n[pipeline]").next().unwrap();
    let models = repo_path("models/digit-cnn");
    let recipe_text = without
        .replace(
            "\"digit-cnn.onnx\"",
            &format!("{:?}", models.join("digit-cnn.onnx")),
        )
        .replace(
            "\"labels.txt\"",
            &format!("{:?}", models.join("labels.txt")),
        )
        .replace(
            "\"../mnist/",
            &format!("\"{}/", repo_path("models/mnist").display()),
        );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, format!("{recipe_text}\n[pipeline]\n{pipeline}\n")).unwrap();
    Recipe::read(&path).unwrap()
}

#[test]
fn pipeline_bundle_runs_in_device_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = digit_recipe_with_pipeline(
        dir.path(),
        "steps = [{ kind = \"quantize\", method = \"min-max\", compute = \"integer\" }]\n\
         budget = { max_accuracy_drop = 0.05 }",
    );
    let (secret, public) = fleet_bundle::generate_key_pair().unwrap();
    let out = dir.path().join("bundle");
    let (_, report) =
        fleet_compress::pipeline::run_pipeline(&recipe, &secret, &out, 3, false).unwrap();
    assert_eq!(report.measurements.len(), 2);
    let bundle = fleet_bundle::Bundle::open_verified(&out, &public).unwrap();
    let metrics = bundle.manifest.metrics.clone().unwrap();
    assert!(metrics.top1_accuracy >= 0.9901, "{metrics:?}");
    assert_eq!(metrics.samples, 10_000);
    assert!(dir.path().join("bundle.report.json").exists());
    assert!(
        bundle
            .manifest
            .files
            .iter()
            .any(|f| f.path == "compression.json")
    );

    let mut classifier = fleet_runtime::Classifier::load(&bundle, 1).unwrap();
    let data = fleet_runtime::Dataset::open(
        &repo_path("models/mnist/t10k-images-idx3-ubyte.gz"),
        Some(&repo_path("models/mnist/t10k-labels-idx1-ubyte.gz")),
    )
    .unwrap();
    let samples: Vec<_> = (0..20).map(|i| data.sample(i).unwrap()).collect();
    let predictions = classifier.classify(&samples).unwrap();
    let correct = predictions
        .iter()
        .zip(&samples)
        .filter(|(p, s)| Some(p.top1().class) == s.label)
        .count();
    assert!(correct >= 19, "{correct} of 20 correct");
}

#[test]
fn pipeline_over_budget_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = digit_recipe_with_pipeline(
        dir.path(),
        "steps = [{ kind = \"prune-channels\", fraction = 0.75 }]\n\
         budget = { max_accuracy_drop = 0.01 }",
    );
    let (secret, _) = fleet_bundle::generate_key_pair().unwrap();
    let out = dir.path().join("bundle");
    let error = fleet_compress::pipeline::run_pipeline(&recipe, &secret, &out, 3, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("misses the budget"), "{error}");
    assert!(!out.exists());
    assert!(!dir.path().join("bundle.report.json").exists());
}

#[test]
fn prune_channels_shrinks_chained_layers() {
    let model = OnnxModel::read(&repo_path("models/digit-cnn/digit-cnn.onnx")).unwrap();
    let (pruned, layers) = fleet_compress::prune::prune_channels(&model, 0.5).unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l.layer.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "conv3", "fc1"]);
    for layer in &layers {
        assert_eq!(layer.after, layer.before / 2, "{layer:?}");
    }
    let conv2 = pruned.float_initializer("conv2.weight").unwrap();
    assert_eq!(conv2.shape(), &[32, 16, 3, 3]);
    let fc1 = pruned.float_initializer("fc1.weight").unwrap();
    assert_eq!(fc1.shape()[0], 128);
    assert_eq!(
        fc1.shape()[1],
        64 * 9,
        "Flatten columns follow the kept channels"
    );
    assert!(pruned.encoded_len() * 3 < model.encoded_len());
    let runner = fleet_compress::assess::Runner::new(&pruned, &[1, 1, 28, 28]).unwrap();
    assert_eq!(runner.run(&[0.5; 784]).unwrap().len(), 10);
}

#[test]
fn prune_channels_skips_residual_add() {
    let mut proto = degenerate_model(13);
    let graph = proto.graph.as_mut().unwrap();
    // relu + relu: the convolution's channels meet another operand.
    graph.node.insert(
        2,
        graph::node("Add", "residual", &["relu", "relu"], &["sum"]),
    );
    graph.node[3].input[0] = "sum".into();
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "residual.onnx", &proto);
    let model = OnnxModel::read(&path).unwrap();
    let (_, layers) = fleet_compress::prune::prune_channels(&model, 0.5).unwrap();
    assert!(layers.iter().all(|l| l.layer != "conv"), "{layers:?}");
}

#[test]
fn fp16_tracks_float_and_counts_clamping() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "degenerate.onnx", &degenerate_model(13));
    let model = OnnxModel::read(&path).unwrap();
    let mut wide_proto = degenerate_model(13);
    wide_proto.graph.as_mut().unwrap().initializer[1] =
        f32_tensor("conv.bias", &[3], &[0.0, 1e6, 0.1]);
    let wide_path = write_model(dir.path(), "wide.onnx", &wide_proto);
    let wide = OnnxModel::read(&wide_path).unwrap();
    let shape = [1, 2, 4, 4];
    let input: Vec<f32> = (0..32).map(|i| (i as f32 / 16.0) - 1.0).collect();
    let expected = fleet_compress::assess::Runner::new(&model, &shape)
        .unwrap()
        .run(&input)
        .unwrap();
    let largest = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for mode in [
        fleet_compress::fp16::Fp16Mode::Weights,
        fleet_compress::fp16::Fp16Mode::Compute,
    ] {
        let (half, report) = fleet_compress::fp16::convert(&model, mode).unwrap();
        // The 1e-20 weights of channel 1 are below float16's smallest value.
        assert_eq!(
            report.flushed.get("conv.weight"),
            Some(&18),
            "{mode:?}: {report:?}"
        );
        assert!(report.clamped.is_empty(), "{mode:?}: {report:?}");
        let data_bytes = |m: &OnnxModel| -> usize {
            m.graph().initializer.iter().map(|t| t.raw_data.len()).sum()
        };
        assert_eq!(data_bytes(&half) * 2, data_bytes(&model), "{mode:?}");
        let actual = fleet_compress::assess::Runner::new(&half, &shape)
            .unwrap()
            .run(&input)
            .unwrap();
        for (e, a) in expected.iter().zip(&actual) {
            assert!(
                (e - a).abs() <= 2e-3 * largest,
                "{mode:?}: fp16 {actual:?} against fp32 {expected:?}"
            );
        }
        let (_, wide_report) = fleet_compress::fp16::convert(&wide, mode).unwrap();
        assert_eq!(
            wide_report.clamped.get("conv.bias"),
            Some(&1),
            "{wide_report:?}"
        );
    }
}

#[test]
fn pipeline_fine_tune_recovers_pruned_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = repo_path("models/mnist");
    let recipe = digit_recipe_with_pipeline(
        dir.path(),
        &format!(
            "steps = [\n\
             {{ kind = \"prune-channels\", fraction = 0.5 }},\n\
             {{ kind = \"fine-tune\", images = {:?}, labels = {:?}, limit = 3000 }},\n\
             ]",
            mnist.join("train-images-idx3-ubyte.gz"),
            mnist.join("train-labels-idx1-ubyte.gz"),
        ),
    );
    let (secret, _) = fleet_bundle::generate_key_pair().unwrap();
    let out = dir.path().join("bundle");
    let (_, report) =
        fleet_compress::pipeline::run_pipeline(&recipe, &secret, &out, 3, false).unwrap();
    let accuracy = |index: usize| {
        report.measurements[index]
            .evaluation
            .unwrap()
            .accuracy
            .unwrap()
    };
    assert_eq!(report.measurements.len(), 3);
    assert!(
        accuracy(2) > accuracy(1),
        "fine-tuned {} against pruned {}",
        accuracy(2),
        accuracy(1)
    );
    assert!(accuracy(2) > 0.97, "fine-tuned {}", accuracy(2));
}

/// `model` with every layer's weights stored as int8 and computed in float.
fn weight_only(model: &OnnxModel) -> OnnxModel {
    let layers = quantize::layers(model).unwrap();
    let modes: HashMap<String, LayerMode> = layers
        .iter()
        .map(|layer| (layer.name.clone(), LayerMode::WeightOnly))
        .collect();
    quantize::quantize(model, &layers, &modes, &HashMap::new().into())
        .unwrap()
        .0
}

#[test]
fn quantize_drops_replaced_weights_listed_as_inputs() {
    // Older exporters also list every initializer as a graph input.
    let mut proto = degenerate_model(13);
    let graph = proto.graph.as_mut().unwrap();
    let listed: Vec<ValueInfoProto> = graph
        .initializer
        .iter()
        .map(|t| {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            float_value(&t.name, &dims)
        })
        .collect();
    graph.input.extend(listed);
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "listed.onnx", &proto);
    let model = OnnxModel::read(&path).unwrap();
    let quantized = weight_only(&model);
    assert_eq!(quantized.data_inputs(), ["input"]);
    let input_names: Vec<&str> = quantized
        .graph()
        .input
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert!(!input_names.contains(&"conv.weight"), "{input_names:?}");
    let runner = fleet_compress::assess::Runner::new(&quantized, &[1, 2, 4, 4]).unwrap();
    assert_eq!(runner.run(&[0.5; 32]).unwrap().len(), 2);
}

#[test]
fn fp16_compute_rejects_a_quantized_graph() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), "degenerate.onnx", &degenerate_model(13));
    let model = OnnxModel::read(&path).unwrap();
    let quantized = weight_only(&model);
    let error = fleet_compress::fp16::convert(&quantized, fleet_compress::fp16::Fp16Mode::Compute)
        .unwrap_err()
        .to_string();
    assert!(error.contains("DequantizeLinear"), "{error}");
}
