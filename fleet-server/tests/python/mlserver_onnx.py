"""An MLServer inference runtime that serves an ONNX model with onnxruntime.

MLServer ships no ONNX runtime of its own, so the gateway tests load this one to stand
up a real, independent Open Inference Protocol backend for the same model the fleet's
replicas run. The model file comes from the model settings' `parameters.uri`.
"""

import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {tensor.name for tensor in self._session.get_inputs()}
        self._output_names = [tensor.name for tensor in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for tensor in payload.inputs:
            if tensor.name not in self._input_names:
                raise MLServerError(
                    f"input {tensor.name!r} is not an input of the model; "
                    f"it has {sorted(self._input_names)}",
                    status_code=400,
                )
            feeds[tensor.name] = NumpyCodec.decode_input(tensor).astype(np.float32)
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._output_names, results)
            ],
        )
