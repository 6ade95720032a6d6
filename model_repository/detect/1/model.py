"""`detect`: encoded image -> letterbox -> `yolov8` (BLS, one call per letterboxed shape) -> NMS -> boxes in
original pixels."""
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from trident_serving import cpu, metrics, triton, yolo
from trident_serving.images import decode_image


class TritonPythonModel:
    def initialize(self, args):
        triton.init_instance(args)
        triton.quiet_ultralytics()
        metadata = json.loads(triton.parameters(args)["metadata"])
        self.names = {int(k): v for k, v in metadata["names"].items()}
        self.imgsz = metadata["imgsz"][0]
        self.stride = metadata["stride"]
        self.letterbox = triton.parameters(args).get("letterbox", "")
        if self.letterbox not in yolo.LETTERBOX_MODES:
            raise ValueError(f"detect: parameter letterbox is {self.letterbox!r}, expected one of "
                             f"{', '.join(yolo.LETTERBOX_MODES)}: export again with `python -m export yolo`")
        try:  # yolov8's max_batch_size, written by `export yolo` and `export plan`: a larger call would fail
            self.bls_batch = int(triton.parameters(args)["yolov8_max_batch_size"])
        except (KeyError, ValueError):
            raise ValueError("detect: parameter yolov8_max_batch_size (yolov8's max_batch_size) is missing or not "
                             "a whole number: export again with `python -m export yolo`") from None
        self.device = torch.device(triton.device(args))
        cpu.light_torch(self.device.type)  # one torch thread on a CPU instance (trident_serving.cpu)
        self.metrics = metrics.ModelMetrics(args, [metrics.DETECT_BLS_IMAGES])

    def parse(self, request):
        image = decode_image(triton.bytes_input(request, "IMAGE"))
        conf = yolo.check_threshold(triton.scalar_input(request, "CONF_THRESHOLD", yolo.DEFAULT_CONF), "CONF_THRESHOLD")
        iou = yolo.check_threshold(triton.scalar_input(request, "IOU_THRESHOLD", yolo.DEFAULT_IOU), "IOU_THRESHOLD")
        return image.shape[:2], yolo.letterbox(image, self.imgsz, self.stride, self.letterbox), conf, iou

    def execute(self, requests):
        return triton.serve_batch(requests, self.parse, self.detect)

    def detect(self, batch: list) -> list:
        shapes, letterboxed, confs, ious = zip(*batch)
        responses = [None] * len(batch)
        for group in yolo.shape_groups(letterboxed):  # one shape in square mode; in rect mode, one per shape
            prediction = self.infer(yolo.to_model_input([letterboxed[i] for i in group], self.device))
            detections = yolo.postprocess(prediction, letterboxed[group[0]].shape[:2], [shapes[i] for i in group],
                                          [confs[i] for i in group], [ious[i] for i in group])
            for i, found in zip(group, detections):
                responses[i] = self.response(found)
        return responses

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """Run `yolov8` on the letterboxed batch through BLS, zero-copy via DLPack, in calls yolov8 accepts."""
        memory = {}
        if self.device.type == "cuda":
            memory["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index)
        outputs = []
        for chunk in images.split(self.bls_batch):
            self.metrics.observe(metrics.DETECT_BLS_IMAGES, len(chunk))
            request = pb_utils.InferenceRequest(
                model_name="yolov8", inputs=[pb_utils.Tensor.from_dlpack("images", chunk.contiguous())],
                requested_output_names=["output0"], **memory)
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"yolov8 failed: {response.error().message()}")
            output = pb_utils.get_output_tensor_by_name(response, "output0")
            outputs.append(torch.from_dlpack(output.to_dlpack()).to(self.device))
        return torch.cat(outputs)

    def response(self, found: yolo.Detections):
        labels = [self.names.get(int(c), str(int(c))) for c in found.classes]
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("BOXES", found.boxes[None]),
            pb_utils.Tensor("SCORES", found.scores[None]),
            pb_utils.Tensor("CLASSES", found.classes.astype(np.int32)[None]),
            triton.string_tensor("LABELS", labels, (1, len(labels))),
        ])
