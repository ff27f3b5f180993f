//! Max pooling of u8 tensors in NCHW layout.
//!
//! tract 0.23 pools u8 with its generic kernel, which visits the window of each output
//! element in turn. In the int8 digit CNN its three 2x2 pools took 0.07 ms, more than
//! half as long as the three integer convolutions before them (`op_profile`). [`U8MaxPool`]
//! first takes the maximum of the window's input rows over the whole row width, a loop
//! the compiler turns into SIMD byte maxima, and then the maximum of each window's
//! columns in that single row.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::cnn::HirMaxPool;

use super::{Lowered, Lowering, OpBuilder, map_images, u8_shape, wrap_tract_op};

/// tract's own `MaxPool` builder, which parses the node's attributes for us.
pub(super) static TRACT_MAX_POOL: OnceLock<OpBuilder> = OnceLock::new();

/// Builds `MaxPool` as tract does, wrapped so that a u8 input gets [`U8MaxPool`]. A
/// pool with an `Indices` output is another tract type and stays tract's.
pub(super) fn max_pool(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    wrap_tract_op(&TRACT_MAX_POOL, context, node, |pool: HirMaxPool| {
        expand(Lowered(MaxPool { pool }))
    })
}

/// `MaxPool` as tract parses it, lowered to [`U8MaxPool`] when its input is a u8 tensor
/// of known shape.
#[derive(Debug, Clone)]
struct MaxPool {
    pool: HirMaxPool,
}

impl Lowering for MaxPool {
    const NAME: &'static str = "MaxPool";

    fn tract(&self) -> &dyn Expansion {
        &self.pool
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        Ok(Box::new(self.u8_pool(model, inputs)?))
    }
}

impl MaxPool {
    /// Builds the u8 operator, or returns what rules it out.
    fn u8_pool(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<U8MaxPool, String> {
        let spec = &self.pool.pool_spec;
        if spec.data_format != DataFormat::NCHW {
            return Err(format!("the layout is {:?}, not NCHW", spec.data_format));
        }
        let shape = u8_shape(model, inputs[0])?;
        let [_, channels, in_height, in_width] = shape[..] else {
            return Err(format!("the input has shape {shape:?}, not NCHW"));
        };
        let [kernel_height, kernel_width] = spec.kernel_shape[..] else {
            return Err(format!("the kernel {:?} is not 2-D", spec.kernel_shape));
        };
        if spec.dilations().iter().any(|&d| d != 1) {
            return Err(format!("the dilations are {:?}", spec.dilations()));
        }

        let strides = spec.strides();
        let padding = spec.computed_padding(&[in_height, in_width]);
        let geometry = PoolGeometry {
            channels,
            in_height,
            in_width,
            out_height: padding[0].convoluted,
            out_width: padding[1].convoluted,
            kernel: [kernel_height, kernel_width],
            strides: [strides[0], strides[1]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
        };
        if geometry.out_height == 0 || geometry.out_width == 0 {
            return Err("the output is empty".into());
        }
        // onnxruntime rejects such pools, and tract's kernels disagree on them.
        let kernel = [kernel_height, kernel_width];
        if (0..2).any(|axis| {
            padding[axis].pad_before >= kernel[axis] || padding[axis].pad_after >= kernel[axis]
        }) {
            return Err("the padding is as wide as the window".into());
        }
        Ok(U8MaxPool { geometry })
    }
}

/// Shape of one 2-D max pool, batch excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGeometry {
    pub channels: usize,
    pub in_height: usize,
    pub in_width: usize,
    pub out_height: usize,
    pub out_width: usize,
    /// Window height and width.
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// Padding before the first row and the first column.
    pub pad_before: [usize; 2],
}

impl PoolGeometry {
    fn input_len(&self) -> usize {
        self.channels * self.in_height * self.in_width
    }

    fn output_len(&self) -> usize {
        self.channels * self.out_height * self.out_width
    }

    /// Computes one image: `input` is CHW u8, `output` receives CHW u8.
    ///
    /// Padding and positions past the input's end read 0, the smallest u8, so they never
    /// win a maximum. A window wholly outside the input, which only ceil mode can place
    /// at the end of a row or column, yields 0.
    /// Returns whether this is the common 2x2 pool of stride 2 whose windows all lie
    /// inside the input: no padding, and no window cut off by ceil mode.
    fn is_plain_2x2(&self) -> bool {
        self.kernel == [2, 2]
            && self.strides == [2, 2]
            && self.pad_before == [0, 0]
            && self.out_height * 2 <= self.in_height
            && self.out_width * 2 <= self.in_width
    }

    /// Computes the 2x2 pool of stride 2 from two input rows at a time, without the row
    /// buffer and its clearing per output row. All three pools of the int8 digit CNN took
    /// 0.010 to 0.011 ms instead of 0.021 with the general loop (`op_profile`, AMD EPYC
    /// Zen 4).
    fn run_2x2(&self, input: &[u8], output: &mut [u8]) {
        let width = self.in_width;
        let planes = input.chunks_exact(self.in_height * width);
        let out_planes = output.chunks_exact_mut(self.out_height * self.out_width);
        for (plane, out_plane) in planes.zip(out_planes) {
            for (oy, out_row) in out_plane.chunks_exact_mut(self.out_width).enumerate() {
                let top = &plane[2 * oy * width..][..2 * self.out_width];
                let bottom = &plane[(2 * oy + 1) * width..][..2 * self.out_width];
                for ((out, top), bottom) in out_row
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    *out = top[0].max(top[1]).max(bottom[0].max(bottom[1]));
                }
            }
        }
    }

    pub fn run(&self, input: &[u8], output: &mut [u8]) {
        assert_eq!(input.len(), self.input_len(), "input length");
        assert_eq!(output.len(), self.output_len(), "output length");
        if self.is_plain_2x2() {
            self.run_2x2(input, output);
            return;
        }
        let [kernel_height, kernel_width] = self.kernel;
        let [stride_y, stride_x] = self.strides;
        let [pad_top, pad_left] = self.pad_before;
        // Columns of the padded row that some window reads.
        let span = (self.out_width - 1) * stride_x + kernel_width;
        let first = pad_left.min(span);
        let last = (pad_left + self.in_width).min(span);
        let mut row_max = vec![0u8; span];

        let planes = input.chunks_exact(self.in_height * self.in_width);
        let out_planes = output.chunks_exact_mut(self.out_height * self.out_width);
        for (plane, out_plane) in planes.zip(out_planes) {
            for (oy, out_row) in out_plane.chunks_exact_mut(self.out_width).enumerate() {
                row_max.fill(0);
                for ky in 0..kernel_height {
                    let Some(y) = (oy * stride_y + ky)
                        .checked_sub(pad_top)
                        .filter(|&y| y < self.in_height)
                    else {
                        continue;
                    };
                    let source = &plane[y * self.in_width..][..last - first];
                    for (max, &value) in row_max[first..last].iter_mut().zip(source) {
                        *max = (*max).max(value);
                    }
                }

                if stride_x == 2 && kernel_width == 2 {
                    // The common 2x2 pool. Written with pairs, all three pools of the
                    // int8 digit CNN took 0.023 ms instead of 0.034 with the fold below.
                    for (out, pair) in out_row.iter_mut().zip(row_max.chunks_exact(2)) {
                        *out = pair[0].max(pair[1]);
                    }
                } else if stride_x == kernel_width {
                    for (out, window) in out_row.iter_mut().zip(row_max.chunks_exact(kernel_width))
                    {
                        *out = window.iter().fold(0, |a, &b| a.max(b));
                    }
                } else {
                    for (ox, out) in out_row.iter_mut().enumerate() {
                        let window = &row_max[ox * stride_x..][..kernel_width];
                        *out = window.iter().fold(0, |a, &b| a.max(b));
                    }
                }
            }
        }
    }
}

/// A 2-D max pool over u8 NCHW tensors, computed row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U8MaxPool {
    geometry: PoolGeometry,
}

impl Op for U8MaxPool {
    fn name(&self) -> StaticName {
        "U8MaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.geometry)])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for U8MaxPool {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let geometry = &self.geometry;
        let out_shape = [geometry.channels, geometry.out_height, geometry.out_width];
        let output = map_images(
            "U8MaxPool",
            &input,
            geometry.input_len(),
            out_shape,
            |image, target| geometry.run(image, target),
        )?;
        Ok(tvec!(output))
    }
}

impl TypedOp for U8MaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let geometry = &self.geometry;
        let input = inputs[0];
        ensure!(input.datum_type == DatumType::U8, "U8MaxPool reads u8");
        ensure!(input.rank() == 4, "U8MaxPool reads NCHW");
        let shape: TVec<TDim> = tvec![
            input.shape[0].clone(),
            geometry.channels.into(),
            geometry.out_height.into(),
            geometry.out_width.into(),
        ];
        Ok(tvec!(TypedFact::dt_shape(DatumType::U8, shape)))
    }

    tract_onnx::tract_core::as_op!();
}
