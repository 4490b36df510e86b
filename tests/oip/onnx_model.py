"""An MLServer runtime for the exported ONNX files: what a plant running MLServer (or KServe's
model server) would deploy. MLServer ships no ONNX runtime of its own, so this is its documented
custom-runtime form: load the file into ONNX Runtime, decode and encode with MLServer's codecs."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self._session.run([self._output], {self._input: x})
        out = NumpyCodec.encode_output(name=self._output, payload=y)
        return InferenceResponse(model_name=self.name, outputs=[out])
