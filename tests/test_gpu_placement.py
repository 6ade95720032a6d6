"""Placement and budgets (trident_serving.gpu), whisper's fp16 weights, and GPU instances on a GPU-less server.

Everything runs on any host except the GPU-less behaviours (`gpu_less`), which a GPU host skips."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from export.plan import write_config
from trident_serving import gpu, plan as planner, server

gpu_less = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a host without a GPU")
# torch.cuda.get_arch_list() of real builds: torch 2.10.0+cu128, 2.11.0+cu128 and 2.11.0+cu126 as printed in
# pytorch/pytorch#182250 (2.11's CUDA 12.8 build dropped Volta), and this project's torch 2.14.1+cu130 (printed
# on the CPU machine: the list is the build's, no GPU needed).
ARCHS_210_CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
ARCHS_211_CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
ARCHS_211_CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
ARCHS_214_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]

ECHO_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: {kind} rate_limiter {{ resources [ {{ name: "gpu_memory_mib" count: 100 }} ] }} }} ]
parameters {{ key: "gpu_memory_mib" value {{ string_value: "1000" }} }}
"""
# A tiny Python model placed by trident_serving.triton like every model of the repository.
ECHO_MODEL = """import triton_python_backend_utils as pb_utils
from trident_serving import triton


class TritonPythonModel:
    def initialize(self, args):
        self.placement = triton.placement(args)

    def execute(self, requests):
        return triton.serve_batch(requests, lambda r: pb_utils.get_input_tensor_by_name(r, "X").as_numpy(), self.run)

    def run(self, items):
        if any((x < 0).any() for x in items):  # stands in for a batch that outgrows its gpu_memory_mib budget
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 2)]) for x in items]
"""


def test_cpu_instance_stays_on_the_cpu():
    assert gpu.place("CPU", 0, 1000) == gpu.Placement("cpu", None)


@gpu_less
def test_gpu_instance_without_cuda_refuses_clearly():
    with pytest.raises(gpu.NoGPU, match=r"whisper_0_0: this instance is KIND_GPU \(device 0\) but CUDA is not usable"):
        gpu.place("GPU", "0", 1000, model="whisper_0_0")


@pytest.mark.parametrize("archs, capability, refused", [
    # torch 2.10 cu128 (the serving image's): Volta to Blackwell; a minor version runs its major's older code
    (ARCHS_210_CU128, (6, 1), "is sm_61 (compute capability 6.1); this PyTorch has kernels for sm_70..sm_120"),
    (ARCHS_210_CU128, (7, 0), None), (ARCHS_210_CU128, (8, 7), None), (ARCHS_210_CU128, (8, 9), None),
    (ARCHS_210_CU128, (10, 3), None), (ARCHS_210_CU128, (12, 1), None),
    (ARCHS_211_CU128, (7, 0), "is sm_70 (compute capability 7.0); this PyTorch has kernels for sm_75..sm_120"),
    (ARCHS_211_CU128, (7, 5), None),
    # a CUDA 12.6 build has neither Blackwell code nor PTX to compile for it
    (ARCHS_211_CU126, (12, 0), "is sm_120 (compute capability 12.0); this PyTorch has kernels for sm_50..sm_90"),
    (ARCHS_211_CU126, (10, 0), "is sm_100"), (ARCHS_211_CU126, (3, 7), "is sm_37"), (ARCHS_211_CU126, (6, 1), None),
    (ARCHS_214_CU130, (6, 0), "kernels for sm_75..sm_120"), (ARCHS_214_CU130, (9, 0), None),
    # PTX is compiled by the driver for newer GPUs, never older ones; sm_90a code runs on 9.0 only
    (["sm_80", "compute_80"], (9, 0), None),
    (["sm_80", "compute_80"], (7, 5), "kernels for sm_80..sm_80 (and PTX for compute_80+)"),
    (["sm_90a"], (9, 0), None), (["sm_90a"], (10, 0), "is sm_100"), (["sm_100f"], (10, 3), None),
    # a ROCm build lists gfx targets: nothing to judge here
    (["gfx90a", "gfx942"], (9, 4), None), ([], (6, 1), None),
])
def test_gpu_without_kernels_in_this_pytorch_is_refused(archs, capability, refused):
    """Compute capability against torch.cuda.get_arch_list(): a 6.x card passes is_available() but every kernel of
    a 7.0+ build fails on it ("no kernel image is available"), so placement refuses it first."""
    reason = gpu.unsupported_gpu(capability, archs)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_budget_arithmetic():
    assert gpu.parse_budget(None) is None and gpu.parse_budget(" ") is None
    assert gpu.parse_budget("2048") == 2048
    for bad in ("2GiB", "-1", "0"):
        with pytest.raises(ValueError, match="gpu_memory_mib"):
            gpu.parse_budget(bad)
    assert gpu.memory_fraction(8192, 80 * 1024 * gpu.MIB) == pytest.approx(0.1)
    assert gpu.memory_fraction(10**6, 16 * 1024 * gpu.MIB) == 1.0


def test_onnxruntime_on_the_instance_device_within_budget():
    placement = gpu.Placement("cuda:1", 512)
    providers = gpu.onnx_providers(placement, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": 1, "gpu_mem_limit": 512 * gpu.MIB,
                                                      "arena_extend_strategy": "kSameAsRequested"})
    with pytest.raises(gpu.NoGPU, match="install onnxruntime-gpu"):
        gpu.onnx_providers(placement, ["CPUExecutionProvider"])
    assert gpu.onnx_providers(gpu.Placement(), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_out_of_memory_becomes_a_clear_budget_error():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    error = gpu.budget_error(oom, gpu.Placement("cuda:0", 4096))
    assert isinstance(error, gpu.BudgetExceeded)
    assert "cuda:0" in str(error) and "gpu_memory_mib budget of 4096 MiB" in str(error)
    assert "Tried to allocate 2.00 GiB" in str(error)
    assert gpu.budget_error(ValueError("x")) is None


def test_whisper_fp16_weights_give_the_same_numbers(tmp_path):
    """fp16 weights stored once == whisper's fp32 weights cast per forward (its fp16 path), at half the memory."""
    from whisper.model import ModelDimensions, Whisper

    from export.whisper import DIM_NAMES, DIMS

    torch.manual_seed(0)
    reference = Whisper(ModelDimensions(**dict(zip(DIM_NAMES, DIMS["tiny"]))))
    # whisper leaves this parameter uninitialised (torch.empty): garbage or NaN would make the comparison vacuous
    torch.nn.init.normal_(reference.decoder.positional_embedding, std=0.01)
    for p in reference.parameters():  # official checkpoints hold fp16 values: load_model widens them to fp32
        p.data = p.data.half().float()
    half = gpu.keep_fp16(copy.deepcopy(reference))
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(half) < 0.51 * size(reference)
    mel = torch.randn(1, 80, 3000).half()
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 400, 401]])
    with torch.no_grad():
        features = reference.encoder(mel)
        assert torch.equal(features, half.encoder(mel))
        logits = reference.decoder(tokens, features)
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, half.decoder(tokens, features))


def write_echo(repo: Path, name: str, kind: str) -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(ECHO_MODEL)
    config = repo / name / "config.pbtxt"
    config.write_text(ECHO_CONFIG.format(name=name, kind=kind))
    return config


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """A server (explicit model control, rate limiter on) over echo models of each kind and a planned one;
    yields (its HTTP client, its options, the planned config)."""
    tmp = tmp_path_factory.mktemp("echo")
    repo = tmp / "repo"
    write_echo(repo, "on_cpu", "KIND_CPU")
    write_echo(repo, "on_gpu", "KIND_GPU")
    planned = write_echo(repo, "planned", "KIND_AUTO")
    cost = planner.ModelCost("planned", 10, 20, 5, 8, rate_limited=True)
    plan = planner.make_plan(planner.Costs({"planned": cost}), 4096, ["planned"])
    write_config(planned, plan, "planned")
    options = server.on_free_ports(repository=repo, run_dir=tmp / "run", model_control="explicit",
                                   rate_limit_resources=("gpu_memory_mib:150",))
    server.start(options)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{options.http_port}")
        client.load_model("on_cpu")
        yield client, options, planned
    finally:
        server.stop(options)


@gpu_less
def test_gpu_instance_is_unavailable_and_the_others_stay_ready(echo_server):
    """On a GPU-less machine a KIND_GPU model fails to load with a clear message; the others stay ready."""
    client, _, _ = echo_server
    with pytest.raises(InferenceServerException, match="kind KIND_GPU but no GPUs are available"):
        client.load_model("on_gpu")
    assert client.is_server_live()  # "ready" means every model ready: not with on_gpu down
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["on_gpu"]["state"] == "UNAVAILABLE"
    assert "no GPUs are available" in index["on_gpu"]["reason"]
    assert client.is_model_ready("on_cpu")


def test_planned_config_serves_and_out_of_memory_fails_alone(echo_server):
    """A planned config (KIND_GPU, gpus, rate limiter, budget) is accepted by Triton (loaded with its kind
    overridden to run on any host), and a batch out of (budgeted) GPU memory fails alone with a clear error."""
    client, options, planned = echo_server
    config = text_format.Parse(planned.read_text(), model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for group in config.instance_group:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        del group.gpus[:]
    client.load_model("planned", config=json_format.MessageToJson(config))
    assert client.is_model_ready("on_cpu") and client.is_model_ready("planned")
    for name in ("on_cpu", "planned"):
        x = httpclient.InferInput("X", [3, 1], "FP32")
        x.set_data_from_numpy(torch.arange(3, dtype=torch.float32).reshape(3, 1).numpy())
        assert client.infer(name, [x]).as_numpy("Y").ravel().tolist() == [0.0, 2.0, 4.0]
    # Out of (budgeted) GPU memory: that request fails with a clear UNAVAILABLE error, the stub serves on.
    x = httpclient.InferInput("X", [1, 1], "FP32")
    x.set_data_from_numpy(np.array([[-1.0]], np.float32))
    with pytest.raises(InferenceServerException, match="GPU memory exhausted .* re-plan with") as error:
        client.infer("on_cpu", [x])
    assert "Tried to allocate 2.00 GiB" in str(error.value)
    x.set_data_from_numpy(np.array([[3.0]], np.float32))
    assert client.infer("on_cpu", [x]).as_numpy("Y").ravel().tolist() == [6.0]
    log = options.log_file.read_text()
    assert "| rate_limit " in log and "EXEC_COUNT" in log  # the server's option table: limiter on


@gpu_less
def test_memory_measurement_refuses_without_a_gpu(capsys):
    from perf import memory

    assert memory.main(["--out", "/nonexistent/memory.json"]) == 2
    assert "no NVIDIA GPU here" in capsys.readouterr().err


def test_memory_measurement_stages_one_plain_gpu_instance(tmp_path):
    from perf import memory

    repo = tmp_path / "repo"
    config = write_echo(repo, "echo", "KIND_CPU")
    memory.stage(repo, tmp_path / "scratch", ["echo"])
    staged = text_format.Parse((tmp_path / "scratch" / "echo" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert [(g.count, g.kind, list(g.gpus), len(g.rate_limiter.resources)) for g in staged.instance_group] == \
        [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU, [0], 0)]
    assert "gpu_memory_mib" not in staged.parameters and "gpu_memory_mib" in config.read_text()
    assert memory.max_batch(tmp_path / "scratch" / "echo" / "config.pbtxt") == 8


def test_memory_arithmetic_on_recorded_counters():
    """perf.memory's split of NVML + PyTorch numbers into context, weights and activations (recorded values)."""
    from perf import memory

    counters = {"loaded": {"allocated_mib": 464.0, "reserved_mib": 480.0},
                "batch1": {"peak_allocated_mib": 710.0, "reserved_mib": 760.0},
                "batch16": {"peak_allocated_mib": 2480.0, "reserved_mib": 2560.0}}
    entry = memory.entry((1006.0, 1290.0, 3086.0), counters, 16, 526.0)
    assert entry["context_mib"] == 526.0 and entry["weights_mib"] == 464.0
    assert entry["activation_per_item_mib"] == pytest.approx(118.0)
    assert entry["activation_base_mib"] == pytest.approx(128.0)
    nvml_only = memory.entry((1006.0, 1290.0, 3086.0), {}, 16, 526.0)  # onnxruntime: no framework counters
    # 526 context, 480 at load; (3086 - 1290) MiB more for 15 more items
    assert nvml_only["weights_mib"] == 480.0 and nvml_only["activation_per_item_mib"] == pytest.approx(1796 / 15, abs=0.01)
    assert planner.ModelCost("w", **{k: entry[k] for k in ("weights_mib", "activation_base_mib",
                                                           "activation_per_item_mib", "max_batch")}) \
        .instance_mib(16) == pytest.approx(464 + 128 + 118 * 16 + planner.STUB_CONTEXT_MIB)
