"""`easyocr`: encoded image -> EasyOCR readtext (default arguments), batched across the requests of a batch."""
from pathlib import Path

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

from trident_serving import ocr, triton

WEIGHTS = Path(__file__).resolve().parent / "weights"


class TritonPythonModel:
    def initialize(self, args):
        # One Reader per instance, built (and its weights MD5-checked) once; requests never construct models.
        self.reader = ocr.load_reader(WEIGHTS, triton.device(args))
        # Warm-up: the first forward passes allocate and pick kernels; keep that out of the first request.
        image = np.full((96, 320, 3), 255, np.uint8)
        cv2.putText(image, "Trident 2026", (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 2)
        page = ocr.decode_page(cv2.imencode(".png", image)[1].tobytes())
        ocr.read_batch(self.reader, [page, page])

    def execute(self, requests):
        return triton.serve_batch(requests, lambda r: ocr.decode_page(triton.bytes_input(r, "IMAGE")),
                                  lambda pages: [self.response(lines) for lines in ocr.read_batch(self.reader, pages)])

    @staticmethod
    def response(lines: list[ocr.Line]):
        boxes = np.array([line.box for line in lines], np.float32).reshape(1, len(lines), 4, 2)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("BOXES", boxes),
            triton.string_tensor("TEXTS", [line.text for line in lines], (1, len(lines))),
            pb_utils.Tensor("SCORES", np.array([[line.score for line in lines]], np.float32)),
        ])
