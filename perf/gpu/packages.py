"""Every package the GPU device run imports, where it comes from there, and the check that runs first there.

PACKAGES is the one list: `bundle.sh` reads it (`pins`) for what to download, pin and pack into `.carry/`, and
the first stage on the device (`check`) imports each row in the interpreter that needs it, prints a table and
exits 3 with the list of what is missing. `tests/test_gpu_script.py` checks the list against the imports of
the code the stages run (`third_party_imports`) and against the declared requirements of every carried package.

Two interpreters run there (perf/gpu/run.sh makes both venvs over the machine's Python 3.12):
* serve:  Triton's Python stubs and every process that starts a server or talks to one (check, perf, memory).
          numpy 1.26.4 first on its path: the 2.51 stub corrupts BYTES inputs under numpy 2
          (shared/notes/triton-facts.md); the machine's own packages must therefore import under numpy 1.26.
* export: `python -m export` only, with the machine's numpy 2: ultralytics' ONNX export imports onnx, whose
          ml_dtypes may need numpy 2.

    python perf/gpu/packages.py pins           # 'name==version form' of each carried row (for bundle.sh)
    python perf/gpu/packages.py check --env serve [--carried DIR] [--perf-analyzer PATH] [--out FILE]
    python perf/gpu/packages.py imports        # third-party top-level imports of the stage code, by file
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CARRY, MACHINE, REPO = "carry", "machine", "repo"
SERVE, EXPORT = "serve", "export"


@dataclass(frozen=True)
class Package:
    module: str  # what is imported
    distribution: str  # its name on PyPI
    # CARRY: packed by bundle.sh; MACHINE: expected on the GPU machine (KINDS.md), checked only; REPO: a module
    # of this repository, imported so that the third-party submodules it imports are tried too
    source: str
    needed_by: str
    envs: tuple[str, ...] = (SERVE, EXPORT)
    probe: str = ""  # Python run after the import (names: the module's top level, `cuda`); must not raise
    form: str = "wheel"  # how bundle.sh packs a carried row: a cp312 wheel, a wheel built from the sdist, the server


PACKAGES: tuple[Package, ...] = (
    # carried: not on the machine, or there in a version that cannot serve
    Package("numpy", "numpy", CARRY, "everything; 1.x for the 2.51 stub (the machine has 2.x)", (SERVE,),
            "assert numpy.__version__.startswith('1.'), numpy.__version__"),
    Package("pytriton", "nvidia-pytriton", CARRY, "the Triton 2.51 server (trident_serving.server), its binary part",
            (SERVE,), form="server"),
    Package("tritonclient.grpc", "tritonclient", CARRY, "check, perf, perf.memory (perf_analyzer: call 2)", (SERVE,)),
    Package("rapidjson", "python-rapidjson", CARRY, "tritonclient", (SERVE,)),
    Package("av", "av", CARRY, "trident_serving.audio (whisper's model.py, check, baselines)"),
    Package("ultralytics", "ultralytics", CARRY, "export yolo, detect/yolov8 model.py, check, baselines",
            probe="ultralytics.YOLO"),  # a lazy attribute: imports ultralytics.models and the model code
    Package("thop", "ultralytics-thop", CARRY, "ultralytics (FLOPs in model.info(); optional there)"),
    Package("whisper", "openai-whisper", CARRY, "export whisper, whisper's model.py, check, baselines", form="sdist"),
    Package("more_itertools", "more-itertools", CARRY, "whisper"),
    Package("easyocr", "easyocr", CARRY, "export easyocr, easyocr's model.py, check, baselines"),
    Package("bidi", "python-bidi", CARRY, "easyocr"),
    Package("pyclipper", "pyclipper", CARRY, "easyocr (DBNet, imported at easyocr's top)"),
    Package("shapely", "shapely", CARRY, "easyocr"),
    # on the machine (KINDS.md "Python packages already there"): checked, never carried
    Package("torch", "torch", MACHINE, "everything", probe="assert not cuda or torch.cuda.is_available()"),
    Package("torchvision", "torchvision", MACHINE, "trident_serving.yolo (NMS kernel), ultralytics, easyocr",
            probe="torchvision.ops.nms(torch.zeros(1, 4, device=device), torch.ones(1, device=device), 0.5)"),
    Package("cv2", "opencv-python-headless", MACHINE, "trident_serving.images, ultralytics, easyocr"),
    Package("PIL.ImageFont", "pillow", MACHINE, "export easyocr (calibration page), perf.inputs, easyocr",
            probe="PIL.ImageFont.load_default(16)"),  # a sized default font needs Pillow >= 10.1 with FreeType
    Package("yaml", "pyyaml", MACHINE, "export yolo, ultralytics, easyocr"),
    Package("scipy.ndimage", "scipy", MACHINE, "easyocr"),
    Package("skimage", "scikit-image", MACHINE, "easyocr"),
    Package("tiktoken", "tiktoken", MACHINE, "whisper's tokenizer"),
    Package("numba", "numba", MACHINE, "whisper (imported at its top)"),
    Package("triton", "triton", MACHINE, "whisper (word timestamps only; declared for x86_64 Linux)"),
    Package("tqdm", "tqdm", MACHINE, "perf.suite, whisper, ultralytics"),
    Package("matplotlib", "matplotlib", MACHINE, "perf.report (plots), ultralytics"),
    Package("requests", "requests", MACHINE, "ultralytics"),
    Package("psutil", "psutil", MACHINE, "ultralytics"),
    Package("pynvml", "nvidia-ml-py", MACHINE, "perf.memory, ultralytics"),
    Package("onnx", "onnx", MACHINE, "export yolo (ultralytics' ONNX export)", (EXPORT,)),
    Package("onnxruntime", "onnxruntime", MACHINE, "check (yolov8 fp32 reference), perf baselines", (SERVE,)),
    Package("grpc", "grpcio", MACHINE, "tritonclient.grpc", (SERVE,)),
    # tritonclient[grpc] declares protobuf<5, but its gencode runs on protobuf 6.33 and 7.36 (checked with numpy
    # 1.26), and carrying 4.x would break the machine's onnx (gencode of protobuf >= 5)
    Package("google.protobuf", "protobuf", MACHINE, "tritonclient.grpc", (SERVE,)),
    Package("urllib3", "urllib3", MACHINE, "tritonclient", (SERVE,)),
    Package("packaging", "packaging", MACHINE, "tritonclient.grpc", (SERVE,)),
    # ours, in the interpreter that runs them
    *(Package(m, "-", REPO, "the stubs, check, perf", (SERVE,)) for m in (
        "trident_serving.audio", "trident_serving.images", "trident_serving.yolo", "trident_serving.ocr",
        "trident_serving.asr_service", "perf.inputs", "perf.suite", "perf.baselines", "perf.report", "perf.memory")),
    *(Package(m, "-", REPO, "the export stage", (EXPORT,))
      for m in ("export.yolo", "export.whisper", "export.easyocr")),
)

# Imported somewhere in the code the stages run, or declared by a carried package, but never imported on the
# device run's paths: not carried, not checked.
NOT_NEEDED: dict[str, str] = {
    "easyocr_en_models": "python -m perf's cpu mode only (real offline weights)",
    "polars": "ultralytics: DataFrame exports and training plots only (imported inside those functions)",
    "ultralytics-platform": "ultralytics: its Platform API only (imported on first attribute access)",
    "opencv-python": "ultralytics: the machine's opencv-python-headless provides cv2",
    "ninja": "easyocr: declared for building its optional CUDA kernels; never imported",
    "ctranslate2": "whisper's ctranslate2 engine only (imported inside its functions): the device run serves the "
                   "openai engine; the cp312 wheel (41 MiB) does not fit beside the base carry in one call",
}
# Extras of carried distributions that the stages use (their requirements count as declared)
EXTRAS = {"tritonclient": ("grpc",)}

LOCAL = {"export": ROOT / "export", "perf": ROOT / "perf", "trident_serving": ROOT / "serving" / "trident_serving",
         "trident": ROOT / "client" / "trident"}
# Provided by the Python backend inside the stub process, not by any package
BACKEND_MODULES = {"triton_python_backend_utils", "c_python_backend_utils"}
# The code the stages run (perf/gpu/run.sh); local imports are followed from here. export/__main__ imports its
# subcommands by name (importlib), so they are listed.
STAGE_CODE = ("export/__main__.py", "export/yolo.py", "export/whisper.py", "export/easyocr.py", "export/plan.py",
              "perf/__main__.py", "perf/memory.py", "perf/inputs.py", "perf/gpu/check.py", "perf/gpu/sweep.py",
              "perf/gpu/yolov8_torch.py", "serving/trident_serving/server.py",
              "serving/trident_serving/supervisor.py", "model_repository/detect/1/model.py",
              "model_repository/yolov8/1/model.py", "model_repository/whisper/1/model.py",
              "model_repository/easyocr/1/model.py")


def top_level(module: str) -> str:
    return module.split(".")[0]


def _local_file(module: str) -> Path | None:
    """The source file of a module of this repository (export, perf, trident_serving, trident), if any."""
    parts = module.split(".")
    if parts[0] not in LOCAL:
        return None
    base = LOCAL[parts[0]].joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_of(path: Path) -> str:
    """Dotted name of a local source file (model.py files, outside any package, get their path)."""
    for name, folder in LOCAL.items():
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = [name, *rel]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return str(path.relative_to(ROOT))


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth of its code (lazy imports too)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


def third_party_imports(entries: tuple[str, ...] = STAGE_CODE) -> dict[str, set[str]]:
    """Top-level names of the third-party modules imported by the stage code: name -> files importing it.

    Follows this repository's own imports from `entries` (paths relative to the root); skips the standard
    library and the Python backend's modules."""
    seen: set[Path] = set()
    todo = [ROOT / entry for entry in entries]
    found: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            local = _local_file(name)
            if local is not None:
                todo.append(local)
            elif top_level(name) in LOCAL:
                continue  # `from pkg import function`: the package itself is followed
            elif top_level(name) not in sys.stdlib_module_names | BACKEND_MODULES:
                found.setdefault(top_level(name), set()).add(str(path.relative_to(ROOT)))
    return found


def pins() -> list[str]:
    """'name==version form' of each carried distribution, as installed in this interpreter (the tested versions)."""
    return [f"{p.distribution}=={metadata.version(p.distribution)} {p.form}" for p in PACKAGES if p.source == CARRY]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def check(env: str, carried: Path | None, perf_analyzer: Path | None,
          rows: tuple[Package, ...] = PACKAGES) -> tuple[list[list[str]], list[str]]:
    """Import each of `rows` that `env` needs; returns the table and the problems (empty: all good)."""
    sys.path.insert(0, str(ROOT))  # perf, export (serving and client come with the venv)
    table, problems = [], []
    cuda = False
    for package in rows:
        if env not in package.envs:
            continue
        started = time.monotonic()
        status, where = "ok", ""
        version = _version(package.distribution) if package.source != REPO else ""
        try:
            module = importlib.import_module(package.module)
            where = str(Path(module.__file__ or "").parent)
            if package.module == "torch":
                cuda = module.cuda.is_available() and os.environ.get("CPU_FALLBACK") != "1"
            if package.probe:
                scope = {top_level(package.module): sys.modules[top_level(package.module)], "cuda": cuda}
                if "torch" in sys.modules:
                    scope.update(torch=sys.modules["torch"], device="cuda" if cuda else "cpu")
                exec(package.probe, scope)  # noqa: S102 - fixed statements from the table above
            if package.source == CARRY and carried is not None and not where.startswith(str(carried)):
                status = f"FAIL: imported from {where}, not from the carried {carried}"
        except Exception as exc:  # noqa: BLE001 - any failure is what this table reports
            status = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
        if status != "ok":
            problems.append(f"{package.module} ({package.distribution}, {package.source}; needed by "
                            f"{package.needed_by}): {status}")
        table.append([package.module, package.distribution, package.source, version,
                      f"{time.monotonic() - started:.1f}", status if status != "ok" else where])
    if perf_analyzer is not None:
        status = _check_binary(perf_analyzer)
        table.append(["perf_analyzer", "tritonclient", CARRY, "", "", status or str(perf_analyzer)])
        if status:
            problems.append(f"perf_analyzer: {status}")
    return table, problems


def _check_binary(path: Path) -> str:
    """'' when perf_analyzer's shared libraries all resolve (ldd) with the library path perf gives it."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"FAIL: {path} is missing or not executable"
    from perf import analyzer  # its environment adds the libcudart.so.12 link it makes

    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=analyzer.environment())
    missing = [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
    return f"FAIL: libraries not found: {', '.join(missing)}" if missing else ""


def render(rows: list[list[str]]) -> str:
    header = ["import", "distribution", "source", "version", "s", "from / status"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pins")
    commands.add_parser("imports")
    run = commands.add_parser("check")
    run.add_argument("--env", choices=(SERVE, EXPORT), required=True)
    run.add_argument("--carried", type=Path, default=None, help="carried packages must be imported from here")
    run.add_argument("--perf-analyzer", type=Path, default=None, help="check that this binary's libraries resolve")
    run.add_argument("--out", type=Path, default=None, help="also write the table here")
    run.add_argument("--no-imports", action="store_true", help="check --perf-analyzer only")
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join(pins()))
        return 0
    if args.command == "imports":
        for name, files in sorted(third_party_imports().items()):
            print(f"{name:24s} {', '.join(sorted(files))}")
        return 0
    rows, problems = check(args.env, args.carried, args.perf_analyzer, rows=() if args.no_imports else PACKAGES)
    text = f"{args.env} interpreter {sys.executable} (Python {sys.version.split()[0]})\n{render(rows)}\n"
    if problems:
        text += (f"MISSING or BROKEN in the {args.env} interpreter ({len(problems)}):\n"
                 + "".join(f"  - {p}\n" for p in problems)
                 + "Carried ones: rebuild with `make gpu-bundle`. Machine ones: add a row with source carry in "
                   "perf/gpu/packages.py (a cp312 wheel for this machine's torch), rebuild, rerun call 1.\n")
    else:
        text += f"{args.env} interpreter: all {len(rows)} checked, none missing\n"
    print(text, end="")
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 3 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
