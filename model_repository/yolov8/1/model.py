"""`yolov8` for servers without the onnxruntime backend: the same model.onnx run by onnxruntime in Python.

Only used by the `python` flavour of `python -m export yolo` (the local server has the Python backend only);
its config.pbtxt, rendered by export, has the same I/O signature as the onnxruntime and TensorRT flavours.
"""
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

from trident_serving import cpu, gpu, triton


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        # on the instance's own GPU, its arena capped by gpu_memory_mib; a GPU instance without CUDA fails to load
        providers = gpu.onnx_providers(triton.placement(args), onnxruntime.get_available_providers())
        # intra-op threads sleep between runs: spinning ones burn the cores the other stubs need (trident_serving.cpu)
        self.session = onnxruntime.InferenceSession(path, cpu.onnx_session_options(), providers=providers)

    def execute(self, requests):
        # Triton has already checked dtype and shape against config.pbtxt; batch all requests in one run.
        images = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        output = self.session.run(["output0"], {"images": np.concatenate(images)})[0]
        responses, start = [], 0
        for image in images:
            end = start + len(image)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("output0", output[start:end])]))
            start = end
        return responses
