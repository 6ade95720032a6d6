"""`yolov8` for servers without the onnxruntime backend: the same model.onnx run by onnxruntime in Python.

Only used by the `python` flavour of `python -m export yolo` (the local server has the Python backend only);
its config.pbtxt, rendered by export, has the same I/O signature as the onnxruntime and TensorRT flavours.
"""
import ast
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

from trident_serving import cpu, gpu, triton
from trident_serving.errors import InvalidInput


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        # on the instance's own GPU, its arena capped by gpu_memory_mib; a GPU instance without CUDA fails to load
        providers = gpu.onnx_providers(triton.placement(args), onnxruntime.get_available_providers())
        # intra-op threads sleep between runs: spinning ones burn the cores the other stubs need (trident_serving.cpu)
        self.session = onnxruntime.InferenceSession(path, cpu.onnx_session_options(), providers=providers)
        metadata = ast.literal_eval(triton.parameters(args)["metadata"])  # written by `python -m export yolo`
        self.size, self.stride = metadata["imgsz"][0], metadata["stride"]

    def parse(self, request) -> np.ndarray:
        """The request's images. Triton has checked dtype, rank and channels against config.pbtxt; with dynamic
        height and width, check them as the TensorRT flavour's profile would (export.yolo.profile_shapes)."""
        images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
        height, width = images.shape[2:]
        if not all(0 < side <= self.size and side % self.stride == 0 for side in (height, width)):
            raise InvalidInput(f"images: height and width must be multiples of {self.stride} up to {self.size} "
                               f"(letterboxed as detect does), got {height}x{width}")
        return images

    def execute(self, requests):
        # Triton's dynamic batcher puts only requests of one shape in an execution: run them as one batch.
        return triton.serve_batch(requests, self.parse, self.run)

    def run(self, batch: list) -> list:
        output = self.session.run(["output0"], {"images": np.concatenate(batch)})[0]
        responses, start = [], 0
        for images in batch:
            end = start + len(images)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("output0", output[start:end])]))
            start = end
        return responses
