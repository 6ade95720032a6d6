"""The GPU memory planner: arithmetic and refusals on recorded measurements, and the configs it writes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import __main__ as export_main
from export.repository import DEFAULT_REPO
from export.yolo import yolov8_config
from trident_serving import plan as planner

# A recorded measurement file in perf.memory's format (numbers of the H200 notes; activations as measured by
# a run of `python -m perf.memory` would record them).
RECORDED = {
    "machine": "recorded for the tests: NVIDIA H200",
    "server_mib": 584,
    "models": {
        "yolov8": {"context_mib": 526, "weights_mib": 12, "activation_base_mib": 64, "activation_per_item_mib": 26,
                   "max_batch": 64, "min_batch": 8},
        "detect": {"context_mib": 526, "weights_mib": 0, "activation_base_mib": 32, "activation_per_item_mib": 13,
                   "max_batch": 64, "min_batch": 8},
        "easyocr": {"context_mib": 526, "weights_mib": 95, "activation_base_mib": 256,
                    "activation_per_item_mib": 720, "max_batch": 16, "min_batch": 2},
        "whisper": {"context_mib": 526, "weights_mib": 464, "activation_base_mib": 128,
                    "activation_per_item_mib": 118, "max_batch": 16, "min_batch": 4},
    },
}
MODELS = ["yolov8", "detect", "easyocr", "whisper"]


@pytest.fixture
def costs(tmp_path) -> planner.Costs:
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(RECORDED))
    return planner.load_measured(path, planner.default_costs())


def check_within(plan: planner.Plan) -> None:
    for gpu in range(plan.gpus):
        assert plan.used_mib(gpu) <= plan.card_mib * (1 - plan.headroom)
    for model in plan.costs:
        assert plan.instances(model) >= 1
    assert plan.batches["detect"] <= plan.batches["yolov8"]


def test_measured_costs_replace_defaults(costs):
    assert all(costs.models[m].measured for m in MODELS)
    assert costs.models["easyocr"].instance_mib(16) == 526 + 95 + 256 + 720 * 16


def test_big_card_fits_everything_at_full_batch(costs):
    plan = planner.make_plan(costs, planner.parse_size("80GiB"), MODELS, 0.10, max_instances=2)
    check_within(plan)
    assert plan.batches == {"yolov8": 64, "detect": 64, "easyocr": 16, "whisper": 16}
    # 584 + 2 x (2266 + 1390 + 12397 + 3006) = 38,702 MiB of 73,728 usable: two of each fit.
    assert all(plan.instances(m) == 2 for m in MODELS)
    assert plan.used_mib(0) == pytest.approx(584 + 2 * (2266 + 1390 + 12397 + 3006))
    assert plan.pool_mib(0) == 2 * (64 + 26 * 64) + 2 * (256 + 720 * 16)
    assert plan.rate_limit_flags() == ["--rate-limit=execution_count",
                                       f"--rate-limit-resource=gpu_memory_mib:{plan.pool_mib(0)}:0"]


def test_small_card_shrinks_batches_then_refuses(costs):
    plan = planner.make_plan(costs, planner.parse_size("16GB"), MODELS, 0.10)
    check_within(plan)
    assert plan.batches["easyocr"] < 16  # the largest activations give way first
    with pytest.raises(planner.PlanError, match=r"does not fit: .* needs [\d,]+ MiB .* has [\d,]+ MiB left"):
        planner.make_plan(costs, planner.parse_size("4GiB"), MODELS, 0.10)
    with pytest.raises(planner.PlanError, match="cannot even hold the server"):
        planner.make_plan(costs, 600, MODELS, 0.10)


def test_headroom_is_kept(costs):
    card = planner.parse_size("24GiB")
    loose = planner.make_plan(costs, card, MODELS, 0.0)
    tight = planner.make_plan(costs, card, MODELS, 0.30)
    check_within(loose)
    check_within(tight)
    assert tight.used_mib(0) <= card * 0.70 < loose.used_mib(0)
    assert planner.parse_headroom("10%") == planner.parse_headroom("0.1") == 0.1
    with pytest.raises(ValueError):
        planner.parse_headroom("100%")


def test_multiple_gpus_spread_what_one_cannot_hold(costs):
    card = planner.parse_size("6GiB")  # all at min batch: 5,963 MiB with the server
    with pytest.raises(planner.PlanError):
        planner.make_plan(costs, card, MODELS, 0.10, gpus=1)
    plan = planner.make_plan(costs, card, MODELS, 0.10, gpus=2)
    check_within(plan)
    assert {g.gpu for g in plan.groups} == {0, 1}
    # Both rate-limited models (yolov8 at batch 64, easyocr shrunk to 2) landed on GPU 0: its pool holds their
    # activations, (64 + 26 x 64) + (256 + 720 x 2) MiB; GPU 1 (detect, whisper: no resource) gets no flag.
    assert {(g.model, g.gpu) for g in plan.groups if plan.costs[g.model].rate_limited} == {("yolov8", 0),
                                                                                         ("easyocr", 0)}
    assert plan.batches["easyocr"] == 2
    assert plan.rate_limit_flags() == ["--rate-limit=execution_count",
                                       f"--rate-limit-resource=gpu_memory_mib:{1728 + 1696}:0"]


def test_sizes_parse():
    assert planner.parse_size("80GiB") == 80 * 1024
    assert planner.parse_size("16GB") == pytest.approx(16e9 / 2**20)
    assert planner.parse_size("24000MiB") == 24000
    with pytest.raises(ValueError, match="80GiB"):
        planner.parse_size("lots")


def test_parameter_counts_match_the_real_modules():
    from ultralytics.nn.tasks import DetectionModel
    from whisper.model import ModelDimensions, Whisper

    from export.whisper import DIM_NAMES, DIMS

    model = Whisper(ModelDimensions(**dict(zip(DIM_NAMES, DIMS["tiny"]))))
    assert planner.whisper_params("tiny") == sum(p.numel() for p in model.parameters())
    yolo = DetectionModel("yolov8n.yaml", verbose=False)
    assert planner.YOLO_PARAMS["n"] == sum(p.numel() for p in yolo.parameters())


def plan_repository(tmp_path: Path, *args: str) -> Path:
    """A repository with the committed configs (yolov8's rendered) planned by `python -m export plan`."""
    repo = tmp_path / "repo"
    for name in ("detect", "easyocr", "whisper"):
        shutil.copytree(DEFAULT_REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    metadata = {"names": {i: f"class{i}" for i in range(80)}, "imgsz": [640, 640], "dynamic": True}  # rect
    (repo / "yolov8").mkdir()
    (repo / "yolov8" / "config.pbtxt").write_text(yolov8_config("python", "auto", 64, metadata))
    assert export_main.main(["plan", "--repo", str(repo), *args]) == 0
    return repo


def parse(config: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())


def test_written_configs_parse_with_tritons_protobuf(tmp_path):
    repo = plan_repository(tmp_path, "--gpu-memory", "16GB", "--gpus", "2")
    written = json.loads((repo / "gpu_plan.json").read_text())
    # the planner's own figures for the same inputs (the repository has no export.json: default costs)
    plan = planner.make_plan(planner.default_costs(), planner.parse_size("16GB"), MODELS, 0.10, gpus=2)
    assert plan.to_json() == written
    pools = {gpu: 0 for gpu in range(2)}  # the rate limiter's resources the configs ask for, per GPU
    for name in MODELS:
        config = parse(repo / name / "config.pbtxt")
        groups = [g for g in written["groups"] if g["model"] == name]
        assert [(g.count, list(g.gpus)) for g in config.instance_group] == \
            [(g["count"], [g["gpu"]]) for g in sorted(groups, key=lambda g: g["gpu"])]
        assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
        limited = name in ("yolov8", "easyocr")
        for group in config.instance_group:
            assert [(r.name, r.count) for r in group.rate_limiter.resources] == (
                [("gpu_memory_mib", plan.resource_count(name))] if limited else [])
            pools[group.gpus[0]] += group.count * sum(r.count for r in group.rate_limiter.resources)
        budget = int(config.parameters["gpu_memory_mib"].string_value)
        assert budget == written["budgets_mib"][name]
        batch = written["batches"][name]
        if name == "whisper":
            assert config.parameters["max_windows_per_step"].string_value == str(batch)
        else:
            assert config.max_batch_size == batch
            assert all(w.batch_size <= batch for w in config.model_warmup)
    # each GPU's pool is exactly what its instances ask for together, so all of them can run at once
    assert written["rate_limit_flags"] == ["--rate-limit=execution_count"] + [
        f"--rate-limit-resource=gpu_memory_mib:{pool}:{gpu}" for gpu, pool in pools.items() if pool]


@pytest.mark.parametrize("args, batch", [
    (("--gpu-memory", "8GB"), 16),  # shrunk to fit: yolov8 (and detect) at 16
    (("--gpu-memory", "80GiB", "--models", "yolov8", "--max-batch", "yolov8=8"), 8),  # yolov8 alone
])
def test_detect_splits_by_the_planned_yolov8_batch(tmp_path, args, batch):
    """detect sends yolov8 BLS calls of at most its `yolov8_max_batch_size`: the plan keeps it at yolov8's batch,
    also when only yolov8 is planned."""
    repo = plan_repository(tmp_path, *args)
    planned = json.loads((repo / "gpu_plan.json").read_text())["batches"]
    assert planned["yolov8"] == batch
    assert parse(repo / "yolov8" / "config.pbtxt").max_batch_size == batch
    detect = parse(repo / "detect" / "config.pbtxt")
    assert detect.parameters["yolov8_max_batch_size"].string_value == str(batch)
    assert detect.max_batch_size == planned.get("detect", 64)  # its own batch: the committed one unless planned


def test_whisper_of_no_official_size_is_planned_with_small_estimates(tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_REPO / "whisper", repo / "whisper", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "export.json").write_text(json.dumps({"whisper": {"size": "custom"}}))  # as `export whisper` records it
    assert export_main.main(["plan", "--repo", str(repo), "--gpu-memory", "16GB", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dimensions of no official size: small's estimates stand in for it" in out
    small = planner.default_costs("small").models["whisper"].instance_mib(16)
    assert f"{small:,.0f}" in out


def test_refusal_writes_nothing(tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_REPO / "whisper", repo / "whisper", ignore=shutil.ignore_patterns("__pycache__"))
    before = (repo / "whisper" / "config.pbtxt").read_text()
    with pytest.raises(SystemExit, match="cannot fit whisper on 1 x 1GiB: whisper does not fit"):
        export_main.main(["plan", "--repo", str(repo), "--gpu-memory", "1GiB"])
    assert (repo / "whisper" / "config.pbtxt").read_text() == before
    assert not (repo / "gpu_plan.json").exists()


def test_shipped_defaults_print_the_table(capsys):
    """`python -m export plan` on the documented defaults, as shipped (dry run: the repository is untouched)."""
    before = {p: p.read_text() for p in DEFAULT_REPO.glob("*/config.pbtxt")}
    assert export_main.main(["plan", "--gpu-memory", "80GiB", "--dry-run", "--models", ",".join(MODELS)]) == 0
    out = capsys.readouterr().out
    assert "model     gpu  instances  max batch  MiB each  total MiB  source" in out
    assert sum(line.endswith("estimate") for line in out.splitlines()) == 4 and "(server)    0" in out
    assert "GPU 0: 81,920 MiB card" in out and "--rate-limit=execution_count" in out
    assert {p: p.read_text() for p in DEFAULT_REPO.glob("*/config.pbtxt")} == before


def test_whisper_costs_follow_the_engine_and_compute_type():
    openai = planner.whisper_cost("small")
    ct2 = {t: planner.whisper_cost("small", engine="ctranslate2", compute_type=t) for t in planner.CT2_BYTES}
    params = planner.whisper_params("small")
    assert ct2["float16"].weights_mib == pytest.approx(2 * params / planner.MIB)
    assert ct2["float32"].weights_mib == 2 * ct2["float16"].weights_mib
    assert ct2["int8_float16"].weights_mib == ct2["int8"].weights_mib == ct2["float16"].weights_mib / 2
    # int8 alone computes in float32: int8 weights, float32 activations
    assert ct2["int8"].activation_per_item_mib > ct2["int8_float16"].activation_per_item_mib
    assert ct2["int8_float16"].activation_per_item_mib > openai.activation_per_item_mib  # float32 windows
    assert all(c.context_mib == planner.STUB_CONTEXT_MIB + planner.CT2_RUNTIME_MIB for c in ct2.values())
    assert planner.whisper_cost("small", engine="ctranslate2").variant == "ctranslate2 float16"  # the GPU default
    assert openai.variant == "openai float16" and openai.context_mib == planner.STUB_CONTEXT_MIB
    with pytest.raises(planner.PlanError, match="compute type 'int4' has no costs: use one of float16"):
        planner.whisper_cost("small", engine="ctranslate2", compute_type="int4")


def engine_repository(tmp_path: Path, compute_type: str) -> Path:
    """The committed whisper config in a repository whose export.json says the ctranslate2 engine served it."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_REPO / "whisper", repo / "whisper", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "export.json").write_text(json.dumps({"whisper": {"size": "base", "kind": "gpu", "engine": "ctranslate2",
                                                              "compute_type": compute_type}}))
    return repo


def test_repository_on_the_ctranslate2_engine_is_planned_with_its_costs(tmp_path, capsys):
    repo = engine_repository(tmp_path, "int8_float16")
    assert export_main.main(["plan", "--repo", str(repo), "--gpu-memory", "16GB", "--dry-run"]) == 0
    expected = planner.whisper_cost("base", engine="ctranslate2", compute_type="int8_float16").instance_mib(16)
    assert expected != planner.whisper_cost("base").instance_mib(16)
    out = capsys.readouterr().out
    assert "whisper engine: ctranslate2 int8_float16" in out
    assert f"{expected:,.0f}" in out


@pytest.mark.parametrize("variant, used", [("ctranslate2 int8_float16", True), ("openai float16", False), (None, True)])
def test_a_whisper_measurement_is_used_for_its_own_engine_only(tmp_path, capsys, variant, used):
    repo = engine_repository(tmp_path, "int8_float16")
    recorded = json.loads(json.dumps(RECORDED))
    if variant:
        recorded["models"]["whisper"]["variant"] = variant  # perf.memory records it; older files lack it
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(recorded))
    assert export_main.main(["plan", "--repo", str(repo), "--gpu-memory", "16GB", "--dry-run", "--measured",
                             str(measured), "--models", "whisper"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["whisper", "0"])
    assert row.endswith("measured" if used else "estimate")
    assert ("measured openai float16, the repository serves ctranslate2 int8_float16: its estimates are used"
            in out) is not used
