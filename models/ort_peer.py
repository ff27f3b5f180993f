"""The onnxruntime side of the compressor benchmark (compress/benches/compress.rs).

Usage: python models/ort_peer.py REQUEST.json

The request names a float model, calibration and evaluation inputs written as raw
little-endian float32 files ([N, C, H, W]), optional int64 labels, and further ONNX
files to time. This script

1. quantizes the float model with onnxruntime's own ``quantize_static`` (QDQ format,
   int8 weights per channel, uint8 activations, min-max calibration) on the same
   calibration inputs the Rust quantizer used, writing it to the path the request gives;
2. runs every model in onnxruntime on the evaluation inputs: top-1 accuracy when labels
   are given, top-1 agreement with the float model, and the median single-sample
   latency with one intra-op and one inter-op thread after 10 warm-up runs.

It prints one JSON object on standard output.
"""

import json
import statistics
import sys
import time

import numpy as np
import onnxruntime
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

WARMUP_RUNS = 10


def load_inputs(path, shape):
    data = np.fromfile(path, dtype="<f4")
    per_sample = int(np.prod(shape[1:]))
    if data.size % per_sample != 0:
        raise ValueError(f"{path}: {data.size} floats are not a whole number of {shape[1:]} samples")
    return data.reshape((-1, *shape[1:]))


class Reader(CalibrationDataReader):
    def __init__(self, name, inputs):
        self.samples = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

    def get_next(self):
        return next(self.samples, None)


def session(path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_all(sess, inputs):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])


def latency_ms(sess, sample, runs):
    name = sess.get_inputs()[0].name
    for _ in range(WARMUP_RUNS):
        sess.run(None, {name: sample})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: sample})
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    with open(sys.argv[1]) as handle:
        request = json.load(handle)
    shape = request["input_shape"]
    calibration = load_inputs(request["calibration"], shape)
    evaluation = load_inputs(request["evaluation"], shape)
    labels = np.fromfile(request["labels"], dtype="<i8") if request.get("labels") else None

    prepared = request["ort_int8"] + ".prepared.onnx"
    quant_pre_process(request["float"], prepared, skip_symbolic_shape=True)
    input_name = session(prepared).get_inputs()[0].name
    quantize_static(prepared, request["ort_int8"], Reader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)

    models = {"fp32": request["float"], "ort-int8": request["ort_int8"]}
    models.update(request.get("others", {}))
    float_top1 = None
    results = {}
    for variant, path in models.items():
        sess = session(path)
        top1 = run_all(sess, evaluation).argmax(axis=1)
        if float_top1 is None:
            float_top1 = top1
        results[variant] = {
            "path": path,
            "accuracy": None if labels is None else float((top1 == labels).mean()),
            "agreement": float((top1 == float_top1).mean()),
            "latency_ms_p50": latency_ms(sess, evaluation[:1], request["latency_runs"]),
        }
    json.dump({"onnxruntime": onnxruntime.__version__, "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
