use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType, type_proto,
};
use tract_onnx::prelude::{
    Datum, DatumExt, Framework, InferenceModelExt, IntoRunnable, TValue, Tensor, tvec,
};

use super::kernels::{interleave_rows, reference, requantize as rescale};
use super::*;

/// Small deterministic generator, so failures reproduce.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn u8s(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn i8s(&mut self, len: usize) -> Vec<i8> {
        (0..len)
            .map(|_| (self.next() % 255) as i32 - 127)
            .map(|w| w as i8)
            .collect()
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

struct Case {
    name: &'static str,
    in_channels: usize,
    size: [usize; 2],
    out_channels: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
    group: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "pointwise",
        in_channels: 24,
        size: [14, 14],
        out_channels: 40,
        kernel: [1, 1],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [0; 4],
        group: 1,
    },
    Case {
        name: "pointwise deeper than one chunk of widened weights",
        in_channels: 300,
        size: [5, 7],
        out_channels: 6,
        kernel: [1, 1],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [0; 4],
        group: 1,
    },
    Case {
        name: "pointwise over three reduction blocks",
        in_channels: 1000,
        size: [9, 9],
        out_channels: 10,
        kernel: [1, 1],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [0; 4],
        group: 1,
    },
    Case {
        name: "grouped 3x3 over two reduction blocks",
        in_channels: 100,
        size: [6, 5],
        out_channels: 6,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [1, 1, 1, 1],
        group: 2,
    },
    Case {
        name: "stem 3x3 stride 2",
        in_channels: 3,
        size: [15, 17],
        out_channels: 16,
        kernel: [3, 3],
        strides: [2, 2],
        dilations: [1, 1],
        pads: [1, 1, 1, 1],
        group: 1,
    },
    Case {
        name: "3x3 rows not a tile multiple",
        in_channels: 8,
        size: [9, 7],
        out_channels: 6,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [1, 1, 1, 1],
        group: 1,
    },
    Case {
        name: "pointwise stride 2",
        in_channels: 5,
        size: [8, 9],
        out_channels: 7,
        kernel: [1, 1],
        strides: [2, 2],
        dilations: [1, 1],
        pads: [0; 4],
        group: 1,
    },
    Case {
        name: "grouped 3x3",
        in_channels: 8,
        size: [6, 6],
        out_channels: 6,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [1, 1, 1, 1],
        group: 2,
    },
    Case {
        name: "dilated 3x3",
        in_channels: 4,
        size: [10, 10],
        out_channels: 5,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [2, 2],
        pads: [2, 2, 2, 2],
        group: 1,
    },
    Case {
        name: "kernel wider than input",
        in_channels: 2,
        size: [4, 1],
        out_channels: 3,
        kernel: [5, 5],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [2, 2, 2, 2],
        group: 1,
    },
    Case {
        name: "depthwise 3x3",
        in_channels: 16,
        size: [10, 9],
        out_channels: 16,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [1, 1, 1, 1],
        group: 16,
    },
    Case {
        name: "depthwise 5x5 stride 2",
        in_channels: 8,
        size: [11, 13],
        out_channels: 8,
        kernel: [5, 5],
        strides: [2, 2],
        dilations: [1, 1],
        pads: [2, 2, 2, 2],
        group: 8,
    },
    Case {
        name: "depthwise 3x3 stride 2 padded after",
        in_channels: 4,
        size: [8, 8],
        out_channels: 4,
        kernel: [3, 3],
        strides: [2, 2],
        dilations: [1, 1],
        pads: [0, 0, 1, 1],
        group: 4,
    },
    Case {
        name: "depthwise 3x3 stride 2x1 uneven pads",
        in_channels: 5,
        size: [9, 7],
        out_channels: 5,
        kernel: [3, 3],
        strides: [2, 1],
        dilations: [1, 1],
        pads: [0, 2, 1, 0],
        group: 5,
    },
    Case {
        name: "depthwise 5x5, channels past a block of 16",
        in_channels: 21,
        size: [7, 7],
        out_channels: 21,
        kernel: [5, 5],
        strides: [1, 1],
        dilations: [1, 1],
        pads: [2, 2, 2, 2],
        group: 21,
    },
    Case {
        name: "depthwise 3x3 stride 2, two blocks",
        in_channels: 32,
        size: [14, 13],
        out_channels: 32,
        kernel: [3, 3],
        strides: [2, 2],
        dilations: [1, 1],
        pads: [0, 0, 1, 1],
        group: 32,
    },
    Case {
        name: "depthwise dilated",
        in_channels: 3,
        size: [9, 9],
        out_channels: 3,
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [2, 2],
        pads: [2, 2, 2, 2],
        group: 3,
    },
];

impl Case {
    fn geometry(&self) -> Geometry {
        let out = |axis: usize| {
            let span = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
            (self.size[axis] + self.pads[axis] + self.pads[axis + 2] - span) / self.strides[axis]
                + 1
        };
        Geometry {
            in_channels: self.in_channels,
            in_height: self.size[0],
            in_width: self.size[1],
            out_channels: self.out_channels,
            out_height: out(0),
            out_width: out(1),
            kernel: self.kernel,
            strides: self.strides,
            dilations: self.dilations,
            pad_before: [self.pads[0], self.pads[1]],
            group: self.group,
        }
    }

    fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels / self.group * self.kernel[0] * self.kernel[1]
    }
}

/// Weights with channel 1 all zero, as pruning leaves them, and the rest random.
fn weights(case: &Case, numbers: &mut Numbers) -> Vec<i8> {
    let mut weights = numbers.i8s(case.weight_len());
    let per_channel = case.weight_len() / case.out_channels;
    weights[per_channel..2 * per_channel].fill(0);
    weights
}

fn requantize(case: &Case, numbers: &mut Numbers) -> Requantize {
    let taps = (case.weight_len() / case.out_channels) as f32;
    Requantize {
        bias: (0..case.out_channels)
            .map(|_| numbers.below(20_001) as i32 - 10_000)
            .collect(),
        // Spreads typical sums over the u8 range, with some saturating at either end.
        multiplier: (0..case.out_channels)
            .map(|_| (1.0 + numbers.below(100) as f32 / 50.0) / (taps.sqrt() * 300.0))
            .collect(),
        output_zero_point: numbers.below(256) as u8,
    }
}

/// Counts positions that differ, and fails on any difference above 1.
fn count_differences(case: &str, found: &[u8], expected: &[u8]) -> usize {
    assert_eq!(found.len(), expected.len(), "{case}: output length");
    let mut differences = 0;
    for (index, (&a, &b)) in found.iter().zip(expected).enumerate() {
        assert!(
            a.abs_diff(b) <= 1,
            "{case}: output {index} is {a}, expected {b}"
        );
        differences += usize::from(a != b);
    }
    differences
}

#[test]
fn kernels_match_reference() {
    let mut numbers = Numbers(0x5eed);
    for case in CASES {
        let geometry = case.geometry();
        let input = numbers.u8s(geometry.input_len());
        let weights = weights(case, &mut numbers);
        let requantize = requantize(case, &mut numbers);
        let zero_point = numbers.below(256) as u8;
        let expected = reference(&geometry, &input, &weights, &requantize, zero_point);
        let distinct = expected
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        // A spread of values, so a wrong rescale cannot pass by saturating everything.
        let minimum = 20.min(expected.len() / 2);
        assert!(
            distinct > minimum,
            "{}: only {distinct} distinct outputs",
            case.name
        );

        let mut found = vec![0; geometry.output_len()];
        if case.group > 1 && case.group == case.in_channels {
            let kernel = DepthwiseConv::new(geometry.clone(), &weights, requantize, zero_point)
                .expect("depthwise kernel");
            kernel.run_planes(&input, &mut found);
            // Both forms compute exact integer sums, so they must agree byte for byte.
            for lanes in [8, 16] {
                let kernel = kernel.clone().with_blocked_lanes(lanes);
                let mut blocked = vec![0; geometry.output_len()];
                if kernel.run_blocked(&input, &mut blocked) {
                    assert_eq!(
                        blocked, found,
                        "{}: {lanes}-lane blocked and plane forms differ",
                        case.name
                    );
                }
            }
        } else {
            let kernel =
                GemmConv::new(geometry.clone(), &weights, requantize, zero_point).expect("gemm");
            kernel.run(&input, &mut found);
            let mut portable = vec![0; geometry.output_len()];
            kernel.run_portable(&input, &mut portable);
            assert_eq!(found, portable, "{}: portable tile differs", case.name);
            let mut avx2 = vec![0; geometry.output_len()];
            if kernel.run_avx2_tile(&input, &mut avx2) {
                assert_eq!(avx2, portable, "{}: AVX2 tile differs", case.name);
            }
        }
        let differences = count_differences(case.name, &found, &expected);
        assert!(
            differences * 100 <= found.len(),
            "{}: {differences} of {} outputs off by one",
            case.name,
            found.len()
        );
    }
}

/// Random geometries through every form of both kernels: strides, dilations,
/// asymmetric pads, kernels wider than the input, groups, and planes of one pixel.
#[test]
fn gemm_rejects_empty_reduction() {
    let geometry = Geometry {
        in_channels: 0,
        in_height: 4,
        in_width: 4,
        out_channels: 2,
        out_height: 4,
        out_width: 4,
        kernel: [1, 1],
        strides: [1, 1],
        dilations: [1, 1],
        pad_before: [0, 0],
        group: 1,
    };
    let requantize = Requantize {
        bias: vec![0; 2],
        multiplier: vec![0.01; 2],
        output_zero_point: 0,
    };
    assert!(GemmConv::new(geometry, &[], requantize, 0).is_none());
}

#[test]
fn kernels_match_reference_on_random_geometries() {
    let mut numbers = Numbers(0xc0ffee);
    let (mut checked, mut differences, mut outputs) = (0, 0, 0);
    while checked < 400 {
        let depthwise = numbers.below(3) == 0;
        let (group, in_channels, out_channels) = if depthwise {
            let channels = 1 + numbers.below(40) as usize;
            (channels, channels, channels)
        } else {
            let group = 1 + numbers.below(3) as usize;
            // One in five reduces over more than one block of the product's steps.
            let in_per_group = match numbers.below(5) {
                0 => 1 + numbers.below(160) as usize,
                _ => 1 + numbers.below(12) as usize,
            };
            let out_per_group = 1 + numbers.below(9) as usize;
            (group, group * in_per_group, group * out_per_group)
        };
        let kernel = [1 + numbers.below(5) as usize, 1 + numbers.below(5) as usize];
        let strides = [1 + numbers.below(3) as usize, 1 + numbers.below(3) as usize];
        let dilations = [1 + numbers.below(2) as usize, 1 + numbers.below(2) as usize];
        let size = [
            1 + numbers.below(20) as usize,
            1 + numbers.below(20) as usize,
        ];
        let pads: [usize; 4] =
            std::array::from_fn(|i| numbers.below(kernel[i % 2] as u64) as usize);
        let span = |axis: usize| dilations[axis] * (kernel[axis] - 1) + 1;
        if (0..2).any(|axis| size[axis] + pads[axis] + pads[axis + 2] < span(axis)) {
            continue;
        }
        let out = |axis: usize| {
            (size[axis] + pads[axis] + pads[axis + 2] - span(axis)) / strides[axis] + 1
        };
        let geometry = Geometry {
            in_channels,
            in_height: size[0],
            in_width: size[1],
            out_channels,
            out_height: out(0),
            out_width: out(1),
            kernel,
            strides,
            dilations,
            pad_before: [pads[0], pads[1]],
            group,
        };
        let name = format!("{geometry:?}");
        let taps = in_channels / group * kernel[0] * kernel[1];
        let weights = numbers.i8s(out_channels * taps);
        let requantize = Requantize {
            bias: (0..out_channels)
                .map(|_| numbers.below(2_001) as i32 - 1_000)
                .collect(),
            multiplier: (0..out_channels)
                .map(|_| (1.0 + numbers.below(100) as f32 / 50.0) / ((taps as f32).sqrt() * 150.0))
                .collect(),
            output_zero_point: numbers.below(256) as u8,
        };
        let zero_point = numbers.below(256) as u8;
        let input = numbers.u8s(geometry.input_len());
        let expected = reference(&geometry, &input, &weights, &requantize, zero_point);

        let mut found = vec![0; geometry.output_len()];
        if depthwise {
            let kernel = DepthwiseConv::new(geometry.clone(), &weights, requantize, zero_point)
                .expect("depthwise kernel");
            kernel.run_planes(&input, &mut found);
            for lanes in [8, 16] {
                let kernel = kernel.clone().with_blocked_lanes(lanes);
                let mut blocked = vec![0; geometry.output_len()];
                if kernel.run_blocked(&input, &mut blocked) {
                    assert_eq!(blocked, found, "{name}: {lanes}-lane blocked form differs");
                }
            }
        } else {
            let kernel =
                GemmConv::new(geometry.clone(), &weights, requantize, zero_point).expect("gemm");
            kernel.run(&input, &mut found);
            let mut portable = vec![0; geometry.output_len()];
            kernel.run_portable(&input, &mut portable);
            assert_eq!(found, portable, "{name}: portable tile differs");
            let mut avx2 = vec![0; geometry.output_len()];
            if kernel.run_avx2_tile(&input, &mut avx2) {
                assert_eq!(avx2, portable, "{name}: AVX2 tile differs");
            }
        }
        differences += count_differences(&name, &found, &expected);
        outputs += found.len();
        checked += 1;
    }
    assert!(
        differences * 100 <= outputs,
        "{differences} of {outputs} outputs off by one"
    );
}

#[test]
fn interleave_rows_transposes_four_rows() {
    let rows: [[u8; 16]; 4] = std::array::from_fn(|j| std::array::from_fn(|p| (16 * j + p) as u8));
    let mut block = [0u8; 64];
    interleave_rows([&rows[0], &rows[1], &rows[2], &rows[3]], &mut block);
    for pixel in 0..16 {
        for (j, row) in rows.iter().enumerate() {
            assert_eq!(block[4 * pixel + j], row[pixel], "pixel {pixel}, row {j}");
        }
    }
}

#[test]
fn rescale_rounds_before_zero_point() {
    // 46.500008 + 104 rounds to 150.5 in f32, which would round down to 150.
    assert_eq!(rescale(46.500_008, 1.0, 104), 151);
    assert_eq!(rescale(-28.500_002, 1.0, 200), 171);
    assert_eq!(rescale(2.5, 1.0, 0), 2);
    assert_eq!(rescale(3.5, 1.0, 0), 4);
    assert_eq!(rescale(1e9, 1.0, 0), 255);
    assert_eq!(rescale(-1e9, 1.0, 255), 0);
}

#[test]
fn gemm_rejects_overflowing_bias() {
    let case = &CASES[0];
    let mut numbers = Numbers(7);
    let mut requantize = requantize(case, &mut numbers);
    requantize.bias[3] = i32::MAX - 10;
    let weights = weights(case, &mut numbers);
    assert!(GemmConv::new(case.geometry(), &weights, requantize, 128).is_none());
}

#[test]
fn depthwise_rejects_overflowing_bias() {
    let case = CASES
        .iter()
        .find(|case| case.name == "depthwise 3x3")
        .expect("depthwise case");
    let mut numbers = Numbers(7);
    let weights = weights(case, &mut numbers);
    let mut requantize = requantize(case, &mut numbers);
    requantize.bias[2] = i32::MAX - 10;
    assert!(DepthwiseConv::new(case.geometry(), &weights, requantize, 128).is_none());
}

#[test]
fn depthwise_adds_bias_in_integers() {
    // A bias beyond 2^24, where f32 holds only even integers. Products of 65 plus the
    // bias are 100.5000076 levels, so only the exact sum rounds up to 101: adding
    // the products to the bias in f32 gave 100.
    let channels = 8;
    let geometry = Geometry {
        in_channels: channels,
        in_height: 1,
        in_width: 8,
        out_channels: channels,
        out_height: 1,
        out_width: 8,
        kernel: [1, 1],
        strides: [1, 1],
        dilations: [1, 1],
        pad_before: [0, 0],
        group: channels,
    };
    let requantize = Requantize {
        bias: vec![26_345_409; channels],
        multiplier: vec![1.0 / (1 << 18) as f32; channels],
        output_zero_point: 0,
    };
    let weights = vec![1i8; channels];
    let input = vec![65u8; geometry.input_len()];
    let kernel = DepthwiseConv::new(geometry.clone(), &weights, requantize, 0).expect("kernel");

    let mut planes = vec![0; geometry.output_len()];
    kernel.run_planes(&input, &mut planes);
    assert_eq!(planes, vec![101; geometry.output_len()]);
    for lanes in [8, 16] {
        let kernel = kernel.clone().with_blocked_lanes(lanes);
        let mut blocked = vec![0; geometry.output_len()];
        if kernel.run_blocked(&input, &mut blocked) {
            assert_eq!(blocked, planes, "{lanes} lanes");
        }
    }
}

fn tensor(name: &str, data_type: DataType, dims: &[usize], raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: data_type as i32,
        dims: dims.iter().map(|&d| d as i64).collect(),
        raw_data,
        ..TensorProto::default()
    }
}

fn ints(name: &str, values: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.iter().map(|&v| v as i64).collect(),
        ..AttributeProto::default()
    }
}

fn float_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Wraps `node`, which reads `x` of element type `input_type` and writes `y`, in an
/// opset 13 model with `initializer`.
fn single_node_model(
    node: NodeProto,
    initializer: Vec<TensorProto>,
    input_type: DataType,
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: node.op_type.clone(),
            node: vec![node],
            initializer,
            input: vec![ValueInfoProto {
                name: "x".into(),
                r#type: Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: input_type as i32,
                        shape: None,
                    })),
                    ..TypeProto::default()
                }),
                ..ValueInfoProto::default()
            }],
            output: vec![ValueInfoProto {
                name: "y".into(),
                ..ValueInfoProto::default()
            }],
            ..GraphProto::default()
        }),
        ..ModelProto::default()
    }
}

/// Builds an ONNX model of one `QLinearConv` reading `x` (u8) with the case's geometry.
fn qlinear_conv_model(case: &Case, numbers: &mut Numbers, weight_zero_point: i8) -> ModelProto {
    let weights = weights(case, numbers);
    let requantize = requantize(case, numbers);
    let per_channel = case.weight_len() / case.out_channels;
    let weight_shape = [
        case.out_channels,
        case.in_channels / case.group,
        case.kernel[0],
        case.kernel[1],
    ];
    let input_scale = 0.02f32;
    let output_scale = 0.05f32;
    let weight_scales: Vec<f32> = requantize
        .multiplier
        .iter()
        .map(|m| m * output_scale / input_scale)
        .collect();
    let initializer = vec![
        tensor("x_scale", DataType::Float, &[], float_bytes(&[input_scale])),
        tensor("x_zero_point", DataType::Uint8, &[], vec![131]),
        tensor(
            "w",
            DataType::Int8,
            &weight_shape,
            weights.iter().map(|&w| w as u8).collect(),
        ),
        tensor(
            "w_scale",
            DataType::Float,
            &[case.out_channels],
            float_bytes(&weight_scales),
        ),
        tensor(
            "w_zero_point",
            DataType::Int8,
            &[case.out_channels],
            vec![weight_zero_point as u8; case.out_channels],
        ),
        tensor(
            "y_scale",
            DataType::Float,
            &[],
            float_bytes(&[output_scale]),
        ),
        tensor(
            "y_zero_point",
            DataType::Uint8,
            &[],
            vec![requantize.output_zero_point],
        ),
        tensor(
            "bias",
            DataType::Int32,
            &[case.out_channels],
            requantize
                .bias
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect(),
        ),
    ];
    assert_eq!(weights.len(), case.out_channels * per_channel);
    let node = NodeProto {
        name: "conv".into(),
        op_type: "QLinearConv".into(),
        input: [
            "x",
            "x_scale",
            "x_zero_point",
            "w",
            "w_scale",
            "w_zero_point",
            "y_scale",
            "y_zero_point",
            "bias",
        ]
        .map(String::from)
        .to_vec(),
        output: vec!["y".into()],
        attribute: vec![
            ints("kernel_shape", &case.kernel),
            ints("strides", &case.strides),
            ints("dilations", &case.dilations),
            ints("pads", &case.pads),
            AttributeProto {
                name: "group".into(),
                r#type: AttributeType::Int as i32,
                i: case.group as i64,
                ..AttributeProto::default()
            },
        ],
        ..NodeProto::default()
    };
    single_node_model(node, initializer, DataType::Uint8)
}

/// Loads `model` with `framework`, runs it on `input` and returns the output and the
/// names of the operators in the optimised plan.
fn run_model<T: Datum + Copy, I: Datum + Copy>(
    framework: &tract_onnx::Onnx,
    model: &ModelProto,
    shape: &[usize],
    input: &[I],
) -> (Vec<T>, Vec<String>) {
    let typed = framework
        .model_for_proto_model(model)
        .expect("model loads")
        .with_input_fact(0, I::fact(shape).into())
        .expect("input fact")
        .into_optimized()
        .expect("model optimises");
    let operators = typed
        .nodes()
        .iter()
        .map(|n| n.op.name().to_string())
        .collect();
    let plan = typed.into_runnable().expect("plan");
    let input = Tensor::from_shape(shape, input).expect("input tensor");
    let output = plan.run(tvec![TValue::from(input)]).expect("model runs");
    let values = output[0]
        .try_as_plain_ram()
        .expect("plain output")
        .as_slice::<T>()
        .expect("output of the expected type")
        .to_vec();
    (values, operators)
}

#[test]
fn onnx_qlinear_conv_matches_tract() {
    let mut numbers = Numbers(0xc0ffee);
    let ours = onnx();
    let tract = tract_onnx::onnx();
    for case in CASES {
        let model = qlinear_conv_model(case, &mut numbers, 0);
        let shape = [2, case.in_channels, case.size[0], case.size[1]];
        let input = numbers.u8s(shape.iter().product());
        let (found, operators) = run_model::<u8, _>(&ours, &model, &shape, &input);
        let (expected, _) = run_model::<u8, _>(&tract, &model, &shape, &input);
        assert!(
            operators.iter().any(|name| name == "IntegerConv"),
            "{}: plan has {operators:?}",
            case.name
        );
        let differences = count_differences(case.name, &found, &expected);
        assert!(
            differences * 50 <= found.len(),
            "{}: {differences} of {} outputs off by one",
            case.name,
            found.len()
        );
    }
}

#[test]
fn zero_weight_scales_give_zero_point() {
    let mut numbers = Numbers(41);
    for case in [&CASES[0], &CASES[7]] {
        let mut model = qlinear_conv_model(case, &mut numbers, 0);
        let graph = model.graph.as_mut().expect("graph");
        let scales = graph
            .initializer
            .iter_mut()
            .find(|tensor| tensor.name == "w_scale")
            .expect("weight scales");
        scales.raw_data = float_bytes(&vec![0.0; case.out_channels]);
        let zero_point = graph
            .initializer
            .iter()
            .find(|tensor| tensor.name == "y_zero_point")
            .expect("output zero point")
            .raw_data[0];
        let shape = [1, case.in_channels, case.size[0], case.size[1]];
        let input = numbers.u8s(shape.iter().product());
        let (found, operators) = run_model::<u8, _>(&onnx(), &model, &shape, &input);
        assert!(
            operators.iter().any(|name| name == "IntegerConv"),
            "{}: plan has {operators:?}",
            case.name
        );
        assert!(
            found.iter().all(|&level| level == zero_point),
            "{}: outputs {found:?}, expected all {zero_point}",
            case.name
        );
    }
}

#[test]
fn weight_zero_point_keeps_tract_kernel() {
    let mut numbers = Numbers(99);
    let case = &CASES[1];
    let model = qlinear_conv_model(case, &mut numbers, 3);
    let shape = [1, case.in_channels, case.size[0], case.size[1]];
    let input = numbers.u8s(shape.iter().product());
    let (found, operators) = run_model::<u8, _>(&onnx(), &model, &shape, &input);
    let (expected, _) = run_model::<u8, _>(&tract_onnx::onnx(), &model, &shape, &input);
    assert!(!operators.iter().any(|name| name == "IntegerConv"));
    assert_eq!(found, expected);
}

/// Builds an ONNX model of one `MaxPool` reading `x` of element type `data_type`.
fn max_pool_model(
    data_type: DataType,
    kernel: [usize; 2],
    strides: [usize; 2],
    pads: [usize; 4],
    ceil_mode: bool,
) -> ModelProto {
    let node = NodeProto {
        name: "pool".into(),
        op_type: "MaxPool".into(),
        input: vec!["x".into()],
        output: vec!["y".into()],
        attribute: vec![
            ints("kernel_shape", &kernel),
            ints("strides", &strides),
            ints("pads", &pads),
            AttributeProto {
                name: "ceil_mode".into(),
                r#type: AttributeType::Int as i32,
                i: i64::from(ceil_mode),
                ..AttributeProto::default()
            },
        ],
        ..NodeProto::default()
    };
    single_node_model(node, Vec::new(), data_type)
}

struct PoolCase {
    size: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
    ceil_mode: bool,
}

const fn pool_case(
    size: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    pads: [usize; 4],
    ceil_mode: bool,
) -> PoolCase {
    PoolCase {
        size,
        kernel,
        strides,
        pads,
        ceil_mode,
    }
}

#[rustfmt::skip]
const POOL_CASES: &[PoolCase] = &[
    // Input size, window, strides, pads, ceil mode.
    pool_case([28, 28], [2, 2], [2, 2], [0; 4], false),
    pool_case([7, 7], [2, 2], [2, 2], [0; 4], false),
    pool_case([7, 7], [2, 2], [2, 2], [0; 4], true),
    pool_case([9, 6], [2, 2], [2, 2], [0; 4], false),
    pool_case([7, 7], [2, 2], [2, 2], [0, 0, 1, 1], false),
    pool_case([13, 11], [3, 3], [2, 2], [1, 1, 1, 1], false),
    pool_case([9, 10], [3, 2], [1, 2], [1, 0, 1, 0], true),
    pool_case([5, 6], [3, 3], [1, 1], [2, 2, 2, 2], false),
    pool_case([1, 1], [1, 1], [1, 1], [0; 4], false),
];

#[test]
fn u8_max_pool_matches_tract() {
    let mut numbers = Numbers(0x5eed);
    for case in POOL_CASES {
        let name = format!(
            "{:?} kernel {:?} strides {:?} pads {:?}",
            case.size, case.kernel, case.strides, case.pads
        );
        let model = max_pool_model(
            DataType::Uint8,
            case.kernel,
            case.strides,
            case.pads,
            case.ceil_mode,
        );
        let shape = [2, 3, case.size[0], case.size[1]];
        let input = numbers.u8s(shape.iter().product());
        let (found, operators) = run_model::<u8, _>(&onnx(), &model, &shape, &input);
        let (expected, _) = run_model::<u8, _>(&tract_onnx::onnx(), &model, &shape, &input);
        assert!(
            operators.iter().any(|op| op == "U8MaxPool"),
            "{name}: plan has {operators:?}"
        );
        assert_eq!(found, expected, "{name}");
    }
}

#[test]
fn padding_as_wide_as_window_keeps_tract_kernel() {
    let model = max_pool_model(DataType::Uint8, [2, 2], [2, 2], [0, 0, 3, 3], false);
    let shape = [1, 1, 3, 3];
    let input: Vec<u8> = (1..=9).collect();
    let (_, operators) = run_model::<u8, _>(&onnx(), &model, &shape, &input);
    assert!(
        !operators.iter().any(|op| op == "U8MaxPool"),
        "{operators:?}"
    );
}

#[test]
fn float_max_pool_keeps_tract_kernel() {
    let model = max_pool_model(DataType::Float, [2, 2], [2, 2], [0; 4], false);
    let typed = onnx()
        .model_for_proto_model(&model)
        .expect("model loads")
        .with_input_fact(0, f32::fact([1, 2, 4, 4]).into())
        .expect("input fact")
        .into_optimized()
        .expect("model optimises");
    assert!(typed.nodes().iter().all(|n| n.op.name() != "U8MaxPool"));
}

/// Builds an ONNX model of one `MatMulInteger` reading `x` (u8, `rows` x `depth`) with
/// random i8 weights of `columns` columns and the given zero points, if any.
fn matmul_integer_model(
    numbers: &mut Numbers,
    [depth, columns]: [usize; 2],
    input_zero_point: Option<u8>,
    weight_zero_point: Option<i8>,
) -> ModelProto {
    let weights = numbers.i8s(depth * columns);
    let mut initializer = vec![tensor(
        "w",
        DataType::Int8,
        &[depth, columns],
        weights.iter().map(|&w| w as u8).collect(),
    )];
    let mut inputs = vec![
        "x".to_string(),
        "w".to_string(),
        String::new(),
        String::new(),
    ];
    if let Some(zero_point) = input_zero_point {
        initializer.push(tensor(
            "x_zero_point",
            DataType::Uint8,
            &[],
            vec![zero_point],
        ));
        inputs[2] = "x_zero_point".into();
    }
    if let Some(zero_point) = weight_zero_point {
        initializer.push(tensor(
            "w_zero_point",
            DataType::Int8,
            &[],
            vec![zero_point as u8],
        ));
        inputs[3] = "w_zero_point".into();
    }
    while inputs.last().is_some_and(String::is_empty) {
        inputs.pop();
    }
    let node = NodeProto {
        op_type: "MatMulInteger".into(),
        name: "matmul".into(),
        input: inputs,
        output: vec!["y".into()],
        ..NodeProto::default()
    };
    single_node_model(node, initializer, DataType::Uint8)
}

#[test]
fn onnx_matmul_integer_matches_tract() {
    let mut numbers = Numbers(0xbeef);
    // rows, depth, columns, input zero point, weight zero point
    let cases = [
        (1, 1280, 1000, Some(131u8), Some(0i8)),
        (1, 64, 10, None, None),
        (3, 17, 5, Some(255), None),
        (2, 9, 4, None, Some(0)),
        (4, 33, 7, Some(0), Some(0)),
        (2, 1, 1, Some(7), None),
        (3, 100, 6, Some(200), None),
    ];
    for (rows, depth, columns, input_zero_point, weight_zero_point) in cases {
        let case = format!(
            "{rows}x{depth}x{columns}, zero points {input_zero_point:?} {weight_zero_point:?}"
        );
        let model = matmul_integer_model(
            &mut numbers,
            [depth, columns],
            input_zero_point,
            weight_zero_point,
        );
        let shape = [rows, depth];
        let input = numbers.u8s(rows * depth);
        let (found, operators) = run_model::<i32, _>(&onnx(), &model, &shape, &input);
        let (expected, _) = run_model::<i32, _>(&tract_onnx::onnx(), &model, &shape, &input);
        assert!(
            operators.iter().any(|name| name == "IntegerMatMul"),
            "{case}: plan has {operators:?}"
        );
        assert_eq!(found, expected, "{case}");
    }
}

#[test]
fn matmul_weight_zero_point_keeps_tract_kernel() {
    let mut numbers = Numbers(5);
    let model = matmul_integer_model(&mut numbers, [12, 3], Some(9), Some(2));
    let input = numbers.u8s(2 * 12);
    let (found, operators) = run_model::<i32, _>(&onnx(), &model, &[2, 12], &input);
    let (expected, _) = run_model::<i32, _>(&tract_onnx::onnx(), &model, &[2, 12], &input);
    assert!(
        !operators.iter().any(|name| name == "IntegerMatMul"),
        "plan has {operators:?}"
    );
    assert_eq!(found, expected);
}

/// Builds an ONNX model of one `QuantizeLinear` from `x` (f32) with `scales` (one, or
/// one per channel of axis 1) and zero point 3 as u8, or -3 as i8 when `signed`.
fn quantize_linear_model(scales: &[f32], signed: bool) -> ModelProto {
    linear_quantization_model("QuantizeLinear", scales, signed)
}

/// Builds an ONNX model of one `op_type` (`QuantizeLinear` or `DequantizeLinear`) on
/// `x` with `scales` (one, or one per channel of axis 1) and zero point 3 as u8, or -3
/// as i8 when `signed`.
fn linear_quantization_model(op_type: &str, scales: &[f32], signed: bool) -> ModelProto {
    let dims: &[usize] = if scales.len() == 1 {
        &[]
    } else {
        &[scales.len()]
    };
    let (zero_point_type, zero_point) = if signed {
        (DataType::Int8, -3i8 as u8)
    } else {
        (DataType::Uint8, 3)
    };
    let initializer = vec![
        tensor("scale", DataType::Float, dims, float_bytes(scales)),
        tensor(
            "zero_point",
            zero_point_type,
            dims,
            vec![zero_point; scales.len()],
        ),
    ];
    let node = NodeProto {
        op_type: op_type.into(),
        name: op_type.to_lowercase(),
        input: vec!["x".into(), "scale".into(), "zero_point".into()],
        output: vec!["y".into()],
        ..NodeProto::default()
    };
    let input_type = if op_type == "QuantizeLinear" {
        DataType::Float
    } else {
        zero_point_type
    };
    single_node_model(node, initializer, input_type)
}

/// Dequantizes `input` with the one-scale model of scale `scale` through the runtime,
/// checks that its own operator ran and matched tract's, and returns the output.
fn dequantize_with_runtime<I: Datum + Copy>(input: &[I], scale: f32, signed: bool) -> Vec<f32> {
    let model = linear_quantization_model("DequantizeLinear", &[scale], signed);
    let shape = [2, input.len() / 2];
    let (found, operators) = run_model::<f32, _>(&onnx(), &model, &shape, input);
    let (expected, _) = run_model::<f32, _>(&tract_onnx::onnx(), &model, &shape, input);
    assert!(
        operators
            .iter()
            .any(|name| name == "ScalarDequantizeLinear"),
        "plan has {operators:?}"
    );
    assert_eq!(found, expected);
    found
}

#[test]
fn dequantize_linear_matches_tract() {
    let scale = 0.0371f32;
    let unsigned: Vec<u8> = (0..=255).cycle().take(1000).collect();
    let found = dequantize_with_runtime(&unsigned, scale, false);
    assert_eq!(found[3], 0.0, "the zero point is 3");
    assert_eq!(found[255], 252.0 * scale);

    let signed: Vec<i8> = (-128..=127).collect();
    let found = dequantize_with_runtime(&signed, scale, true);
    assert_eq!(found[0], -125.0 * scale, "-128 less the zero point -3");
}

#[test]
fn per_channel_dequantize_linear_keeps_tract_kernel() {
    let model = linear_quantization_model("DequantizeLinear", &[0.5, 0.25], false);
    let input = [5u8, 3, 7, 1];
    let (found, operators) = run_model::<f32, _>(&onnx(), &model, &[1, 2, 2], &input);
    assert!(
        !operators
            .iter()
            .any(|name| name == "ScalarDequantizeLinear"),
        "plan has {operators:?}"
    );
    assert_eq!(found, [1.0, 0.0, 1.0, -0.5]);
}

/// Quantizes `input` with the one-scale model of scale `scale` through the runtime and
/// checks every value against the ONNX formula, with NaN going to the type's minimum.
fn check_quantize_linear<T: Datum + Copy + PartialEq + std::fmt::Debug + TryFrom<i32>>(
    input: &[f32],
    scale: f32,
    signed: bool,
) {
    let model = quantize_linear_model(&[scale], signed);
    let shape = [1, input.len()];
    let (found, operators) = run_model::<T, _>(&onnx(), &model, &shape, input);
    assert!(
        operators.iter().any(|name| name == "ScalarQuantizeLinear"),
        "plan has {operators:?}"
    );
    let (zero_point, min, max) = if signed { (-3, -128, 127) } else { (3, 0, 255) };
    for (value, found) in input.iter().zip(&found) {
        let level = if value.is_nan() {
            min
        } else {
            ((value / scale).round_ties_even() + zero_point as f32).clamp(min as f32, max as f32)
                as i32
        };
        let expected = T::try_from(level).ok().expect("level in range");
        assert_eq!(*found, expected, "quantizing {value}");
    }
}

#[test]
fn quantize_linear_follows_onnx() {
    let scale = 0.05f32;
    let mut numbers = Numbers(17);
    let mut input: Vec<f32> = (0..4000)
        .map(|_| (numbers.below(40_000) as f32 - 20_000.0) / 1000.0)
        .collect();
    // Exact ties between two levels, both ways, and values no level reaches.
    input.extend([
        2.5 * scale,
        3.5 * scale,
        -2.5 * scale,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        2.2e8,
    ]);
    check_quantize_linear::<u8>(&input, scale, false);
    check_quantize_linear::<i8>(&input, scale, true);
}

#[test]
fn per_channel_quantize_linear_keeps_tract_kernel() {
    let model = quantize_linear_model(&[0.1, 0.2], false);
    let input = [0.5f32, -0.3, 1.0, 2.0];
    let (found, operators) = run_model::<u8, _>(&onnx(), &model, &[1, 2, 2], &input);
    assert!(
        !operators.iter().any(|name| name == "ScalarQuantizeLinear"),
        "plan has {operators:?}"
    );
    assert_eq!(found, [8, 0, 8, 13]);
}

#[test]
fn quantize_linear_output_dtype_i8() {
    // Opset 21 names the output type in an attribute when there is no zero point.
    let mut model = quantize_linear_model(&[0.1], false);
    let graph = model.graph.as_mut().expect("graph");
    graph
        .initializer
        .retain(|tensor| tensor.name != "zero_point");
    let node = &mut graph.node[0];
    node.input.truncate(2);
    node.attribute.push(AttributeProto {
        name: "output_dtype".into(),
        r#type: AttributeType::Int as i32,
        i: DataType::Int8 as i64,
        ..AttributeProto::default()
    });
    model.opset_import[0].version = 21;
    let input = [-1.0f32, 1.0, 20.0];
    let (found, operators) = run_model::<i8, _>(&onnx(), &model, &[1, 3], &input);
    assert!(
        operators.iter().any(|name| name == "ScalarQuantizeLinear"),
        "plan has {operators:?}"
    );
    assert_eq!(found, [-10, 10, 127]);
}

#[test]
fn backend_rejects_integer_output_at_load() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("quantize.onnx");
    let model = quantize_linear_model(&[0.1], false);
    std::fs::write(&path, prost::Message::encode_to_vec(&model)).expect("model written");
    let Err(error) = crate::TractBackend::load_onnx(&path, &[1, 4]) else {
        panic!("a model with a u8 output loaded");
    };
    let error = error.to_string();
    assert!(error.contains("models must output float32"), "{error}");
    assert!(error.contains("quantize.onnx"), "{error}");
}
