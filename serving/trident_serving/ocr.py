"""EasyOCR with cross-image batching whose output equals `easyocr.Reader.readtext(image)` (default arguments).

readtext runs CRAFT on one image and then, with its default batch_size=1, the recogniser on one text crop at a
time. `read_batch` keeps every computation and only changes what is stacked into one forward pass:

* Detection. `resize_aspect_ratio` scales an image by min(1, canvas_size / longest side) (mag_ratio 1) and
  pastes it on a zero canvas rounded up to multiples of 32. Images whose canvases have the same shape are run
  through CRAFT together; each keeps its own ratio for mapping boxes back. The canvas is exactly what readtext
  feeds CRAFT alone, and CRAFT (convolutions, eval-mode batch norm, bilinear upsampling) treats batch items
  independently, so nothing is padded and the maps are the ones readtext sees. (Like readtext, the array is
  fed to CRAFT in the channel order given; `decode_page` gives RGB, as readtext(path) does.)
* Recognition. Each crop is resized to height 64 and, alone in readtext, right-padded (replicating its last
  column) to imgW = 64 * ceil(max(1, aspect ratio)). That width matters: the BiLSTM reads the padding and CTC
  decodes every frame, so the same crop padded wider can read differently. Crops of ALL images are therefore
  grouped by their own imgW, and each group goes through easyocr's `get_text` with a large batch_size: every
  crop in a group is padded to the width it would get alone. get_text also runs the low-confidence
  (score < contrast_ths) second pass with adjust_contrast on the same imgW, per crop, so it matches too.
* Quantisation. On CPU, Reader (quantize=True by default) converts the recogniser's LSTM/Linear layers to
  dynamic int8, whose activation scale is computed per call over the whole input tensor -- across the batch.
  Any batching then shifts every crop's result (measured: a crop batched with one other changed its argmax in
  4 of 63 frames; in float the logits moved by <5e-4 and no argmax changed). `load_reader` therefore builds
  the Reader with quantize=False (EasyOCR never quantises on GPU anyway), and parity is against readtext of
  that same Reader.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import easyocr
import easyocr.easyocr as easyocr_module
import numpy as np
import torch
from easyocr.craft_utils import adjustResultCoordinates, getDetBoxes
from easyocr.imgproc import normalizeMeanVariance, resize_aspect_ratio
from easyocr.recognition import get_text
from easyocr.utils import diff, get_image_list, group_text_box

from .images import decode_image

MANIFEST = "manifest.json"

# readtext's own defaults, read from the installed easyocr so both paths use the same values.
DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(easyocr.Reader.readtext).parameters.items()
    if p.default is not inspect.Parameter.empty
}


@dataclass(frozen=True)
class Line:
    """One recognised text line: box corners (4x2, original pixels, clockwise from top-left), text, confidence."""

    box: np.ndarray
    text: str
    score: float


@dataclass(frozen=True)
class BatchOptions:
    """How much to stack into one forward pass (pixels of input); results do not depend on these."""

    detect_pixels: int = 8_000_000  # CRAFT canvases per forward: eight 1280x736 pages, one 2560x2560 scan
    recognise_pixels: int = 2_097_152  # recogniser crops per forward: 128 crops of 64x256


def load_reader(weights_dir: Path | str, device: str = "cpu") -> easyocr.Reader:
    """Build a stock easyocr.Reader from an exported weights directory (see export/easyocr.py).

    The Reader checks the MD5 of both files itself while loading. For synthetic weights their sums from the
    manifest stand in for EasyOCR's table during construction; the loading code is otherwise untouched.
    """
    weights_dir = Path(weights_dir)
    manifest = json.loads((weights_dir / MANIFEST).read_text())
    with _expected_md5(manifest["md5"] if manifest["weights"] == "synthetic" else {}):
        reader = easyocr.Reader(
            manifest["lang"],
            gpu=device,
            model_storage_directory=str(weights_dir),
            user_network_directory=str(weights_dir),  # only put on sys.path; keeps ~/.EasyOCR untouched
            download_enabled=False,
            verbose=False,
            quantize=False,  # see the module docstring: int8 dynamic quantisation is batch-dependent
        )
    if reader.device != "cpu":
        # Reader wraps both networks in DataParallel over *all* visible GPUs, which runs on cuda:0 whatever the
        # instance's device; one network per instance on its own device is what Triton's instance_group means.
        reader.detector = reader.detector.module.to(reader.device)
        reader.recognizer = reader.recognizer.module.to(reader.device)
    return reader


@contextlib.contextmanager
def _expected_md5(sums: dict[str, str]) -> Iterator[None]:
    """Temporarily register `sums` (filename -> md5) in the tables easyocr.Reader checks files against."""
    saved = easyocr_module.detection_models, easyocr_module.recognition_models
    detection, recognition = copy.deepcopy(saved)
    for table in [detection, *recognition.values()]:
        for entry in table.values():
            if entry["filename"] in sums:
                entry["md5sum"] = sums[entry["filename"]]
    easyocr_module.detection_models, easyocr_module.recognition_models = detection, recognition
    try:
        yield
    finally:
        easyocr_module.detection_models, easyocr_module.recognition_models = saved


def decode_page(data: bytes, name: str = "IMAGE") -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, grey image) of an encoded file, exactly as readtext(path) loads that file.

    readtext(path) feeds CRAFT the RGB image of easyocr's `loadImage` (alpha dropped, grey expanded) and the
    recogniser `cv2.imread(path, IMREAD_GRAYSCALE)`, which for a JPEG is its luma plane, not a conversion of
    the colour pixels. Both are reproduced from the bytes; decode_image validates them first.
    """
    rgb = cv2.cvtColor(decode_image(data, name), cv2.COLOR_BGR2RGB)
    return rgb, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def read_batch(reader: easyocr.Reader, pages: Sequence[tuple[np.ndarray, np.ndarray]],
               options: BatchOptions = BatchOptions()) -> list[list[Line]]:
    """readtext for each (image, grey) page (see `decode_page`), batched across pages; a list of Lines per page."""
    regions = detect_batch(reader, [image for image, _ in pages], options.detect_pixels)
    return recognise_batch(reader, [grey for _, grey in pages], regions, options.recognise_pixels)


def detect_batch(reader: easyocr.Reader, images: Sequence[np.ndarray],
                 max_pixels: int) -> list[tuple[list, list]]:
    """Reader.detect for each image: (horizontal_list, free_list), with images of equal canvas shape batched."""
    canvases = [
        resize_aspect_ratio(image, DEFAULTS["canvas_size"], interpolation=cv2.INTER_LINEAR,
                            mag_ratio=DEFAULTS["mag_ratio"])
        for image in images
    ]
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (canvas, _, _) in enumerate(canvases):
        by_shape[canvas.shape].append(i)

    regions: list[tuple[list, list]] = [([], [])] * len(images)
    for (height, width, _), indices in by_shape.items():
        batch = max(1, max_pixels // (height * width))
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            x = torch.from_numpy(np.array([np.transpose(normalizeMeanVariance(canvases[i][0]), (2, 0, 1))
                                           for i in chunk])).to(reader.device)
            with torch.no_grad():
                maps, _ = reader.detector(x)
            for i, out in zip(chunk, maps.cpu().numpy()):
                regions[i] = _regions(out, 1 / canvases[i][1])
    return regions


def _regions(out: np.ndarray, ratio: float) -> tuple[list, list]:
    """Post-processing of one CRAFT output, as easyocr.detection.test_net/get_textbox and Reader.detect do it."""
    boxes, _, _ = getDetBoxes(out[:, :, 0], out[:, :, 1], DEFAULTS["text_threshold"], DEFAULTS["link_threshold"],
                              DEFAULTS["low_text"], poly=False)
    # with poly=False test_net's polys are these boxes
    polys = [np.array(box).astype(np.int32).reshape(-1) for box in adjustResultCoordinates(boxes, ratio, ratio)]
    horizontal, free = group_text_box(polys, DEFAULTS["slope_ths"], DEFAULTS["ycenter_ths"],
                                      DEFAULTS["height_ths"], DEFAULTS["width_ths"], DEFAULTS["add_margin"], True)
    min_size = DEFAULTS["min_size"]
    horizontal = [b for b in horizontal if max(b[1] - b[0], b[3] - b[2]) > min_size]
    free = [b for b in free if max(diff([c[0] for c in b]), diff([c[1] for c in b])) > min_size]
    return horizontal, free


@dataclass
class _Crop:
    image: int  # index of the image in the batch
    box: list  # 4 corners as get_image_list returns them
    pixels: np.ndarray  # grey crop resized to height imgH
    width: int  # padded width readtext would use for this crop alone


def recognise_batch(reader: easyocr.Reader, greys: Sequence[np.ndarray], regions: Sequence[tuple[list, list]],
                    max_pixels: int) -> list[list[Line]]:
    """Reader.recognize(grey, horizontal_list, free_list) for each image, with crops of all images batched."""
    img_h = easyocr_module.imgH
    crops: list[_Crop] = []
    for i, (grey, (horizontal, free)) in enumerate(zip(greys, regions)):
        # readtext (batch_size=1) crops each box on its own: horizontal boxes first, then free ones
        for h_list, f_list in [([b], []) for b in horizontal] + [([], [b]) for b in free]:
            image_list, max_width = get_image_list(h_list, f_list, grey, model_height=img_h)
            crops.extend(_Crop(i, box, pixels, int(max_width)) for box, pixels in image_list)

    by_width: dict[int, list[int]] = defaultdict(list)
    for k, crop in enumerate(crops):
        by_width[crop.width].append(k)
    ignore_char = "".join(set(reader.character) - set(reader.lang_char))  # readtext without allow/blocklist
    texts: list[tuple[str, float]] = [("", 0.0)] * len(crops)
    for width, members in by_width.items():
        batch = max(1, max_pixels // (img_h * width))
        results = get_text(reader.character, img_h, width, reader.recognizer, reader.converter,
                           [(crops[k].box, crops[k].pixels) for k in members], ignore_char, DEFAULTS["decoder"],
                           DEFAULTS["beamWidth"], batch, DEFAULTS["contrast_ths"], DEFAULTS["adjust_contrast"],
                           DEFAULTS["filter_ths"], DEFAULTS["workers"], reader.device)
        for k, (_, text, score) in zip(members, results):
            texts[k] = (text, float(score))

    lines: list[list[Line]] = [[] for _ in greys]
    for crop, (text, score) in zip(crops, texts):
        lines[crop.image].append(Line(np.array(crop.box, dtype=np.float32), text, score))
    return lines
