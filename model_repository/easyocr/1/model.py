"""`easyocr`: encoded image -> EasyOCR readtext (default arguments), batched across the requests of a batch."""
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trident_serving import metrics, ocr, triton

WEIGHTS = Path(__file__).resolve().parent / "weights"


class TritonPythonModel:
    def initialize(self, args):
        triton.init_instance(args)
        self.metrics = metrics.ModelMetrics(args, [metrics.EASYOCR_BATCH_CROPS])
        # One Reader per instance, built (and its weights MD5-checked) once; requests never construct models.
        self.reader = ocr.load_reader(WEIGHTS, triton.device(args))

    def execute(self, requests):
        return triton.serve_batch(requests, lambda r: ocr.decode_page(triton.bytes_input(r, "IMAGE")), self.read)

    def read(self, pages: list) -> list:
        pages_lines = ocr.read_batch(self.reader, pages)
        # every text line is one recognised crop (the config's warm-up requests count too)
        self.metrics.observe(metrics.EASYOCR_BATCH_CROPS, sum(len(lines) for lines in pages_lines))
        return [self.response(lines) for lines in pages_lines]

    @staticmethod
    def response(lines: list[ocr.Line]):
        boxes = np.array([line.box for line in lines], np.float32).reshape(1, len(lines), 4, 2)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("BOXES", boxes),
            triton.string_tensor("TEXTS", [line.text for line in lines], (1, len(lines))),
            pb_utils.Tensor("SCORES", np.array([[line.score for line in lines]], np.float32)),
        ])
