//! Integer execution of ONNX `QLinearConv` inside tract.
//!
//! tract 0.23 loads `QLinearConv` as its generic quantized convolution: an i8 x i8
//! matrix product followed by zero-point corrections and a rescale, each a separate pass
//! over the tensor, and a depthwise convolution as one small product per channel.
//! Measured on EfficientNet-Lite0 that runs several times slower than the float model
//! (see `docs/compression.md`). [`onnx`] returns tract's ONNX loader with `QLinearConv`
//! rebuilt as [`IntegerConv`], which runs the kernels of this module with the rescale
//! fused into the store. Everything else in the graph stays tract's.
//!
//! Some `QLinearConv` nodes keep tract's implementation: those with a weight zero point
//! other than 0, non-constant weights or scales, an input shape not fixed at load, or a
//! layout other than NCHW/OIHW. The reason is logged at debug level.
//!
//! `MaxPool` on u8 tensors, as between the quantized convolutions of the int8 digit
//! CNN, is likewise rebuilt as [`U8MaxPool`], `MatMulInteger` with constant i8
//! weights as [`IntegerMatMulOp`], `QuantizeLinear` to u8 or i8 with one scale as
//! [`ScalarQuantizeLinear`], and `DequantizeLinear` from u8 or i8 with one scale as
//! [`ScalarDequantizeLinear`].

// The kernels call SIMD intrinsics behind runtime CPU feature checks, and Rust exposes
// those only as unsafe functions. Every unsafe block states the invariant it relies on.
mod dequantize;
#[allow(unsafe_code)]
mod kernels;
mod matmul;
mod pool;
mod quantize;

use std::sync::{Arc, OnceLock};

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::downcast_rs::Downcast;
use tract_onnx::tract_core::ops::cnn::KernelFormat;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::cnn::Conv as HirConv;

pub use dequantize::ScalarDequantizeLinear;
pub use kernels::{
    DEPTHWISE_MAX_TAPS, DepthwiseConv, GemmConv, Geometry, IntegerMatMul, Quantized, Requantize,
    dequantize_values, quantize_f32,
};
pub use matmul::IntegerMatMulOp;
pub use pool::{PoolGeometry, U8MaxPool};
pub use quantize::ScalarQuantizeLinear;

/// The signature tract-onnx's operator register stores.
type OpBuilder =
    fn(&ParsingContext<'_>, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own `QLinearConv` builder, which parses the node's attributes for us.
static TRACT_QLINEAR_CONV: OnceLock<OpBuilder> = OnceLock::new();

/// Returns tract's ONNX loader with `QLinearConv`, u8 `MaxPool`, `MatMulInteger`,
/// `QuantizeLinear` and `DequantizeLinear` executed by this module's kernels wherever
/// they apply.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    replace_builder(&mut onnx, "QLinearConv", &TRACT_QLINEAR_CONV, qlinear_conv);
    replace_builder(&mut onnx, "MaxPool", &pool::TRACT_MAX_POOL, pool::max_pool);
    replace_builder(
        &mut onnx,
        "MatMulInteger",
        &matmul::TRACT_MATMUL_INTEGER,
        matmul::matmul_integer,
    );
    replace_builder(
        &mut onnx,
        "QuantizeLinear",
        &quantize::TRACT_QUANTIZE_LINEAR,
        quantize::quantize_linear,
    );
    replace_builder(
        &mut onnx,
        "DequantizeLinear",
        &dequantize::TRACT_DEQUANTIZE_LINEAR,
        dequantize::dequantize_linear,
    );
    onnx
}

/// Registers `builder` for `op_type` in `onnx`, keeping tract's own builder in `tract`
/// for `builder` to call.
fn replace_builder(
    onnx: &mut tract_onnx::Onnx,
    op_type: &'static str,
    tract: &'static OnceLock<OpBuilder>,
    builder: OpBuilder,
) {
    if let Some(original) = onnx.op_register.0.get(op_type).copied() {
        tract.get_or_init(|| original);
        onnx.op_register.insert(op_type, builder);
    }
}

/// Runs tract's builder kept in `tract` on `node` and, when it parsed an expansion for
/// which `wrap` returns an operator, returns that operator instead of tract's.
fn wrap_tract_expansion(
    tract: &OnceLock<OpBuilder>,
    context: &ParsingContext<'_>,
    node: &NodeProto,
    wrap: impl FnOnce(&dyn Expansion) -> Option<Box<dyn InferenceOp>>,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let builder = tract
        .get()
        .with_context(|| format!("{} registered without tract's builder", node.op_type))?;
    let (op, extra_outputs) = builder(context, node)?;
    let wrapped = op
        .as_op()
        .downcast_ref::<Box<dyn Expansion>>()
        .and_then(|expansion| wrap(expansion.as_ref()));
    Ok((wrapped.unwrap_or(op), extra_outputs))
}

/// Wraps tract's expansion like [`wrap_tract_expansion`] when it is of the public type
/// `T`.
fn wrap_tract_op<T: Expansion + Clone>(
    tract: &OnceLock<OpBuilder>,
    context: &ParsingContext<'_>,
    node: &NodeProto,
    wrap: impl FnOnce(T) -> Box<dyn InferenceOp>,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    wrap_tract_expansion(tract, context, node, |expansion| {
        Downcast::as_any(expansion)
            .downcast_ref::<T>()
            .cloned()
            .map(wrap)
    })
}

/// An ONNX operator that this module runs with its own kernel where the node's
/// constants and shapes allow, and with tract's expansion elsewhere.
trait Lowering: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// The ONNX operator's name.
    const NAME: &'static str;

    /// Returns tract's expansion of the node, which infers the shapes and wires the
    /// nodes the kernel does not cover.
    fn tract(&self) -> &dyn Expansion;

    /// Builds this module's operator on the node's first input, or returns which
    /// parameter rules it out.
    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String>;

    fn validation(&self) -> Validation {
        self.tract().validation()
    }

    /// Infers the node's types and shapes; tract's rules unless overridden.
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        solver: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.tract().rules(solver, inputs, outputs)
    }
}

/// The expansion of a [`Lowering`] node, lowered when the typed model is built and the
/// constants are known.
#[derive(Debug, Clone)]
struct Lowered<L>(L);

impl<L: Lowering> Expansion for Lowered<L> {
    fn name(&self) -> StaticName {
        L::NAME.into()
    }

    fn validation(&self) -> Validation {
        self.0.validation()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.0.tract().nboutputs()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        solver: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.0.rules(solver, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        match self.0.lower(model, inputs) {
            Ok(op) => model.wire_node(prefix, op, &[inputs[0]]),
            Err(reason) => {
                tracing::debug!(node = prefix, op = L::NAME, %reason, "runs on tract's kernel");
                self.0.tract().wire(prefix, model, inputs)
            }
        }
    }
}

fn qlinear_conv(
    context: &ParsingContext<'_>,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    wrap_tract_op(&TRACT_QLINEAR_CONV, context, node, |conv: HirConv| {
        expand(Lowered(QLinearConv { conv }))
    })
}

/// Applies `run` to each image of the u8 NCHW `input`, writing u8 images of
/// `out_shape` (channels, height, width) into a new tensor. `name` is the operator's,
/// for the error when `input` does not contain whole images of `image_len` values.
/// `run` must write every byte of its output slice: the tensor is not zeroed first.
fn map_images(
    name: &str,
    input: &TValue,
    image_len: usize,
    out_shape: [usize; 3],
    run: impl Fn(&[u8], &mut [u8]),
) -> TractResult<TValue> {
    let batch = input.shape()[0];
    let plain = input.try_as_plain_ram()?;
    let data = plain.as_slice::<u8>()?;
    ensure!(
        data.len() == batch * image_len,
        "{name} expects {image_len} input values per image, got {} for {batch}",
        data.len()
    );
    let [channels, height, width] = out_shape;
    let output = written_tensor(&[batch, channels, height, width], |out: &mut [u8]| {
        for (image, target) in data
            .chunks_exact(image_len)
            .zip(out.chunks_exact_mut(channels * height * width))
        {
            run(image, target);
        }
    })?;
    Ok(output.into_tvalue())
}

/// Returns a new tensor of `shape` whose elements `write` sets. `write` must set every
/// element of the slice it is given: the tensor is not zeroed first. Zeroing the
/// convolutions' outputs took about 7% of EfficientNet-Lite0's int8 run (`perf`, AMD
/// EPYC). Debug builds of tract fill new tensors with a marker value (0xff, or NaN for
/// f32), so the model tests would see most elements a kernel missed.
#[allow(unsafe_code)]
fn written_tensor<T: Datum + Copy>(
    shape: &[usize],
    write: impl FnOnce(&mut [T]),
) -> TractResult<Tensor> {
    // SAFETY: `T` is a plain number type, and nothing reads the tensor before `write`
    // has set every element of it.
    let mut output = unsafe { Tensor::uninitialized::<T>(shape)? };
    {
        let mut plain_output = output.try_as_plain_ram_mut()?;
        write(plain_output.as_slice_mut::<T>()?);
    }
    Ok(output)
}

/// `QLinearConv` as tract parses it, lowered to [`IntegerConv`].
#[derive(Debug, Clone)]
struct QLinearConv {
    conv: HirConv,
}

impl Lowering for QLinearConv {
    const NAME: &'static str = "QLinearConv";

    fn tract(&self) -> &dyn Expansion {
        &self.conv
    }

    fn lower(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<Box<dyn TypedOp>, String> {
        Ok(Box::new(self.integer_conv(model, inputs)?))
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }
}

impl QLinearConv {
    /// Builds the integer operator, or returns which parameter rules it out.
    fn integer_conv(&self, model: &TypedModel, inputs: &[OutletId]) -> Result<IntegerConv, String> {
        let conv = &self.conv;
        if conv.data_format != DataFormat::NCHW || conv.kernel_fmt != KernelFormat::OIHW {
            return Err("the layout is not NCHW with OIHW weights".into());
        }
        let constant_at = |slot: Option<usize>, parameter: &str| -> Result<Arc<Tensor>, String> {
            let slot = slot.ok_or_else(|| format!("the {parameter} is missing"))?;
            constant(model, inputs[slot], parameter)
        };

        let shape = u8_shape(model, inputs[0])?;
        let [_, in_channels, in_height, in_width] = shape[..] else {
            return Err(format!("the input has shape {shape:?}, not NCHW"));
        };

        let kernel = constant_at(Some(conv.k_input.unwrap_or(1)), "weight")?;
        if kernel.datum_type() != DatumType::I8 {
            return Err(format!("the weight is {:?}, not i8", kernel.datum_type()));
        }
        let [
            out_channels,
            channels_per_group,
            kernel_height,
            kernel_width,
        ] = kernel.shape()[..]
        else {
            return Err(format!(
                "the weight has shape {:?}, not OIHW",
                kernel.shape()
            ));
        };
        let weights = values::<i8>(&kernel)?;
        let group = conv.group.unwrap_or(1);
        if channels_per_group * group != in_channels || out_channels % group != 0 {
            return Err("the weight does not match the input channels and group".into());
        }
        if values::<i32>(&*constant_at(conv.k_zero_point_input, "weight zero point")?)?
            .iter()
            .any(|&zero_point| zero_point != 0)
        {
            return Err("a weight zero point is not 0".into());
        }

        let input_zero_point =
            scalar_u8(&*constant_at(conv.x_zero_point_input, "input zero point")?)?;
        let output_zero_point =
            scalar_u8(&*constant_at(conv.y_zero_point_input, "output zero point")?)?;
        let input_scale = scalar_f32(&*constant_at(conv.x_scale_input, "input scale")?)?;
        let output_scale = scalar_f32(&*constant_at(conv.y_scale_input, "output scale")?)?;
        let weight_scales = values::<f32>(&*constant_at(conv.k_scale_input, "weight scale")?)?;
        let weight_scale = |channel: usize| match weight_scales.len() {
            1 => Ok(weight_scales[0]),
            n if n == out_channels => Ok(weight_scales[channel]),
            n => Err(format!(
                "{n} weight scales for {out_channels} output channels"
            )),
        };
        let multiplier = (0..out_channels)
            .map(|channel| {
                // A weight scale of 0 makes every output of its channel the zero point,
                // as ONNX's formula gives; tract's kernel computed other values.
                let multiplier = input_scale * weight_scale(channel)? / output_scale;
                if multiplier.is_finite() && multiplier >= 0.0 {
                    Ok(multiplier)
                } else {
                    Err(format!("the rescale of channel {channel} is {multiplier}"))
                }
            })
            .collect::<Result<Vec<f32>, String>>()?;
        let bias = match conv.bias_input {
            Some(slot) => values::<i32>(&*constant_at(Some(slot), "bias")?)?,
            None => vec![0; out_channels],
        };
        if bias.len() != out_channels {
            return Err(format!(
                "{} biases for {out_channels} output channels",
                bias.len()
            ));
        }

        let kernel_shape = [kernel_height, kernel_width];
        let strides = two(conv.strides.as_deref(), "strides")?;
        let dilations = two(conv.dilations.as_deref(), "dilations")?;
        let padding =
            conv.padding
                .compute(&[in_height, in_width], &kernel_shape, &dilations, &strides);
        let geometry = Geometry {
            in_channels,
            in_height,
            in_width,
            out_channels,
            out_height: padding[0].convoluted,
            out_width: padding[1].convoluted,
            kernel: kernel_shape,
            strides,
            dilations,
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            group,
        };
        if geometry.out_height == 0 || geometry.out_width == 0 {
            return Err("the output is empty".into());
        }
        let requantize = Requantize {
            bias,
            multiplier,
            output_zero_point,
        };
        let kernel = if group > 1 && group == in_channels && out_channels == in_channels {
            DepthwiseConv::new(geometry, &weights, requantize, input_zero_point)
                .map(ConvKernel::Depthwise)
                .ok_or(format!(
                    "the depthwise kernel exceeds {DEPTHWISE_MAX_TAPS} taps, or a bias \
                     plus the products could overflow i32"
                ))?
        } else {
            GemmConv::new(geometry, &weights, requantize, input_zero_point)
                .map(ConvKernel::Gemm)
                .ok_or("the accumulator could overflow i32")?
        };
        Ok(IntegerConv {
            kernel: Arc::new(kernel),
        })
    }
}

/// Returns the fixed shape of `outlet`, a u8 tensor.
fn u8_shape(model: &TypedModel, outlet: OutletId) -> Result<Vec<usize>, String> {
    let fact = model.outlet_fact(outlet).map_err(|e| format!("{e:#}"))?;
    if fact.datum_type != DatumType::U8 {
        return Err(format!("the input is {:?}, not u8", fact.datum_type));
    }
    let shape = fact
        .shape
        .as_concrete()
        .ok_or("the input shape is not fixed")?;
    Ok(shape.to_vec())
}

/// Returns the value of `outlet`, the node's `parameter`, when it is a constant.
fn constant(model: &TypedModel, outlet: OutletId, parameter: &str) -> Result<Arc<Tensor>, String> {
    model
        .outlet_fact(outlet)
        .map_err(|e| format!("{e:#}"))?
        .konst
        .clone()
        .ok_or_else(|| format!("the {parameter} is not a constant"))
}

fn values<T: Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, String> {
    let cast = tensor.cast_to::<T>().map_err(|e| format!("{e:#}"))?;
    let plain = cast.try_as_plain_ram().map_err(|e| format!("{e:#}"))?;
    Ok(plain
        .as_slice::<T>()
        .map_err(|e| format!("{e:#}"))?
        .to_vec())
}

fn scalar_u8(tensor: &Tensor) -> Result<u8, String> {
    if tensor.datum_type() != DatumType::U8 || tensor.len() != 1 {
        return Err(format!(
            "a zero point is {:?} of shape {:?}, not one u8",
            tensor.datum_type(),
            tensor.shape()
        ));
    }
    Ok(values::<u8>(tensor)?[0])
}

fn scalar_f32(tensor: &Tensor) -> Result<f32, String> {
    match values::<f32>(tensor)?[..] {
        [scale] if scale.is_finite() && scale > 0.0 => Ok(scale),
        ref other => Err(format!("a scale is {other:?}, not one positive number")),
    }
}

fn two(values: Option<&[usize]>, attribute: &str) -> Result<[usize; 2], String> {
    match values {
        None => Ok([1, 1]),
        Some(&[a, b]) if a > 0 && b > 0 => Ok([a, b]),
        Some(other) => Err(format!(
            "{attribute} {other:?} are not two positive numbers"
        )),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum ConvKernel {
    Gemm(GemmConv),
    Depthwise(DepthwiseConv),
}

impl ConvKernel {
    fn geometry(&self) -> &Geometry {
        match self {
            ConvKernel::Gemm(gemm) => gemm.geometry(),
            ConvKernel::Depthwise(depthwise) => depthwise.geometry(),
        }
    }

    fn run(&self, input: &[u8], output: &mut [u8]) {
        match self {
            ConvKernel::Gemm(gemm) => gemm.run(input, output),
            ConvKernel::Depthwise(depthwise) => depthwise.run(input, output),
        }
    }
}

/// A quantized 2-D convolution on u8 NCHW tensors with constant i8 weights, computed by
/// this module's kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct IntegerConv {
    kernel: Arc<ConvKernel>,
}

// Equality compares the kernels' parameters, which contain no NaN: every multiplier is
// checked finite when the operator is built.
impl Eq for IntegerConv {}

impl Op for IntegerConv {
    fn name(&self) -> StaticName {
        "IntegerConv".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let kind = match self.kernel.as_ref() {
            ConvKernel::Gemm(_) => "matrix product",
            ConvKernel::Depthwise(_) => "depthwise",
        };
        Ok(vec![format!("{kind}: {:?}", self.kernel.geometry())])
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for IntegerConv {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _context: &EvalContext<'_>, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = tract_onnx::tract_core::args_1!(inputs);
        let geometry = self.kernel.geometry();
        let out_shape = [
            geometry.out_channels,
            geometry.out_height,
            geometry.out_width,
        ];
        let output = map_images(
            "IntegerConv",
            &input,
            geometry.input_len(),
            out_shape,
            |image, target| self.kernel.run(image, target),
        )?;
        Ok(tvec!(output))
    }
}

impl TypedOp for IntegerConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let geometry = self.kernel.geometry();
        let input = inputs[0];
        ensure!(input.datum_type == DatumType::U8, "IntegerConv reads u8");
        ensure!(input.rank() == 4, "IntegerConv reads NCHW");
        let shape: TVec<TDim> = tvec![
            input.shape[0].clone(),
            geometry.out_channels.into(),
            geometry.out_height.into(),
            geometry.out_width.into(),
        ];
        Ok(tvec!(TypedFact::dt_shape(DatumType::U8, shape)))
    }

    tract_onnx::tract_core::as_op!();
}

#[cfg(test)]
mod tests;
