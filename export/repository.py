"""Staging of committed model folders into a (possibly temporary) Triton model repository."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Callable

# The committed repository: config.pbtxt and 1/model.py of every model live here.
DEFAULT_REPO = Path(__file__).resolve().parent.parent / "model_repository"
# What an export into DEFAULT_REPO (`make demo`, `make export`) leaves beside the committed files (.gitignore): not
# staged elsewhere, where it would stand for weights that repository was never given.
EXPORTED = ("__pycache__", "weights", "*.pt", "*.pth", "*.onnx", "*.plan", "*.engine", "trt_cache")


def stage_model(repo: Path, name: str) -> Path:
    """Return `repo/name`, first copying the committed folder of `name` there when `repo` is elsewhere."""
    repo = Path(repo).resolve()
    target = repo / name
    source = DEFAULT_REPO / name
    if repo != DEFAULT_REPO and source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*EXPORTED))
    (target / "1").mkdir(parents=True, exist_ok=True)
    return target


def pbtxt_string(value: str) -> str:
    """`value` as a quoted protobuf text-format string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def set_parameter(config: Path, key: str, value: str) -> None:
    """Set `parameters { key: "<key>" value { string_value: ... } }` in a config.pbtxt, replacing it if present."""
    text = config.read_text()
    block = f'parameters {{ key: "{key}" value {{ string_value: {pbtxt_string(value)} }} }}'
    pattern = re.compile(r'parameters\s*\{\s*key:\s*"' + re.escape(key)
                         + r'"\s*value:?\s*\{\s*string_value:\s*"(?:[^"\\]|\\.)*"\s*\}\s*\}')
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n" + block + "\n"
    config.write_text(text)


def write_manifest(repo: Path, model: str, info: dict) -> None:
    """Record what was exported (weights, synthetic or not) in `repo/export.json`, for tests and the demo."""
    manifest = Path(repo) / "export.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    data[model] = info
    manifest.write_text(json.dumps(data, indent=2) + "\n")


def resolve_weights(weights: str, official: Callable[[], Path], synthetic: Callable[[], Path]) -> Path:
    """The weights a `--weights` argument names: 'official' (downloaded), 'synthetic' (random) or a local path."""
    if weights == "official":
        return official()
    if weights == "synthetic":
        return synthetic()
    path = Path(weights)
    if not path.exists():
        raise SystemExit(f"--weights {weights}: no such file or directory (use 'official', 'synthetic' or a path)")
    return path


def set_instance_kind(config: Path, kind: str) -> None:
    """Pin `instance_group` to KIND_GPU or KIND_CPU; 'auto' keeps the committed KIND_AUTO (GPU when there is one)."""
    if kind != "auto":
        config.write_text(re.sub(r"kind: KIND_\w+", f"kind: KIND_{kind.upper()}", config.read_text()))


def set_instance_count(config: Path, count: int) -> None:
    """Set the `count` of the (single) instance_group entry."""
    config.write_text(re.sub(r"(instance_group \[ \{ count: )\d+", rf"\g<1>{count}", config.read_text()))


def add_common_arguments(parser: argparse.ArgumentParser, weights_help: str,
                         kind_help: str = "instance kind (auto: GPU where the server has one, else CPU)") -> None:
    """The options every exporter takes: --weights, --seed, --kind and --repo."""
    parser.add_argument("--weights", default="official", help=weights_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument("--kind", choices=("auto", "gpu", "cpu"), default="auto", help=kind_help)
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="model repository to write into")
