"""plan: fit the exported models on the GPUs (instances, batches, memory budgets, rate-limiter resources).

Prints the plan as a table and writes it into the repository's configs: `instance_group` (count, KIND_GPU,
gpus, rate_limiter resources), `max_batch_size` (whisper: `max_windows_per_step`; yolov8's also into detect's
`yolov8_max_batch_size`), the `gpu_memory_mib` budget, and `gpu_plan.json` with the server's `--rate-limit*`
flags. Refuses when the models cannot fit.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

from trident_serving import plan as planner

from .repository import DEFAULT_REPO, set_parameter
from .yolo import DETECT_BLS_BATCH

PLAN_FILE = "gpu_plan.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-memory", required=True, help="memory of each card, e.g. 80GiB, 16GB, 24000MiB")
    parser.add_argument("--measured", type=Path, help="costs measured by `python -m perf.memory` (JSON); "
                                                      "default: documented H200 values and estimates")
    parser.add_argument("--headroom", default="10%", help="share of each card kept free (default 10%%)")
    parser.add_argument("--gpus", type=int, default=1, help="number of identical GPUs (default 1)")
    parser.add_argument("--max-instances", type=int, default=2, help="most instances of a model per GPU (default 2)")
    parser.add_argument("--models", help="comma-separated models to plan (default: every model in the repository)")
    parser.add_argument("--max-batch", action="append", default=[], metavar="MODEL=N",
                        help="largest batch wanted for MODEL (repeatable; default: the committed configs')")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="model repository to write into")


def run(args: argparse.Namespace) -> None:
    repo = Path(args.repo)
    try:
        card = planner.parse_size(args.gpu_memory)
        headroom = planner.parse_headroom(args.headroom)
    except ValueError as exc:
        raise SystemExit(f"plan: {exc}") from None
    models = args.models.split(",") if args.models else present_models(repo)
    if not models:
        raise SystemExit(f"plan: {repo} holds no models: run `python -m export ...` first")
    try:
        costs = repository_costs(repo)
    except planner.PlanError as exc:
        raise SystemExit(f"plan: {repo}/export.json: {exc}") from None
    if args.measured:
        try:
            costs = planner.load_measured(args.measured, costs)
        except (OSError, ValueError) as exc:  # PlanError is a ValueError, and so is bad JSON
            raise SystemExit(f"plan: --measured {args.measured}: {exc}") from None
        for line in costs.ignored:
            print(line)
    costs = with_max_batches(costs, args.max_batch)
    try:
        plan = planner.make_plan(costs, card, models, headroom, args.gpus, args.max_instances)
    except planner.PlanError as exc:
        raise SystemExit(f"plan: cannot fit {', '.join(models)} on {args.gpus} x {args.gpu_memory}: {exc}") from None
    print(f"costs: {costs.source}")
    if "whisper" in models:
        print(f"whisper engine: {costs.models['whisper'].variant}")
    print(plan.table())
    print("server flags: " + " ".join(plan.rate_limit_flags()))
    if args.dry_run:
        return
    for name in models:
        write_config(repo / name / "config.pbtxt", plan, name)
    detect = repo / "detect" / "config.pbtxt"
    if "yolov8" in models and detect.is_file():  # detect splits its BLS calls by yolov8's (new) largest batch
        set_parameter(detect, DETECT_BLS_BATCH, str(plan.batches["yolov8"]))
    (repo / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    print(f"written: {', '.join(f'{m}/config.pbtxt' for m in models)} and {PLAN_FILE} in {repo.resolve()}")


def present_models(repo: Path) -> list[str]:
    """The models of `repo` the planner has costs for, in a stable order."""
    known = planner.default_costs().models
    return [name for name in known if (repo / name / "config.pbtxt").is_file()]


def exported_models(repo: Path) -> dict:
    """What `python -m export` recorded of the repository's models (export.json), {} before any export."""
    path = repo / "export.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def whisper_variant(repo: Path) -> str:
    """The engine and compute type the repository's whisper was exported with (planner.whisper_variant)."""
    exported = exported_models(repo).get("whisper", {})
    return planner.whisper_variant(exported.get("engine", "openai"), exported.get("compute_type"))


def repository_costs(repo: Path) -> planner.Costs:
    """Default costs for the sizes and whisper engine `repo` was exported with (export.json), else whisper small
    (openai engine) / yolov8n / ko,en."""
    manifest = exported_models(repo)
    whisper_size = manifest.get("whisper", {}).get("size", "small")
    if whisper_size not in planner.WHISPER_DIMS:  # "custom": a checkpoint of no official size
        print("whisper was exported with dimensions of no official size: small's estimates stand in for it "
              "(measure it with `python -m perf.memory` and pass --measured)")
        whisper_size = "small"
    yolo_size = manifest.get("yolov8", {}).get("size", "n")
    lang = manifest.get("easyocr", {}).get("lang", "ko,en")
    lang = ",".join(lang) if isinstance(lang, list) else lang
    whisper = manifest.get("whisper", {})
    return planner.default_costs(whisper_size, yolo_size, lang if lang in planner.RECOGNIZER_PARAMS else "ko,en",
                                 whisper.get("engine", "openai"), whisper.get("compute_type"))


def with_max_batches(costs: planner.Costs, overrides: list[str]) -> planner.Costs:
    models = dict(costs.models)
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in models or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"plan: --max-batch {item!r}: expected MODEL=N with MODEL one of {sorted(models)}")
        cost = models[name]
        models[name] = replace(cost, max_batch=int(value), min_batch=min(cost.min_batch, int(value)))
    return planner.Costs(models, costs.server_mib, costs.source)


def instance_groups(plan: planner.Plan, name: str) -> str:
    """The `instance_group [...]` block of `name`: one entry per GPU it runs on."""
    entries = []
    for group in sorted((g for g in plan.groups if g.model == name), key=lambda g: g.gpu):
        limiter = ""
        if plan.costs[name].rate_limited:
            limiter = (f' rate_limiter {{ resources [ {{ name: "{planner.RESOURCE}" '
                       f"count: {plan.resource_count(name)} }} ] }}")
        entries.append(f"  {{ count: {group.count} kind: KIND_GPU gpus: [ {group.gpu} ]{limiter} }}")
    return "instance_group [\n" + ",\n".join(entries) + "\n]"


def replace_block(text: str, field: str, block: str) -> str:
    """Replace the `field [ ... ]` list (brackets balanced, strings skipped) in config text by `block`."""
    match = re.search(rf"^\s*{field}\s*:?\s*\[", text, re.M)
    if match is None:
        return text.rstrip() + "\n" + block + "\n"
    depth, i, quoted = 0, match.end() - 1, False
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                break
        i += 1
    start = match.start() + len(match.group(0)) - len(match.group(0).lstrip())
    return text[:start] + block + text[i + 1:]


def write_config(config: Path, plan: planner.Plan, name: str) -> None:
    """Write `name`'s planned instances, batch and budget into its config.pbtxt."""
    if not config.is_file():
        raise SystemExit(f"plan: {config} not found: export {name} first")
    text = replace_block(config.read_text(), "instance_group", instance_groups(plan, name))
    cost, batch = plan.costs[name], plan.batches[name]
    if not cost.batch_parameter:
        text = re.sub(r"^max_batch_size:\s*\d+", f"max_batch_size: {batch}", text, count=1, flags=re.M)
        text = clamp_warmup(text, batch)
    config.write_text(text)
    if cost.batch_parameter:
        set_parameter(config, cost.batch_parameter, str(batch))
    set_parameter(config, "gpu_memory_mib", str(cost.budget_mib(batch)))


def clamp_warmup(text: str, batch: int) -> str:
    """Keep `model_warmup` samples within the new max_batch_size (Triton refuses larger ones)."""
    def clamp(line: re.Match) -> str:
        size = int(line.group(2))
        if size <= batch:
            return line.group(0)
        return (line.group(0).replace(f'"batch{size}"', f'"batch{batch}"')
                .replace(line.group(1) + line.group(2), line.group(1) + str(batch)))
    return re.sub(r"^.*(batch_size:\s*)(\d+).*$", clamp, text, flags=re.M)
