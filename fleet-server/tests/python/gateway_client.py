"""Calls the fleet gateway with Triton's HTTP client, once with tensors as JSON and once
with the binary tensor data extension (the client's default), and prints the logits of
both as one JSON line.

Usage: gateway_client.py HOST:PORT TOKEN INPUTS_F32 MODEL
INPUTS_F32 contains digit samples as little-endian float32, 784 per sample; the first four
are sent. Exits non-zero with the failed check when the gateway does not behave.
"""

import json
import sys

import numpy as np
import tritonclient.http as http

SAMPLES = 4


def main():
    address, token, inputs_path, model = sys.argv[1:5]
    headers = {"Authorization": "Bearer " + token}
    client = http.InferenceServerClient(url=address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model, headers=headers)
    metadata = client.get_model_metadata(model, headers=headers)
    assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28], metadata
    input_name = metadata["inputs"][0]["name"]
    output_name = metadata["outputs"][0]["name"]
    samples = np.fromfile(inputs_path, dtype="<f4").reshape(-1, 1, 28, 28)[:SAMPLES]

    answers = {}
    for binary in (False, True):
        tensor = http.InferInput(input_name, list(samples.shape), "FP32")
        tensor.set_data_from_numpy(samples, binary_data=binary)
        output = http.InferRequestedOutput(output_name, binary_data=binary)
        request_id = "binary" if binary else "json"
        result = client.infer(
            model, [tensor], outputs=[output], headers=headers, request_id=request_id
        )
        response = result.get_response()
        assert response["id"] == request_id, response
        parameters = response["outputs"][0].get("parameters", {})
        assert ("binary_data_size" in parameters) == binary, response
        answers[request_id] = result.as_numpy(output_name).tolist()
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
