"""What a weights file holds: the exporters' checks that they were given what they expect, and a description of
what they were given instead (read without running the file's pickle)."""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional


class WrongWeights(ValueError):
    """`--weights` names something other than what the exporter expects; the message says what it found."""


def load_tensors(path: Path) -> Any:
    """`torch.load` that builds tensors and plain containers only (never runs the file's own classes)."""
    import torch

    # mmap: no full read of a large checkpoint; possible only for the zip format (legacy files, e.g. EasyOCR's
    # craft_mlt_25k.pth, are read whole)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def pickled_classes(path: Path) -> list[str]:
    """The classes (module.Name) that a PyTorch zip checkpoint's pickle names, in order, found by reading its
    opcodes without unpickling; [] for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            data = archive.read(name) if name else b""
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":  # protocol <= 3, torch.save's default: "module name"
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4+: the two strings pushed before
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError:  # a damaged pickle: what was read so far
        pass
    return list(dict.fromkeys(found))


def describe(path: Path) -> str:
    """What `path` holds, in a few words, for an error message ("an ultralytics DetectionModel checkpoint", "a
    state dict of 44 tensors ('module.FeatureExtraction...', ...)", "a directory holding a.pth, b.pth", ...)."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return f"a directory holding {shown}" if names else "an empty directory"
    classes = pickled_classes(path)
    models = [c.rsplit(".", 1)[1] for c in classes if c.startswith("ultralytics.nn.tasks.")]
    if models:
        return f"an ultralytics {models[0]} checkpoint"
    try:
        content = load_tensors(path)
    except Exception:  # noqa: BLE001 - anything unreadable is described by its classes or first bytes
        foreign = [c for c in classes if not c.startswith(("torch.", "collections.", "__builtin__.", "builtins."))]
        if foreign:
            return f"a pickled {foreign[0]}"
        with open(path, "rb") as f:
            head = f.read(16)
        return f"not a PyTorch checkpoint ({path.stat().st_size:,} bytes beginning {head!r})"
    return _describe_object(content)


def _describe_object(content: Any) -> str:
    import torch

    if not isinstance(content, dict):
        return f"a PyTorch file holding a {type(content).__name__}"
    keys = list(content)
    if keys and all(isinstance(v, torch.Tensor) for v in content.values()):
        return f"a state dict of {len(keys)} tensors ({', '.join(repr(k) for k in keys[:2])}, ...)"
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"a dict with keys {shown}" if keys else "an empty dict"


def state_dict_mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> Optional[str]:
    """How the tensors `found` differ from the `expected` module's state dict (names and shapes), or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {len(expected)} tensors missing ({missing[0]!r}, ...)")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({unexpected[0]!r}, ...)")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{len(reshaped)} of other shapes ({key!r} is {list(found[key].shape)}, "
                        f"expected {list(expected[key].shape)})")
    return "; ".join(problems) or None
