"""YOLOv8 pre/post-processing with ultralytics' own functions, so that results match `YOLO.predict`.

Two letterbox modes (detect's `letterbox` parameter):
* rect (default): `predict()`'s default. The long side goes to 640 and the short side is padded only to the next
  multiple of the stride: a 16:9 frame becomes 384x640, 40 % fewer pixels than the square. Images of one batch
  are grouped by that shape, one network call per group (see `shape_groups`).
* square: `predict(rect=False)`. Every image is padded to 640x640, so any mix shares one call; for engines built
  with a static shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision  # noqa: F401  ultralytics' NMS takes torchvision's kernel only if it is already imported
# (YOLO.predict always has it); its fallback loops in Python over kept boxes: 56 ms against 2.7 ms per image on
# CPU (perf/LOG.md), and one GPU sync per kept box on CUDA.

from .errors import InvalidInput

# ultralytics' own predict defaults (cfg/default.yaml): conf 0.25, iou 0.7, max_det 300.
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.7
MAX_DET = 300


@dataclass
class Detections:
    """Detections of one image, in original-image pixels."""

    boxes: np.ndarray  # float32 [n, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [n]
    classes: np.ndarray  # int32 [n]


def check_threshold(value: float, name: str) -> float:
    """A threshold must be a finite number in [0, 1]."""
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"{name} must be a number between 0 and 1, got {value}")
    return float(value)


LETTERBOX_MODES = ("rect", "square")


def letterbox(image: np.ndarray, size: int = 640, stride: int = 32, mode: str = "rect") -> np.ndarray:
    """Resize and pad a BGR image as ultralytics' predictor does: to size x size (square, a fixed-shape model) or,
    for a model with dynamic height and width, minimally to multiples of `stride` (rect, `predict()`'s default)."""
    from ultralytics.data.augment import LetterBox

    return LetterBox((size, size), auto=mode == "rect", stride=stride)(image=image)


def shape_groups(images: list[np.ndarray]) -> list[list[int]]:
    """Indices of the images, grouped by shape in order of first appearance: each group is one network call."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    return list(groups.values())


def to_model_input(letterboxed: list[np.ndarray], device: torch.device, half: bool = False) -> torch.Tensor:
    """Stack BGR uint8 HWC images into the normalised RGB NCHW tensor the network takes.

    Mirrors ultralytics' `BasePredictor.preprocess`: the uint8 batch moves to the device first (4x fewer
    bytes than float), then is reordered and scaled there.
    """
    batch = torch.from_numpy(np.stack(letterboxed)).to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).contiguous().flip(1)
    return (batch.half() if half else batch.float()).div_(255)


def postprocess(prediction: torch.Tensor, input_hw: tuple[int, int], original_hw: list[tuple[int, int]],
                conf: list[float], iou: list[float], max_det: int = MAX_DET) -> list[Detections]:
    """NMS and box scaling per image (each request may carry its own thresholds)."""
    from ultralytics.utils import nms, ops

    results = []
    for i, hw in enumerate(original_hw):
        kept = nms.non_max_suppression(prediction[i:i + 1], conf[i], iou[i], max_det=max_det)[0]
        boxes = ops.scale_boxes(input_hw, kept[:, :4].clone(), hw)
        results.append(Detections(boxes=boxes.float().cpu().numpy(), scores=kept[:, 4].float().cpu().numpy(),
                                  classes=kept[:, 5].int().cpu().numpy()))
    return results
