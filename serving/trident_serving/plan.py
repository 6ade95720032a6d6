"""GPU memory planning: how many instances of each model, at which largest batch, fit on the cards.

Pure arithmetic (no Triton, no torch). Each instance of a Python model is its own stub process and costs

    context (CUDA context + framework) + weights + activations(batch) = base + per_item * batch

and every GPU also holds the server process's own context and pools. The planner keeps `headroom` of each
card free, places one instance of every model at its largest batch (halving the batch, never below the
model's `min_batch`, when it does not fit), then adds instances while they fit, up to `max_instances` per
model and card. It refuses with a `PlanError` naming the shortfall when even that does not fit.

Defaults (`default_costs`) are documented values: the CUDA contexts were measured on an H200 (server 584 MiB,
each Python stub with torch + CUDA 526 MiB before model data); weights follow from exact parameter counts (and,
for whisper, from the engine and compute type it was exported with); activations are *estimates* until
`python -m perf.memory` measures them on a GPU (`--measured` file). A measurement holds for the engine it was
made on: a whisper entry measured on another engine (or compute type) than the repository's is not used.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

MIB = 1 << 20
RESOURCE = "gpu_memory_mib"  # the rate limiter's resource: MiB of transient (activation) memory per execution
SERVER_MIB = 584.0  # tritonserver's own context + CUDA pool on each GPU (measured, H200, 2026-11-26)
STUB_CONTEXT_MIB = 526.0  # one Python stub with torch and a CUDA context, before model data (same run)
MEASURED_ON = "NVIDIA H200, driver 580.159.04, torch 2.11 (cu130), Triton 2.51 (shared/notes/gpu-device.md)"

# Exact parameter counts (checked against the real modules in tests/test_plan.py).
# Whisper: ModelDimensions of the official checkpoints (export.whisper builds its synthetic weights from these);
# conv stem, 12 d^2 + 12 d per encoder block, 16 d^2 + 17 d per decoder block.
WHISPER_DIMS = {  # n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_vocab, n_text_ctx,
    # n_text_state, n_text_head, n_text_layer
    "tiny": (80, 1500, 384, 6, 4, 51865, 448, 384, 6, 4),
    "base": (80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
    "small": (80, 1500, 768, 12, 12, 51865, 448, 768, 12, 12),
    "medium": (80, 1500, 1024, 16, 24, 51865, 448, 1024, 16, 24),
    "large-v3": (128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32),
    "turbo": (128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 4),
}
YOLO_PARAMS = {"n": 3_157_200, "s": 11_166_560, "m": 25_902_640, "l": 43_691_520, "x": 68_229_648}
CRAFT_PARAMS = 20_770_466
RECOGNIZER_PARAMS = {"ko,en": 4_015_729, "en": 3_781_345}  # korean_g2 / english_g2 (EasyOCR gen2)
# Whisper's ctranslate2 engine (`export whisper --engine ctranslate2`): bytes per weight and per activation
# value at each compute type (the int8 types store int8 weights with a float32 scale per row, and compute in the
# second type: int8 alone is int8 x float32), and what CTranslate2's CUDA runtime (cuBLAS, cuDNN handles and
# workspaces) adds to the stub's context: an estimate until a GPU measures it.
CT2_BYTES = {"float16": (2, 2), "bfloat16": (2, 2), "float32": (4, 4), "int8_float16": (1, 2),
             "int8_bfloat16": (1, 2), "int8_float32": (1, 4), "int8": (1, 4)}
CT2_RUNTIME_MIB = 128.0


class PlanError(ValueError):
    """The models cannot fit the cards; the message says by how much and what to change."""


@dataclass(frozen=True)
class ModelCost:
    """What one instance of a model costs, in MiB. `measured` False marks estimates."""

    name: str
    weights_mib: float
    activation_base_mib: float  # transient memory of a batch of 1, less the per-item part
    activation_per_item_mib: float
    max_batch: int  # the largest batch wanted (the committed config's)
    min_batch: int = 1  # below this, batching stops paying: refuse rather than plan it
    context_mib: float = STUB_CONTEXT_MIB
    rate_limited: bool = False  # execute() does the GPU work, so Triton's rate limiter can gate it
    batch_parameter: str = ""  # config parameter that holds the batch instead of max_batch_size ("" = none)
    measured: bool = False
    note: str = ""
    variant: str = ""  # what the costs depend on beyond the model's name (whisper: "engine compute_type")

    def activation_mib(self, batch: int) -> float:
        return self.activation_base_mib + self.activation_per_item_mib * batch

    def budget_mib(self, batch: int) -> int:
        """The instance's allocator budget (`gpu_memory_mib`): weights + activations; the context is outside."""
        return math.ceil(self.weights_mib + self.activation_mib(batch))

    def instance_mib(self, batch: int) -> float:
        return self.context_mib + self.weights_mib + self.activation_mib(batch)


@dataclass(frozen=True)
class Costs:
    """Costs of the server and of every model, with where they come from."""

    models: dict[str, ModelCost]
    server_mib: float = SERVER_MIB
    source: str = ""
    ignored: tuple[str, ...] = ()  # measurements not used, and why


def whisper_params(size: str) -> int:
    """Whisper's parameter count for `size`, from its dimensions."""
    n_mels, _, da, _, la, n_vocab, n_text_ctx, dt, _, lt = WHISPER_DIMS[size]
    encoder = n_mels * da * 3 + da + da * da * 3 + da + la * (12 * da * da + 12 * da) + 2 * da
    decoder = n_vocab * dt + n_text_ctx * dt + lt * (16 * dt * dt + 17 * dt) + 2 * dt
    return encoder + decoder


def whisper_variant(engine: str = "openai", compute_type: Optional[str] = None) -> str:
    """What whisper's GPU costs depend on, as "engine compute_type"; PlanError for one without costs."""
    if engine == "openai":
        return "openai float16"
    if engine != "ctranslate2":
        raise PlanError(f"whisper's engine {engine!r} has no costs: use openai or ctranslate2")
    compute_type = compute_type or "float16"  # the export's default on a GPU
    if compute_type not in CT2_BYTES:
        raise PlanError(f"whisper's ctranslate2 compute type {compute_type!r} has no costs: "
                        f"use one of {', '.join(CT2_BYTES)}")
    return f"ctranslate2 {compute_type}"


def whisper_cost(size: str, max_batch: int = 16, engine: str = "openai", compute_type: Optional[str] = None) \
        -> ModelCost:
    """One whisper instance on a GPU. openai engine: fp16 weights (the decoder's positional embedding and the
    encoder's sinusoids stay fp32), fp16 activations and windows. ctranslate2 engine: weights and activations at
    the bytes of `compute_type` (default float16, as the export's), float32 windows, plus CTranslate2's CUDA
    runtime in the context. Activations per 30 s window are estimated as the decoder's key/value cache plus the
    encoder's widest layer."""
    n_mels, n_audio_ctx, da, _, _, _, n_text_ctx, dt, _, lt = WHISPER_DIMS[size]
    variant = whisper_variant(engine, compute_type)
    if engine == "ctranslate2":
        weight_bytes, value_bytes = CT2_BYTES[variant.split()[1]]
        weights = weight_bytes * whisper_params(size) / MIB
        window_bytes, context = 4, STUB_CONTEXT_MIB + CT2_RUNTIME_MIB
    else:
        weights = (2 * whisper_params(size) + 2 * n_text_ctx * dt + 4 * n_audio_ctx * da) / MIB
        value_bytes, window_bytes, context = 2, 2, STUB_CONTEXT_MIB
    kv_cache = lt * 2 * (n_text_ctx + n_audio_ctx) * dt * value_bytes
    encoder = n_audio_ctx * 4 * da * 2 * value_bytes + n_mels * 3000 * window_bytes
    return ModelCost("whisper", weights, 128.0, (kv_cache + encoder) / MIB, max_batch, min_batch=min(4, max_batch),
                     context_mib=context, batch_parameter="max_windows_per_step", variant=variant,
                     note=f"whisper-{size} ({variant}); activations estimated (kv cache + encoder)")


def default_costs(whisper_size: str = "small", yolo_size: str = "n", ocr_lang: str = "ko,en",
                  whisper_engine: str = "openai", whisper_compute_type: Optional[str] = None) -> Costs:
    """Documented defaults: contexts measured on an H200, weights exact, activations estimated."""
    yolo_weights = 4 * YOLO_PARAMS[yolo_size] / MIB  # fp32 ONNX (python / onnxruntime flavours)
    yolo_scale = {"n": 1.0, "s": 2.0, "m": 3.0, "l": 4.0, "x": 5.0}[yolo_size]
    models = [
        # FP32 [3,640,640] in (4.7 MiB) and [84,8400] out (2.7 MiB) per image at the largest shape, plus ~3 of
        # the widest feature maps alive at once (16 x 320 x 320 fp32 for n, scaled by width for larger sizes).
        ModelCost("yolov8", yolo_weights, 64.0, 7.4 + 19.0 * yolo_scale, 64, min_batch=8, rate_limited=True,
                  note=f"yolov8{yolo_size}; activations estimated"),
        # decode + letterbox on the device (uint8 and FP32 copies), the BLS output and NMS candidates per image.
        ModelCost("detect", 0.0, 32.0, 13.0, 64, min_batch=8,
                  note="BLS (no weights); activations estimated. No rate-limiter resource: it holds its "
                       "execution while yolov8 runs"),
        # CRAFT (VGG16-BN U-net, fp32) on a 1280x736 page keeps ~3 full-resolution 64-channel maps alive.
        ModelCost("easyocr", 4 * (CRAFT_PARAMS + RECOGNIZER_PARAMS[ocr_lang]) / MIB, 256.0, 720.0, 16,
                  min_batch=2, rate_limited=True,
                  note=f"CRAFT + {'korean' if 'ko' in ocr_lang else 'english'}_g2; activations estimated for "
                       "1280x736 pages (larger pages cost more)"),
        whisper_cost(whisper_size, engine=whisper_engine, compute_type=whisper_compute_type),
    ]
    return Costs({m.name: m for m in models}, SERVER_MIB,
                 f"defaults: contexts measured on {MEASURED_ON}; weights from parameter counts; "
                 "activations estimated")


def load_measured(path: Path | str, defaults: Costs) -> Costs:
    """Costs from a `python -m perf.memory` file; models it does not name keep their defaults."""
    data = json.loads(Path(path).read_text())
    models = dict(defaults.models)
    ignored = []
    for name, entry in data.get("models", {}).items():
        base = models.get(name)
        fields = {k: entry[k] for k in ("weights_mib", "activation_base_mib", "activation_per_item_mib",
                                        "context_mib", "max_batch", "min_batch") if k in entry}
        if base is None:
            missing = {"weights_mib", "activation_per_item_mib", "max_batch"} - set(fields)
            if missing:
                raise PlanError(f"{path}: model {name!r} lacks {sorted(missing)} (and has no default costs)")
            models[name] = ModelCost(name=name, measured=True, note=entry.get("note", "measured"),
                                     **{"activation_base_mib": 0.0, **fields})
        elif entry.get("variant", base.variant) != base.variant:  # measured on another engine: not this one's
            ignored.append(f"{name}: {path} measured {entry['variant']}, the repository serves {base.variant}: "
                           f"its estimates are used")
        else:
            models[name] = replace(base, measured=True, note=entry.get("note", "measured"), **fields)
    return Costs(models, float(data.get("server_mib", defaults.server_mib)),
                 f"measured: {data.get('machine', path)}", tuple(ignored))


@dataclass
class Group:
    """Instances of one model on one GPU."""

    model: str
    gpu: int
    count: int


@dataclass
class Plan:
    """The chosen instance counts and batches, and what they cost per GPU."""

    card_mib: float
    headroom: float
    gpus: int
    server_mib: float
    batches: dict[str, int]
    groups: list[Group] = field(default_factory=list)
    costs: dict[str, ModelCost] = field(default_factory=dict)

    @property
    def usable_mib(self) -> float:
        """What each card offers the models: the card less the headroom and the server's own share."""
        return self.card_mib * (1 - self.headroom) - self.server_mib

    def used_mib(self, gpu: int) -> float:
        """Planned memory on `gpu`, the server included."""
        return self.server_mib + sum(g.count * self.costs[g.model].instance_mib(self.batches[g.model])
                                     for g in self.groups if g.gpu == gpu)

    def instances(self, model: str, gpu: Optional[int] = None) -> int:
        return sum(g.count for g in self.groups if g.model == model and (gpu is None or g.gpu == gpu))

    def fits(self, gpu: int) -> bool:
        return self.used_mib(gpu) <= self.card_mib * (1 - self.headroom) + 1e-6

    def pool_mib(self, gpu: int) -> int:
        """The rate limiter's pool on `gpu`: the activations planned for its rate-limited instances."""
        return sum(g.count * self.resource_count(g.model) for g in self.groups
                   if g.gpu == gpu and self.costs[g.model].rate_limited)

    def resource_count(self, model: str) -> int:
        return math.ceil(self.costs[model].activation_mib(self.batches[model]))

    def rate_limit_flags(self) -> list[str]:
        """tritonserver flags that give each GPU's rate-limiter pool exactly the planned activations."""
        flags = ["--rate-limit=execution_count"]
        flags += [f"--rate-limit-resource={RESOURCE}:{self.pool_mib(g)}:{g}" for g in range(self.gpus)
                  if self.pool_mib(g)]
        return flags

    def table(self) -> str:
        """The plan as a text table: per model and GPU, then per GPU."""
        rows = [("model", "gpu", "instances", "max batch", "MiB each", "total MiB", "source")]
        for g in sorted(self.groups, key=lambda g: (g.gpu, g.model)):
            cost = self.costs[g.model]
            each = cost.instance_mib(self.batches[g.model])
            rows.append((g.model, str(g.gpu), str(g.count), str(self.batches[g.model]), f"{each:,.0f}",
                         f"{g.count * each:,.0f}", "measured" if cost.measured else "estimate"))
        for gpu in range(self.gpus):
            rows.append(("(server)", str(gpu), "1", "-", f"{self.server_mib:,.0f}", f"{self.server_mib:,.0f}",
                         "measured"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        for gpu in range(self.gpus):
            used = self.used_mib(gpu)
            lines.append(f"GPU {gpu}: {self.card_mib:,.0f} MiB card, {used:,.0f} MiB planned, "
                         f"{self.card_mib - used:,.0f} MiB free ({self.headroom:.0%} headroom kept = "
                         f"{self.card_mib * self.headroom:,.0f} MiB); rate-limiter pool {self.pool_mib(gpu):,} MiB")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"card_mib": self.card_mib, "headroom": self.headroom, "gpus": self.gpus,
                "server_mib": self.server_mib, "batches": self.batches,
                "groups": [asdict(g) for g in self.groups],
                "budgets_mib": {m: c.budget_mib(self.batches[m]) for m, c in self.costs.items()},
                "rate_limit_flags": self.rate_limit_flags(),
                "costs": {m: asdict(c) for m, c in self.costs.items()}}


def make_plan(costs: Costs, card_mib: float, models: list[str], headroom: float = 0.10, gpus: int = 1,
              max_instances: int = 2) -> Plan:
    """Choose instances and largest batches of `models` for `gpus` cards of `card_mib` each.

    Raises PlanError when a model does not fit even at its `min_batch` with one instance.
    """
    if not 0 <= headroom < 1:
        raise PlanError(f"headroom must be in [0, 1), got {headroom}")
    if gpus < 1 or card_mib <= 0:
        raise PlanError("need at least one GPU with positive memory")
    unknown = [m for m in models if m not in costs.models]
    if unknown:
        raise PlanError(f"no costs for {unknown}: known models are {sorted(costs.models)}")
    chosen = {m: costs.models[m] for m in models}
    plan = Plan(card_mib, headroom, gpus, costs.server_mib, {m: c.max_batch for m, c in chosen.items()},
                costs=chosen)
    if plan.usable_mib <= 0:
        raise PlanError(f"a {card_mib:,.0f} MiB card less {headroom:.0%} headroom cannot even hold the server "
                        f"({costs.server_mib:,.0f} MiB)")
    tie_detect_batch(plan)
    # One instance of each model, largest first, on the card with the most room; halve batches to fit.
    for name in sorted(models, key=lambda m: -chosen[m].instance_mib(chosen[m].max_batch)):
        while True:
            gpu = min(range(gpus), key=plan.used_mib)
            plan.groups.append(Group(name, gpu, 1))
            if plan.fits(gpu):
                break
            plan.groups.pop()
            # Halve the batch of whichever model (this one or one placed) has the largest activations now.
            candidates = sorted({g.model for g in plan.groups} | {name},
                                key=lambda m: -chosen[m].activation_mib(plan.batches[m]))
            if not any(shrink(plan, m) for m in candidates):
                raise PlanError(shortfall(plan, name))
    # More instances while they fit: round robin over the models, each on the emptiest card that takes it.
    grown = True
    while grown:
        grown = False
        for name in models:
            for gpu in sorted(range(gpus), key=plan.used_mib):
                if plan.instances(name, gpu) >= max_instances:
                    continue
                group = next((g for g in plan.groups if g.model == name and g.gpu == gpu), None)
                if group is None:
                    group = Group(name, gpu, 0)
                    plan.groups.append(group)
                group.count += 1
                if plan.fits(gpu):
                    grown = True
                    break
                group.count -= 1
                if group.count == 0:
                    plan.groups.remove(group)
    return plan


def shrink(plan: Plan, name: str) -> bool:
    """Halve `name`'s batch (not below its min_batch); False when it is already there."""
    cost = plan.costs[name]
    batch = plan.batches[name]
    if batch <= cost.min_batch:
        return False
    plan.batches[name] = max(cost.min_batch, batch // 2)
    tie_detect_batch(plan)
    return True


def tie_detect_batch(plan: Plan) -> None:
    """`detect` splits its batch into BLS calls of at most yolov8's batch: no larger, each execution makes one
    call (a larger batch would only hold more activations while waiting for several)."""
    if "detect" in plan.batches and "yolov8" in plan.batches:
        plan.batches["detect"] = min(plan.batches["detect"], plan.batches["yolov8"])


def shortfall(plan: Plan, name: str) -> str:
    cost = plan.costs[name]
    batch = plan.batches[name]
    need = cost.instance_mib(batch)
    room = max(plan.card_mib * (1 - plan.headroom) - plan.used_mib(g) for g in range(plan.gpus))
    placed = ", ".join(sorted({g.model for g in plan.groups})) or "nothing else"
    return (f"{name} does not fit: one instance at its smallest useful batch ({batch}) needs {need:,.0f} MiB "
            f"({cost.context_mib:,.0f} context + {cost.weights_mib:,.0f} weights + "
            f"{cost.activation_mib(batch):,.0f} activations) but the best of {plan.gpus} x "
            f"{plan.card_mib:,.0f} MiB cards has {room:,.0f} MiB left after {plan.headroom:.0%} headroom, the server "
            f"and {placed}. Use a bigger card or more GPUs (--gpus), less headroom, a smaller model, or serve "
            f"fewer models at once (--models; others can be loaded on demand with explicit model control)")


def parse_size(text: str) -> float:
    """'80GiB', '16GB', '81559MiB', '24g' -> MiB (GB = 10^9 bytes, GiB = 2^30)."""
    units = {"": MIB, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": MIB,
             "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    if unit not in units or not number:
        raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 80GiB, 16GB or 24000MiB")
    return float(number) * units[unit] / MIB


def parse_headroom(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    value = text.strip()
    fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    if not 0 <= fraction < 1:
        raise ValueError(f"headroom must be between 0% and 100%, got {text!r}")
    return fraction
