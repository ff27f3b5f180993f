"""Measure onnxruntime top-1 accuracy and single-image latency of a model in models/.

Usage: python models/ort_eval.py {digit-cnn|digit-student|efficientnet-lite0} [--runs 200] [--header]

Accuracy uses the shipped data: the 10,000 MNIST test images for the digit
models and the 20 foolbox photos for efficientnet-lite0. digit-student has no
reference folder of its own and is timed on digit-cnn's first reference image. Latency is the median
wall-clock time of one ``session.run`` on the first image of the model's
reference/inputs.f32, with intra_op_num_threads=1, inter_op_num_threads=1 and
sequential execution, after 10 warm-up runs.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import onnxruntime

MODELS_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))

from build_common import ort_session  # noqa: E402
from eval_data import (imagenet_image_paths, imagenet_label_from_filename,  # noqa: E402
                       load_mnist_test, preprocess_efficientnet)

WARMUP_RUNS = 10
MNIST_BATCH = 1000


def accuracy_digit_cnn(session):
    images, labels = load_mnist_test()
    predictions = []
    for start in range(0, len(images), MNIST_BATCH):
        logits = session.run(["logits"], {"input": images[start:start + MNIST_BATCH]})[0]
        predictions.append(logits.argmax(axis=1))
    correct = int((np.concatenate(predictions) == labels).sum())
    return correct, len(labels)


def accuracy_efficientnet(session):
    paths = imagenet_image_paths()
    correct = 0
    for path in paths:
        logits = session.run(["logits"], {"input": preprocess_efficientnet(path)})[0]
        correct += int(logits.argmax()) == imagenet_label_from_filename(path)
    return correct, len(paths)


ACCURACY_FUNCTIONS = {
    "digit-cnn": accuracy_digit_cnn,
    "digit-student": accuracy_digit_cnn,
    "efficientnet-lite0": accuracy_efficientnet,
}

# Models timed on another model's reference inputs, which have the same shape.
REFERENCE_OF = {"digit-student": "digit-cnn"}


def first_reference_image(model_dir):
    manifest = json.loads((model_dir / "reference" / "reference.json").read_text())
    shape = manifest["input_shape"]
    data = np.fromfile(model_dir / "reference" / manifest["input"], dtype="<f4")
    return data.reshape(shape)[:1]


def median_latency_ms(session, image, runs):
    for _ in range(WARMUP_RUNS):
        session.run(["logits"], {"input": image})
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(["logits"], {"input": image})
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(ACCURACY_FUNCTIONS))
    parser.add_argument("--runs", type=int, default=200,
                        help="number of timed single-image runs (default: 200)")
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    model_dir = MODELS_DIR / args.model
    model_path = model_dir / f"{args.model}.onnx"
    if not model_path.exists():
        sys.exit(f"error: {model_path} not found; run python models/{args.model}/build.py")
    session = ort_session(model_path, threads=1)

    correct, total = ACCURACY_FUNCTIONS[args.model](session)
    reference_dir = MODELS_DIR / REFERENCE_OF.get(args.model, args.model)
    latency = median_latency_ms(session, first_reference_image(reference_dir), args.runs)

    if args.header:
        print("| model | accuracy | correct/total | ort_median_ms | ort_version |")
        print("|---|---|---|---|---|")
    print(f"| {args.model} | {100.0 * correct / total:.2f}% | {correct}/{total} "
          f"| {latency:.3f} | {onnxruntime.__version__} |")


if __name__ == "__main__":
    main()
