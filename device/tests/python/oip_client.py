"""Drives the device agent's inference API with Triton's HTTP client, as a third-party
Open Inference Protocol client would, and checks the responses against the digit-cnn
reference outputs.

Usage: oip_client.py HOST:PORT REFERENCE_DIR
Exits non-zero with the failed check when the API does not behave.
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

MODEL = "digit-cnn"
# Largest difference allowed between the API's logits and onnxruntime's.
TOLERANCE = 1e-3


def main():
    url, reference = sys.argv[1], sys.argv[2]
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(MODEL), "model not ready"
    assert not client.is_model_ready("resnet"), "an unknown model reports ready"

    metadata = client.get_model_metadata(MODEL)
    expected_input = {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert metadata["inputs"] == [expected_input], metadata

    inputs = np.fromfile(f"{reference}/inputs.f32", dtype="<f4").reshape(16, 1, 28, 28)
    logits = np.fromfile(f"{reference}/outputs.f32", dtype="<f4").reshape(16, 10)
    names = ["logits", "top1_class", "top1_label"]
    for binary in (True, False):
        tensor = httpclient.InferInput("input", list(inputs.shape), "FP32")
        tensor.set_data_from_numpy(inputs, binary_data=binary)
        # Outputs as binary tensor data, then as JSON.
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]
        result = client.infer(MODEL, [tensor], outputs=outputs)
        for name in names:
            output = result.get_output(name)
            assert ("binary_data_size" in output.get("parameters", {})) == binary, output
        np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=TOLERANCE)
        classes = result.as_numpy("top1_class")
        assert (classes == logits.argmax(axis=1)).all(), classes
        labels = [label.decode() if isinstance(label, bytes) else label
                  for label in result.as_numpy("top1_label")]
        assert labels == [str(c) for c in logits.argmax(axis=1)], labels

    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer(MODEL, [tensor], model_version="1.0.0", outputs=wanted)
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), np.ones(16), atol=1e-4)
    assert result.as_numpy("logits") is None, "an output that was not requested came back"

    bad = httpclient.InferInput("input", [1, 28, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 28, 28), dtype=np.float32))
    try:
        client.infer(MODEL, [bad])
    except InferenceServerException as error:
        assert "[-1, 1, 28, 28]" in str(error), error
    else:
        raise AssertionError("a wrongly shaped input was accepted")
    print("tritonclient checks passed")


if __name__ == "__main__":
    main()
