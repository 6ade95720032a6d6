"""`yolov8` run by PyTorch, fp16 on the instance's GPU: the flavour perf/gpu/run.sh serves on a GPU machine
that has neither onnxruntime-gpu nor TensorRT (neither fits the 64 MiB a copy may carry).

Benchmark-only: run.sh copies it over `yolov8/1/model.py` of its scratch repository (the python flavour's
export). Same signature as every flavour: `images` FP32 [3, H, W] in (multiples of 32 up to 640), `output0` FP32
[84, anchors] out. The
weights are the checkpoint the repository was exported from (`export.json`), i.e. the very weights of its
`model.onnx`, which the GPU checks (perf/gpu/check.py) compare against onnxruntime fp32 on the CPU.
"""
import json
import os

import torch
import triton_python_backend_utils as pb_utils

from trident_serving import triton


class TritonPythonModel:
    def initialize(self, args):
        triton.quiet_ultralytics()
        from ultralytics import YOLO

        self.device = torch.device(triton.device(args))
        export = os.path.join(os.path.dirname(args["model_repository"]), "export.json")
        with open(export) as f:
            weights = json.load(f)["yolov8"]["weights"]
        model = YOLO(weights, task="detect").model.fuse().eval().to(self.device)
        self.half = self.device.type == "cuda"
        self.model = model.half() if self.half else model.float()
        with torch.inference_mode():  # warm-up: cuDNN picks its kernels before the first request
            self.model(torch.zeros(1, 3, 640, 640, device=self.device, dtype=self.dtype))

    @property
    def dtype(self):
        return torch.float16 if self.half else torch.float32

    def execute(self, requests):
        # `images` arrives on the GPU when `detect` sends it from there (BLS with DLPack); one forward per batch
        images = [torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, "images").to_dlpack()) for r in requests]
        with torch.inference_mode():
            batch = torch.cat([i.to(self.device, non_blocking=True) for i in images]).to(self.dtype)
            output = self.model(batch)
            output = (output[0] if isinstance(output, (list, tuple)) else output).float().contiguous()
        responses, start = [], 0
        for image in images:
            end = start + len(image)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("output0", output[start:end])]))
            start = end
        return responses
