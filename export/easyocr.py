"""`python -m export easyocr`: put EasyOCR weights (CRAFT detector + recogniser) into the Triton repository.

Weights go to `<repo>/easyocr/1/weights/` with a `manifest.json` naming the languages and the MD5 of each
file; `trident_serving.ocr.load_reader` reads it and builds a stock `easyocr.Reader` from that directory.

--weights official   EasyOCR's release zips (URLs and MD5 sums from easyocr/config.py), cached, unzipped.
--weights DIR        a directory that already holds the official .pth files (e.g. `easyocr_en_models.model_dir()`).
--weights synthetic  random weights of the real architectures, seeded, for offline machines and tests. Three
                     affine layers are rescaled on a calibration page (`_calibrate_*`): CRAFT's final 1x1 conv, the
                     recogniser's first LSTM input projection and its final Linear. The random detector then finds
                     dozens of boxes and the recogniser reads input-dependent, non-blank strings, so parity tests
                     compare real boxes and texts instead of two empty lists. Loaded by the very same Reader code.
"""
from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from easyocr.config import detection_models, recognition_models
from easyocr.craft import CRAFT
from easyocr.imgproc import normalizeMeanVariance, resize_aspect_ratio
from easyocr.model.vgg_model import Model as RecogniserModel
from easyocr.utils import CTCLabelConverter
from PIL import Image, ImageDraw, ImageFont

from .download import fetch, file_digest, verify
from .repository import add_common_arguments, set_instance_kind, stage_model, write_manifest
from .weights import WrongWeights, describe, load_tensors, state_dict_mismatch

MODEL_NAME = "easyocr"
MANIFEST = "manifest.json"
# Languages -> the generation-2 recogniser easyocr.Reader picks for them (Reader.__init__'s auto choice).
RECOGNISERS = {("ko", "en"): "korean_g2", ("en",): "english_g2"}
# Reader's network_params for 'generation2' recognisers.
GEN2_PARAMS = {"input_channel": 1, "output_channel": 256, "hidden_size": 256}
# Synthetic recogniser: logit spread and blank bias giving scores on both sides of contrast_ths (0.1) and
# strings of a few to a few dozen characters on the test images.
LOGIT_SPREAD, BLANK_BIAS = 12.0, 6.0


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    md5: str


def weight_files(lang: tuple[str, ...]) -> list[WeightFile]:
    """The detector and recogniser files a Reader for `lang` loads, with EasyOCR's own URLs and MD5 sums."""
    if lang not in RECOGNISERS:
        raise SystemExit(f"--lang {','.join(lang)} is not supported; use one of "
                         + ", ".join(",".join(k) for k in RECOGNISERS))
    craft = detection_models["craft"]
    recog = recognition_models["gen2"][RECOGNISERS[lang]]
    return [WeightFile(m["filename"], m["url"], m["md5sum"]) for m in (craft, recog)]


def write_weights(dest: Path, lang: tuple[str, ...], weights: str, seed: int = 0) -> Path:
    """Fill `dest` with the weight files for `lang` and a manifest; return `dest`."""
    files = weight_files(lang)
    if weights not in ("synthetic", "official"):
        check_directory(Path(weights), lang)
    dest.mkdir(parents=True, exist_ok=True)
    if weights == "synthetic":
        _write_synthetic(dest, lang, seed)
    elif weights == "official":
        for f in files:
            archive = fetch(f.url)
            with zipfile.ZipFile(archive) as zf:
                zf.extract(f.filename, dest)
            verify(dest / f.filename, md5=f.md5)
    else:
        for f in files:
            shutil.copyfile(Path(weights) / f.filename, dest / f.filename)
    manifest = {
        "lang": list(lang),
        "weights": "synthetic" if weights == "synthetic" else "official",
        "seed": seed if weights == "synthetic" else None,
        # official files match EasyOCR's table; synthetic ones get their own sums, checked at model load
        "md5": {f.filename: file_digest(dest / f.filename, "md5") for f in files},
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return dest


def check_directory(source: Path, lang: tuple[str, ...]) -> None:
    """WrongWeights, naming the file and what it holds, unless `source` holds EasyOCR's released detector and
    recogniser for `lang` (the Reader checks their MD5 sums again when it loads them)."""
    expected = " and ".join(f.filename for f in weight_files(lang))
    if not source.is_dir():
        what = f"it is {describe(source)}" if source.exists() else "no such file or directory"
        raise WrongWeights(f"--weights {source}: {what}; expected 'official', 'synthetic' or a directory holding "
                           f"{expected} (EasyOCR's detector and {RECOGNISERS[lang]} recogniser for --lang "
                           f"{','.join(lang)})")
    for f, network in zip(weight_files(lang), (CRAFT, lambda: recogniser(lang))):
        path = source / f.filename
        if not path.is_file():
            raise WrongWeights(f"--weights {source}: no {f.filename} there (it is {describe(source)}); --lang "
                               f"{','.join(lang)} needs {expected}")
        if file_digest(path, "md5") == f.md5:
            continue
        with torch.device("meta"):  # names and shapes, no memory
            architecture = network().state_dict()
        try:
            found = {k.removeprefix("module."): v for k, v in load_tensors(path).items()}
        except Exception:  # noqa: BLE001 - not a state dict at all
            raise WrongWeights(f"{path} is {describe(path)}, not EasyOCR's {f.filename}") from None
        mismatch = state_dict_mismatch(found, architecture)
        if mismatch:
            raise WrongWeights(f"{path} is not EasyOCR's {f.filename}: {mismatch}")
        raise WrongWeights(f"{path} has the layers of {f.filename} but not EasyOCR's released values (md5 "
                           f"{file_digest(path, 'md5')}, expected {f.md5}): the Reader loads only the released "
                           "files; use --weights official or synthetic")


def recogniser(lang: tuple[str, ...]) -> RecogniserModel:
    """The generation-2 recogniser network the Reader builds for `lang` (randomly initialised)."""
    character = recognition_models["gen2"][RECOGNISERS[lang]]["characters"]
    return RecogniserModel(num_class=len(CTCLabelConverter(character).character), **GEN2_PARAMS)


def _write_synthetic(dest: Path, lang: tuple[str, ...], seed: int) -> None:
    detector_file, recogniser_file = weight_files(lang)
    torch.manual_seed(seed)
    craft = CRAFT().eval()
    _calibrate_craft(craft)
    # "module." prefix: the layout of the official files, which get_detector/get_recognizer strip or expect
    _save(craft, dest / detector_file.filename)

    network = recogniser(lang).eval()
    _calibrate_recogniser(network)
    _save(network, dest / recogniser_file.filename)


def _save(model: torch.nn.Module, path: Path) -> None:
    torch.save(OrderedDict(("module." + k, v) for k, v in model.state_dict().items()), path)


def _calibration_image() -> np.ndarray:
    """A page of text in Pillow's bundled font: the detector's outputs are calibrated on it."""
    image = Image.new("RGB", (640, 480), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    words = "synthetic weights calibrate the detector output on a page of ordinary words 0123456789".split()
    for row in range(12):
        size = 16 + 3 * (row % 6)
        line = " ".join(words[(row * 3 + i) % len(words)] for i in range(5))
        draw.text((20, 12 + row * 38), line, font=ImageFont.load_default(size), fill=(0, 0, 0))
    return np.array(image)[:, :, ::-1].copy()  # BGR, as readtext receives arrays


def _calibrate_craft(net: CRAFT) -> None:
    """Rescale the last 1x1 conv so the random region/affinity maps cross EasyOCR's default thresholds.

    Region score: its 80th percentile on the calibration page becomes low_text (0.4) and its 99th 0.9, so
    blobs pass low_text and their peaks pass text_threshold (0.7). Affinity: the 95th percentile becomes
    link_threshold (0.4), linking some blobs into words without flooding the image.
    """
    resized, _, _ = resize_aspect_ratio(_calibration_image(), 2560, interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(np.transpose(normalizeMeanVariance(resized), (2, 0, 1)))[None]
    with torch.no_grad():
        y, _ = net(x)
    text, link = y[0, :, :, 0].numpy(), y[0, :, :, 1].numpy()
    t80, t99 = np.percentile(text, [80, 99])
    l95, l999 = np.percentile(link, [95, 99.9])
    # new = a * old + b per output channel, folded into the conv's weight and bias
    scales = [0.5 / (t99 - t80), 0.1 / (l999 - l95)]
    shifts = [0.4 - scales[0] * t80, 0.4 - scales[1] * l95]
    last = net.conv_cls[-1]
    with torch.no_grad():
        for c in range(2):
            last.weight[c] *= scales[c]
            last.bias[c] = last.bias[c] * scales[c] + shifts[c]


def _calibrate_recogniser(model: RecogniserModel) -> None:
    """Rescale the recogniser's first LSTM input projection and its final Linear so the text follows the input.

    Random VGG features are tiny and almost constant, so the random BiLSTM ignores them and one string comes out
    of every crop. Two affine refits on the calibration page's lines fix that: the first LSTM's input weights are
    rescaled and their bias shifted so the input term of its gates is centred with unit spread; the final Linear
    gives centred logits with spread LOGIT_SPREAD (a peaky softmax: some crops score above contrast_ths=0.1,
    others below, so both of get_text's passes run), and the blank gets BLANK_BIAS so CTC emits runs of blanks,
    i.e. strings of varying length rather than one character per frame.
    """
    grey = cv2.cvtColor(_calibration_image(), cv2.COLOR_BGR2GRAY)
    strips = [cv2.resize(grey[12 + row * 38:44 + row * 38, 10:330], (640, 64)) for row in range(12)]
    x = torch.from_numpy(np.array(strips, dtype=np.float32) / 127.5 - 1.0)[:, None]  # AlignCollate's scaling
    with torch.no_grad():
        # the first half of Model.forward
        features = model.AdaptiveAvgPool(model.FeatureExtraction(x).permute(0, 3, 1, 2)).squeeze(3)
        lstm = model.SequenceModeling[0].rnn
        for suffix in ("l0", "l0_reverse"):
            weight, bias = getattr(lstm, f"weight_ih_{suffix}"), getattr(lstm, f"bias_ih_{suffix}")
            _standardise(weight, bias, features.reshape(-1, features.shape[-1]), 1.0)
        context = model.SequenceModeling(features)
        _standardise(model.Prediction.weight, model.Prediction.bias, context.reshape(-1, context.shape[-1]),
                     LOGIT_SPREAD)
        model.Prediction.bias[0] += BLANK_BIAS


def _standardise(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor, spread: float) -> None:
    """Make `inputs @ weight.T + bias` centred with mean per-output standard deviation `spread`, in place."""
    mean = inputs.mean(0)
    weight.mul_(spread / ((inputs - mean) @ weight.T).std(0).mean())
    bias.copy_(-(mean @ weight.T))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lang", default="ko,en", help="comma-separated languages: 'ko,en' (korean_g2) or 'en' "
                        "(english_g2)")
    add_common_arguments(parser, "'official' (download EasyOCR's release files), 'synthetic' (random, seeded) or a "
                                 "directory holding the official .pth files")


def run(args: argparse.Namespace) -> None:
    model_dir = stage_model(args.repo, MODEL_NAME)
    config = model_dir / "config.pbtxt"
    set_instance_kind(config, args.kind)
    lang = tuple(s.strip() for s in args.lang.split(",") if s.strip())
    weights_dir = write_weights(model_dir / "1" / "weights", lang, args.weights, args.seed)
    write_manifest(args.repo, MODEL_NAME, {"weights": str(args.weights), "synthetic": args.weights == "synthetic",
                                           "lang": list(lang), "seed": args.seed, "kind": args.kind})
    print(f"easyocr ({args.kind}): {args.weights} weights for {','.join(lang)} in {weights_dir}")
