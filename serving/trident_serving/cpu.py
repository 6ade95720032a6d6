"""CPU thread settings for Python-backend stubs that share a machine's cores.

Every model instance is its own stub process. After each parallel region, onnxruntime's intra-op pool and
PyTorch's OpenMP pool spin-wait for more work by default; on a small machine the spinning threads of one stub
burn the cores another stub needs. Measured on 2 cores (perf/LOG.md): a `detect` request cost 286 ms of CPU
(detect stub 80, yolov8 stub 202) against 134 ms with the settings below, and the onnxruntime run alone
173 ms of CPU spinning against 93 ms not, for the same wall time.
"""
from __future__ import annotations

from typing import Any


def onnx_session_options() -> Any:
    """onnxruntime options whose intra-op threads sleep instead of spinning between runs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def light_torch(device: str) -> None:
    """One PyTorch thread for a CPU instance whose torch work is light (letterbox scaling, NMS).

    Its tensors are small (one image, 84x8400 candidates): parallel regions cost more in OpenMP wake-ups and
    spinning than they save (pre- and post-processing took 40 + 59 ms of CPU with 2 threads, 10 + 27 with 1).
    GPU instances are left alone.
    """
    if str(device).startswith("cpu"):
        import torch

        torch.set_num_threads(1)
