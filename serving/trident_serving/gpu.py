"""Where a model instance runs and how much GPU memory it may take (Triton-free, importable anywhere).

* Placement: a `KIND_GPU` instance runs on `model_instance_device_id` and nowhere else; the current CUDA device
  is set to it so that no stray context lands on GPU 0. A GPU instance that finds no usable CUDA, or a GPU
  this PyTorch build has no kernels for (`unsupported_gpu`), fails to load with a clear message instead of
  silently running on the CPU or failing at its first kernel.
* Budgets: the config parameter `gpu_memory_mib` (absent: unlimited) caps the instance's PyTorch allocator
  (`torch.cuda.set_per_process_memory_fraction`) and, for onnxruntime, its CUDA arena (`gpu_mem_limit`).
  A batch that needs more fails with `BudgetExceeded` (an UNAVAILABLE error response), not the stub.
* Measurement: with `TRIDENT_GPU_MEMORY_LOG=<dir>` set, an instance writes its PyTorch counters there
  (`record_memory`), which `python -m perf.memory` combines with NVML's per-process numbers.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

MIB = 1 << 20
# Fewer, growable segments instead of many fixed blocks: a capped allocator fragments less (PyTorch docs,
# "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF"). Read when the allocator starts: set before any
# CUDA allocation (the launchers also set it in the server's environment).
ALLOC_CONF = "expandable_segments:True"
MEMORY_LOG_ENV = "TRIDENT_GPU_MEMORY_LOG"


class NoGPU(RuntimeError):
    """A KIND_GPU instance on a machine (or container) without usable CUDA."""


class BudgetExceeded(RuntimeError):
    """A batch needed more GPU memory than the instance's `gpu_memory_mib` budget (or the card) allows."""


@dataclass(frozen=True)
class Placement:
    """Where one model instance runs: `device` is 'cpu' or 'cuda:<id>'; `budget_mib` None = unlimited."""

    device: str = "cpu"
    budget_mib: Optional[int] = None

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def index(self) -> Optional[int]:
        return int(self.device.split(":")[1]) if self.is_gpu else None


def parse_budget(value: Optional[str]) -> Optional[int]:
    """The `gpu_memory_mib` parameter as a positive int; absent or empty means unlimited (None)."""
    if value is None or not str(value).strip():
        return None
    try:
        mib = int(str(value).strip())
    except ValueError:
        raise ValueError(f"parameter gpu_memory_mib must be a whole number of MiB, got {value!r}") from None
    if mib <= 0:
        raise ValueError(f"parameter gpu_memory_mib must be positive, got {mib}")
    return mib


def memory_fraction(budget_mib: int, total_bytes: int) -> float:
    """The fraction of the device that `budget_mib` is, for set_per_process_memory_fraction (at most 1)."""
    if total_bytes <= 0:
        raise ValueError("total device memory must be positive")
    return min(1.0, budget_mib * MIB / total_bytes)


def place(kind: str, device_id: int | str, budget_mib: Optional[int] = None, model: str = "model") -> Placement:
    """Place an instance of `kind` ('GPU', 'CPU', ...) on its device, applying the budget on a GPU.

    Raises NoGPU for a GPU instance without usable CUDA or on a GPU its PyTorch has no kernels for (clear
    message, instead of a silent CPU fallback or a failing first kernel).
    """
    if kind != "GPU":
        return Placement("cpu", None)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    import torch

    index = int(device_id)
    if not torch.cuda.is_available():
        raise NoGPU(f"{model}: this instance is KIND_GPU (device {index}) but CUDA is not usable here "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                    f"{torch.cuda.device_count()} devices): run it on a GPU host with the NVIDIA runtime, "
                    "or export with --kind cpu / KIND_AUTO to run on the CPU")
    if index >= torch.cuda.device_count():
        raise NoGPU(f"{model}: instance placed on GPU {index} but only {torch.cuda.device_count()} are visible")
    # is_available() is true on a GPU older than every kernel in the build; reading the capability runs none
    refusal = unsupported_gpu(torch.cuda.get_device_capability(index), torch.cuda.get_arch_list())
    if refusal:
        raise NoGPU(f"{model}: GPU {index} ({torch.cuda.get_device_name(index)}) {refusal} (torch "
                    f"{torch.__version__}): use a GPU of a listed architecture or a PyTorch build for this one")
    torch.cuda.set_device(index)  # every later allocation and context of this process goes to this device
    if budget_mib is not None:
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(budget_mib, total), index)
    return Placement(f"cuda:{index}", budget_mib)


def unsupported_gpu(capability: tuple[int, int], arch_list: list[str]) -> Optional[str]:
    """Why a build compiled for `arch_list` (torch.cuda.get_arch_list()) has no kernel a GPU of compute
    `capability` can run, or None when it has one (or the list says nothing: a ROCm or unknown build).

    CUDA's compatibility rules: machine code for sm_XY runs on compute capability X.Z with Z >= Y (same major;
    a family target sm_100f likewise); code for an architecture-specific target (sm_90a) only on exactly 9.0;
    PTX (compute_XY) is compiled by the driver for any capability >= X.Y.
    """
    device = capability[0] * 10 + capability[1]
    targets = [m.groups() for m in map(re.compile(r"(sm|compute)_(\d+)([af]?)$").match, arch_list) if m]
    if not targets:
        return None
    for kind, number, suffix in targets:
        code = int(number)
        if suffix == "a":
            runs = device == code
        elif kind == "sm" or suffix == "f":  # machine code, or a family's PTX: same major, same or newer minor
            runs = device // 10 == code // 10 and device >= code
        else:
            runs = device >= code
        if runs:
            return None
    machine = sorted({int(n) for kind, n, _ in targets if kind == "sm"})
    ptx = sorted({int(n) for kind, n, _ in targets if kind == "compute"})
    has = f"sm_{machine[0]}..sm_{machine[-1]}" if machine else "no machine code"
    has += f" (and PTX for compute_{ptx[0]}+)" if ptx else ""
    return f"is sm_{device} (compute capability {capability[0]}.{capability[1]}); this PyTorch has kernels for {has}"


def onnx_providers(placement: Placement, available: list[str]) -> list:
    """onnxruntime providers for `placement`: CUDA on the instance's device, capped by its budget.

    Raises NoGPU when a GPU instance's onnxruntime has no CUDA provider (onnxruntime instead of onnxruntime-gpu).
    """
    if not placement.is_gpu:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise NoGPU(f"GPU instance on {placement.device} but onnxruntime offers only {available}: "
                    "install onnxruntime-gpu")
    options: dict[str, Any] = {"device_id": placement.index}
    if placement.budget_mib is not None:
        options.update(gpu_mem_limit=placement.budget_mib * MIB, arena_extend_strategy="kSameAsRequested")
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def keep_fp16(model: Any, keep_fp32: tuple[str, ...] = ("positional_embedding",)) -> Any:
    """Store a whisper model's weights in fp16 once, instead of casting fp32 weights on every forward.

    whisper's Linear / Conv1d / embedding-as-logits cast their weight to the input's dtype per call; holding
    them in fp16 makes that cast a no-op, so fp16 inference gives the same numbers with half the memory.
    LayerNorms stay fp32 (whisper computes them in fp32) and so do the parameters named in `keep_fp32`
    (the decoder adds its positional embedding in fp32 before casting).
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name not in keep_fp32 and param.dtype == torch.float32:
                param.data = param.data.half()
    return model


def budget_error(exc: BaseException, placement: Optional[Placement] = None) -> Optional[BudgetExceeded]:
    """A BudgetExceeded naming the budget for a CUDA out-of-memory error (after freeing the cache), else None."""
    try:
        import torch
    except ImportError:
        return None
    if not isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give back what the failed batch reserved, so the next batch can run
    where = placement.device if placement and placement.is_gpu else "the GPU"
    limit = (f"its gpu_memory_mib budget of {placement.budget_mib} MiB"
             if placement and placement.budget_mib else "the memory left on the card")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return BudgetExceeded(f"GPU memory exhausted on {where}: this batch needs more than {limit}; retry, send "
                          f"fewer concurrent requests, or re-plan with `python -m export plan` ({first})")


def record_memory(model: str, phase: str, placement: Placement) -> Optional[Path]:
    """With TRIDENT_GPU_MEMORY_LOG set, write this process's PyTorch counters at `phase` to a JSON file.

    Phase 'loaded' keeps its first record (weights, before any request); any other phase its latest, e.g.
    'batch<n>' the peak of the last batch of n items (peak counters restart after each record).
    """
    folder = os.environ.get(MEMORY_LOG_ENV)
    if not folder or not placement.is_gpu:
        return None
    path = Path(folder) / f"{model}-{os.getpid()}.json"
    records = json.loads(path.read_text()) if path.exists() else {}
    if phase == "loaded" and phase in records:
        return path
    import torch

    index = placement.index
    torch.cuda.synchronize(index)
    entry = {"model": model, "device": index, "pid": os.getpid(),
             "allocated_mib": torch.cuda.memory_allocated(index) / MIB,
             "reserved_mib": torch.cuda.memory_reserved(index) / MIB,
             "peak_allocated_mib": torch.cuda.max_memory_allocated(index) / MIB,
             "peak_reserved_mib": torch.cuda.max_memory_reserved(index) / MIB}
    torch.cuda.reset_peak_memory_stats(index)  # the next record's peak is that of its own batch
    records[phase] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path
