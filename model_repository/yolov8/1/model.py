"""`yolov8` for servers without the onnxruntime backend: the same model.onnx run by onnxruntime in Python.

Only used by the `python` flavour of `python -m export yolo` (the local server has the Python backend only);
its config.pbtxt, rendered by export, has the same I/O signature as the onnxruntime and TensorRT flavours.
"""
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

from trident_serving.triton import device


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        providers = ["CUDAExecutionProvider"] if device(args).startswith("cuda") else []
        self.session = onnxruntime.InferenceSession(path, providers=providers + ["CPUExecutionProvider"])

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
