"""Kubernetes manifests (deploy/kubernetes) and the scale-out simulation (perf/scaleout.py).

* Every overlay, and the fill kustomization, renders with real Kustomize (`kubectl kustomize`) and validates
  against the Kubernetes schemas bundled in `kubernetes-validate` (strict: unknown fields fail), oldest and
  newest bundled versions. The container's command line is the one `trident-serve` builds from the
  Deployment's environment; the fill Job's script is checked by its dry run.
* The simulation runs two real Triton servers behind a real nginx (gRPC per request), a real Prometheus and
  perf_analyzer: requests spread over the replicas, a killed replica is routed around with only its
  in-flight requests failing, and the Prometheus Adapter / KEDA queries, evaluated by Prometheus over the
  servers' live metrics, each return series during the load and cross the HPA's target by more than the
  controller's tolerance, then fall back when idle.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from perf import scaleout  # the repository root is on pytest's pythonpath (pytest.ini)

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
# Custom resources: kubernetes-validate has no schemas for them (checked field by field below instead).
CUSTOM_KINDS = {"PodMonitor", "ServiceMonitor", "ScaledObject"}
# A 30 s Whisper window: scaling must not react to one window's burst.
WHISPER_WINDOW_S = 30
# kube-prometheus-stack's Prometheus selects monitors labelled release=<its Helm release name>.
MONITOR_RELEASE = "kube-prometheus-stack"
FILL = KUBERNETES / "fill"


def kustomize(directory: Path) -> list[dict]:
    """The objects of the kustomization in `directory`, as `kubectl apply -k` would send them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in Kustomize) is needed to render deploy/kubernetes")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render(overlay: str) -> list[dict]:
    return kustomize(KUBERNETES / "overlays" / overlay)


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_overlays_exist():
    assert {"production", "keda"} <= set(OVERLAYS)


def validate(docs: list[dict], version: str) -> set[str]:
    """Validate every non-custom object strictly (raises ValidationError on any defect); the kinds validated."""
    validated = set()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        validated.add(doc["kind"])
    return validated


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    _, docs = rendered
    assert {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"} <= \
        validate(docs, version)


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_fill_job_validates_against_kubernetes_schemas(version):
    assert validate(kustomize(FILL), version) == {"Namespace", "PersistentVolumeClaim", "Job"}


def test_deployment_serves_the_trident_image_on_a_gpu(rendered):
    _, docs = rendered
    objects = by_kind(docs)
    deployment = objects[("Deployment", "trident")]
    assert deployment["metadata"]["namespace"] == "trident"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "trident-triton:24.10"
    # The image's entrypoint (nvidia_entrypoint.sh) stays: `args`, never `command`.
    assert "command" not in container and container["args"] == ["trident-serve"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                            "metrics": 8002}
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["memory"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # Triton's exit timeout plus the supervisor's stub clean-up (10 s) end before the kubelet's SIGKILL.
    assert int(env["EXIT_TIMEOUT_SECS"]) + 10 <= pod["terminationGracePeriodSeconds"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "dshm"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "trident-models"
    # The repository is read-only and nothing writable is mounted inside it: the tensorrt flavour (a finished
    # engine) needs no engine cache, so no pod rebuilds anything at start.
    assert mounts["/models"]["readOnly"] is True and env["MODEL_REPOSITORY"] == "/models"
    assert [m for m in mounts if m.startswith("/models/")] == []
    assert objects[("PersistentVolumeClaim", "trident-models")]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Every Service and monitor selects exactly the Deployment's pods (each gateway Service, its own gateway's pods).
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pods = {name: obj["spec"]["template"]["metadata"]["labels"] for (kind, name), obj in objects.items()
            if kind in ("Deployment", "StatefulSet")}
    for (kind, name), obj in objects.items():
        if kind == "Service":
            selected = [pod for pod, pod_labels in pods.items() if obj["spec"]["selector"].items() <= pod_labels.items()]
            assert selected == ([name] if name.startswith("trident-gateway") else ["trident"]), name
    headless = objects[("Service", "trident-grpc-headless")]["spec"]
    assert headless["clusterIP"] == "None" and [p["port"] for p in headless["ports"]] == [8001]
    monitor = objects[("PodMonitor", "trident")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_probes_leave_repairs_to_the_supervisor(rendered):
    _, docs = rendered
    (container,) = by_kind(docs)[("Deployment", "trident")]["spec"]["template"]["spec"]["containers"]
    startup, ready, live = (container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # load + warm-up on a cold node
    # Readiness is strict: the supervisor's check, every model READY; its HTTP calls share a budget below
    # the probe's own timeout (tests/test_supervisor_liveness.py times the whole command).
    command = ready["exec"]["command"]
    assert command[:4] == ["python3", "-m", "trident_serving.supervisor", "check"]
    budget = float(command[command.index("--timeout") + 1])
    assert budget + 1 <= ready["timeoutSeconds"], (budget, ready)
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10  # out of the Services within seconds
    # Liveness asks only whether the server answers: a reload (up to the supervisor's 15 min load timeout)
    # keeps it green, and a model the supervisor cannot repair ends the container through its exit status.
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_container_command_is_trident_serve_with_the_deployments_settings(rendered):
    """What the container runs: `trident-serve --print` with the Deployment's environment (the same entry point
    compose uses). Every setting it reads is set explicitly, and reaches tritonserver's flags."""
    from trident_serving import container as serving_container

    _, docs = rendered
    (spec,) = by_kind(docs)[("Deployment", "trident")]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in spec["env"]}
    assert set(serving_container.SETTINGS) <= set(env), set(serving_container.SETTINGS) - set(env)
    done = subprocess.run([sys.executable, "-m", "trident_serving.container", "--print", *spec["args"][1:]],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[1:4] == ["-m", "trident_serving.supervisor", "--"] and argv[4] == "tritonserver"
    flags = set(argv[5:])
    assert {"--model-repository=/models", "--model-control-mode=explicit", "--load-model=*",
            "--rate-limit=execution_count", f"--rate-limit-resource=gpu_memory_mib:{env['RATE_LIMIT_GPU_MEMORY_MIB']}",
            f"--exit-timeout-secs={env['EXIT_TIMEOUT_SECS']}",
            f"--pinned-memory-pool-byte-size={env['PINNED_POOL_BYTES']}", f"--log-verbose={env['LOG_VERBOSE']}",
            "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= flags, flags
    # The plan's pool (components/resources), not the container's unlimited default.
    assert env["RATE_LIMIT_GPU_MEMORY_MIB"] != serving_container.SETTINGS["RATE_LIMIT_GPU_MEMORY_MIB"].default


def test_monitors_carry_the_release_label_prometheus_selects(rendered):
    _, docs = rendered
    assert by_kind(docs)[("PodMonitor", "trident")]["metadata"]["labels"] == {"release": MONITOR_RELEASE}
    monitor = yaml.safe_load((KUBERNETES / "components" / "servicemonitor" / "servicemonitor.yaml").read_text())
    assert monitor["metadata"]["labels"] == {"release": MONITOR_RELEASE}


def test_monitor_release_label_is_set_by_an_overlay_patch(tmp_path):
    """Another Prometheus release: the overlay patch the README shows changes the label and nothing else."""
    (tmp_path / "kubernetes").symlink_to(KUBERNETES)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kustomization.yaml").write_text(
        "resources:\n  - ../kubernetes/overlays/production\npatches:\n  - target: {kind: PodMonitor, name: trident}\n"
        "    patch: |-\n      - {op: replace, path: /metadata/labels/release, value: monitoring}\n")
    patched, shipped = by_kind(kustomize(tmp_path / "mine")), by_kind(render("production"))
    assert patched.pop(("PodMonitor", "trident"))["metadata"]["labels"] == {"release": "monitoring"}
    shipped.pop(("PodMonitor", "trident"))
    assert patched == shipped


def test_fill_job_writes_the_claim_the_deployment_reads_on_a_gpu():
    objects = by_kind(kustomize(FILL))
    serving = by_kind(render("production"))
    # The same claim, created by either (the fill runs first).
    assert objects[("PersistentVolumeClaim", "trident-models")] == serving[("PersistentVolumeClaim", "trident-models")]
    job = objects[("Job", "trident-fill-models")]
    assert job["metadata"]["namespace"] == "trident"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "trident-fill:24.10" and "command" not in container
    assert container["args"] == ["/opt/trident/deploy/kubernetes/fill/fill-models.sh"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # the engine is built on the serving GPU type
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "trident-models"}  # read-write
    assert mounts["models"]["mountPath"] == env["REPO"] == "/models" and not mounts["models"].get("readOnly")
    assert env["TRIDENT_CACHE"].startswith(mounts["scratch"]["mountPath"] + "/")  # downloads stay out of the claim
    # Not a serving pod: no Service or disruption budget selects it.
    labels = job["spec"]["template"]["metadata"]["labels"]
    for (kind, name), obj in serving.items():
        if kind in ("Service", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]
            assert not selector.get("matchLabels", selector).items() <= labels.items(), name


def fill_dry_run(**env: str) -> str:
    done = subprocess.run([str(FILL / "fill-models.sh")], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fill_script_exports_builds_the_engine_and_plans_for_the_tensorrt_flavour():
    """The Job exports whisper and easyocr, then runs `make engines`' own script on its GPU (BUILD_IN=here: the
    same trtexec settings and engine.json as on a compose host, no second copy), then plans."""
    commands = [line[2:] for line in fill_dry_run(REPO="/models", MAX_BATCH="32").splitlines()
                if line.startswith("+ ")]
    trtexec = ("set -o pipefail; /usr/src/tensorrt/bin/trtexec --onnx=/models/yolov8/1/model.onnx "
               "--saveEngine=/models/yolov8/1/model.plan.partial --fp16 --minShapes=images:1x3x32x32 "
               "--optShapes=images:8x3x384x640 --maxShapes=images:32x3x640x640 "
               "--timingCacheFile=/models/yolov8/trt_cache/timing.cache --memPoolSize=workspace:4096 --skipInference "
               "2>&1 | tee /models/yolov8/trt_cache/trtexec.log && mv /models/yolov8/1/model.plan.partial "
               "/models/yolov8/1/model.plan && nvidia-smi --query-gpu=name,compute_cap,driver_version "
               "--format=csv,noheader -i 0 > /models/yolov8/trt_cache/gpu.txt")
    assert commands == [
        "python3 -m export whisper --size small --weights official --repo /models",
        "python3 -m export easyocr --weights official --repo /models",
        "python3 -m export yolo --weights official --size n --flavour onnxruntime --kind gpu --max-batch-size 32 "
        "--letterbox rect --repo /models",
        "mkdir -p /models/yolov8/trt_cache",
        f"bash -c {shlex.quote(trtexec)}",
        "python3 - /models/yolov8 32 8 trident-fill:24.10 rect images:1x3x32x32 images:8x3x384x640 "
        "images:32x3x640x640",
        "python3 -m export yolo --weights official --size n --flavour tensorrt --kind gpu --max-batch-size 32 "
        "--letterbox rect --repo /models",
        "python3 -m export plan --gpu-memory 81920MiB --repo /models",
    ], commands


def test_fill_image_requirements_resolve_for_python_310(tmp_path):
    """The fill image installs its pins with --no-deps on the serving image: they and the image's numpy must form
    a complete, consistent set for CPython 3.10 (pip's resolver adds nothing but typing-extensions, which torch
    brings into the image)."""
    pins = {}
    for line in (FILL / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            name, version = line.split("#")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    image = dict(line.split("==") for line in (ROOT / "deploy" / "requirements-image.txt").read_text().splitlines()
                 if line.startswith("numpy=="))
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--only-binary=:all:", "--python-version", "3.10", "--implementation", "cp",
                           "--platform", "manylinux_2_35_x86_64", "--platform", "manylinux_2_28_x86_64",
                           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                           "--target", str(tmp_path / "target"), "--report", str(report),
                           "-r", str(FILL / "requirements.txt"), f"numpy=={image['numpy']}"],
                          capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and re.search(r"NewConnectionError|Max retries exceeded|Temporary failure in name "
                                          r"resolution|Network is unreachable", done.stderr):
        pytest.skip(f"package index unreachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert {n: resolved.get(n) for n in pins} == pins, resolved
    assert set(resolved) - set(pins) <= {"numpy", "typing-extensions"}, resolved


def test_servicemonitor_scrapes_the_metrics_port():
    # components/servicemonitor is the alternative to the PodMonitor that the overlays include.
    docs = render("production")
    service = by_kind(docs)[("Service", "trident")]
    monitor = yaml.safe_load((KUBERNETES / "components" / "servicemonitor" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports


def test_autoscaler_scales_on_queue_metrics_without_flapping(rendered):
    overlay, docs = rendered
    objects = by_kind(docs)
    if overlay == "keda":
        scaled = objects[("ScaledObject", "trident")]["spec"]
        assert scaled["scaleTargetRef"]["name"] == "trident"
        assert {t["type"] for t in scaled["triggers"]} == {"prometheus"}
        assert all("nv_inference_queue_duration_us" in t["metadata"]["query"] or
                   "trident_whisper" in t["metadata"]["query"] for t in scaled["triggers"])
        behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert ("HorizontalPodAutoscaler", "trident") not in objects  # KEDA owns its HPA
    else:
        hpa = objects[("HorizontalPodAutoscaler", "trident")]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "trident"}
        targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]}
        # Every metric the HPA asks for is served by a Prometheus Adapter rule, and the targets the controller
        # reads are those the simulation measures against.
        assert set(targets) <= set(scaleout.adapter_rules()), targets
        assert targets == scaleout.hpa_targets() and "trident_queued_requests" in targets
        behavior = hpa["behavior"]
    # No reaction to one Whisper window: scale up only on a need seen for 2 windows, scale down much later.
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 2 * WHISPER_WINDOW_S
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 10 * WHISPER_WINDOW_S
    assert all(p["periodSeconds"] >= 60 for p in behavior["scaleDown"]["policies"])


def test_adapter_rules_average_over_two_whisper_windows():
    for rule in scaleout.adapter_rules().values():
        assert "[1m]" in rule.metrics_query, rule.name  # 60 s = two 30 s windows
        assert "<<.LabelMatchers>>" in rule.metrics_query and "<<.GroupBy>>" in rule.metrics_query


def test_client_accepts_balanced_grpc_targets():
    from trident import Client
    from trident.balancing import channel_args, headless_target, static_target

    target = headless_target("trident-grpc-headless")
    assert target == "dns:///trident-grpc-headless.trident.svc.cluster.local:8001"
    client = Client(target)
    assert (client.url, client.protocol) == (target, "grpc")
    assert ("grpc.lb_policy_name", "round_robin") in channel_args()
    assert static_target(["10.0.0.5:8001", "10.0.0.6:8001"]) == "ipv4:10.0.0.5:8001,10.0.0.6:8001"
    assert static_target(["[::1]:8001"]) == "ipv6:[::1]:8001"
    with pytest.raises(ValueError, match="protocol must be 'grpc'"):
        Client(target, protocol="http")
    assert Client("grpc://host").url == "host:8001"  # plain addresses unchanged


# -- the simulation ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simulation(repository, tmp_path_factory) -> scaleout.Report:
    """One run of perf/scaleout.py over two replicas serving the test repository's yolov8 and whisper."""
    options = scaleout.ScaleOutOptions(replicas=2, repository=repository,
                                       work_dir=tmp_path_factory.mktemp("scaleout"))
    report = scaleout.run(options, log=lambda line: print(line, flush=True))
    print(report)
    return report


@pytest.mark.yolo
@pytest.mark.whisper
def test_proxy_spreads_requests_across_replicas(simulation):
    counts = simulation.requests_per_replica
    assert len(counts) == 2 and min(counts.values()) > 0
    # nginx round-robins each gRPC request: the replicas' own counters agree within a factor of 1.5.
    assert min(counts.values()) * 1.5 >= max(counts.values()), counts
    assert simulation.perf_analyzer_throughput > 0


@pytest.mark.yolo
@pytest.mark.whisper
def test_proxy_balances_http_requests_of_one_connection(simulation):
    # One sequential HTTP client (one keep-alive connection to nginx): each request goes to the next replica.
    assert list(simulation.http_per_replica.values()) == [2, 2], simulation.http_per_replica


@pytest.mark.yolo
@pytest.mark.whisper
def test_client_side_round_robin_spreads_requests(simulation):
    # One channel's round_robin takes the next replica for every call: exactly in turn, as nginx does.
    assert list(simulation.client_side_sequential_per_replica.values()) == [2, 2], \
        simulation.client_side_sequential_per_replica
    # Under concurrency the trident client opens a channel per thread, each rotating from its own random start
    # (~1-2 requests per thread here): every replica serves, the exact split is chance.
    counts = simulation.client_side_per_replica
    assert len(counts) == 2 and min(counts.values()) > 0, counts


@pytest.mark.yolo
@pytest.mark.whisper
def test_killed_replica_is_routed_around(simulation):
    kill = simulation.kill
    # Only requests in flight when the replica died fail: none started after the kill, and every request
    # started after it succeeds on the survivor.
    assert kill["failed_started_after_kill"] == 0, kill
    assert 0 < kill["failed"] == kill["failed_in_flight_at_kill"] <= scaleout.ScaleOutOptions().concurrency, kill
    assert kill["started_after_kill"] > 0 and kill["succeeded_after_kill"] == kill["started_after_kill"], kill
    assert kill["survivor_requests"] >= kill["succeeded_after_kill"]
    assert all("Unavailable" in e for e in kill["errors"]), kill["errors"]


@pytest.mark.yolo
@pytest.mark.whisper
def test_autoscaling_metric_crosses_threshold_under_load_and_falls_back(simulation):
    metric = simulation.metric
    # Beyond the HPA controller's tolerance both ways: under load it scales up, idle it may scale down.
    assert metric["load_peak"] > metric["threshold"] * (1 + scaleout.HPA_TOLERANCE), metric
    assert metric["keda_load_peak"] > metric["keda_threshold"] * (1 + scaleout.HPA_TOLERANCE), metric
    assert metric["idle_before"] < metric["threshold"] * (1 - scaleout.HPA_TOLERANCE), metric
    # Within ScaleOutOptions.idle_timeout of the end.
    assert metric["idle_after"] < metric["threshold"] * (1 - scaleout.HPA_TOLERANCE), metric
    assert metric["seconds_above_threshold"] > 0


@pytest.mark.yolo
@pytest.mark.whisper
def test_every_autoscaling_query_returned_series_during_the_load(simulation):
    """Each Prometheus Adapter rule and KEDA trigger, as shipped, evaluated by Prometheus over the replicas'
    live metrics while perf_analyzer ran: a rule whose series or labels do not exist returns nothing."""
    assert set(simulation.adapter_results) == set(scaleout.adapter_rules())
    assert set(simulation.keda_results) == set(scaleout.keda_triggers())
    # Adapter rules answer per pod (by pod): one series per replica serving the model (whisper: the first);
    # KEDA's sums: one series.
    whisper_pods = sum("whisper" in models for models in simulation.served.values())
    assert whisper_pods >= 1
    assert {n: r["series"] for n, r in simulation.adapter_results.items()} == \
        {n: whisper_pods if "whisper" in n else simulation.replicas for n in scaleout.adapter_rules()}, \
        simulation.adapter_results
    assert {n: r["series"] for n, r in simulation.keda_results.items()} == \
        {n: 1 for n in scaleout.keda_triggers()}, simulation.keda_results


# --- issue 19: the gateway in front, Triton admitting only it and Prometheus, the admin key from a Secret ----------

def test_gateway_runs_unprivileged_and_scales_on_cpu(rendered):
    _, docs = rendered
    objects = by_kind(docs)
    gateway = objects[("Deployment", "trident-gateway")]["spec"]["template"]
    (container,) = gateway["spec"]["containers"]
    assert gateway["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"secretRef": {"name": "trident-admin-key"}} in container["envFrom"]
    assert objects[("Service", "trident-gateway")]["spec"]["selector"] == gateway["metadata"]["labels"]
    hpa = objects[("HorizontalPodAutoscaler", "trident-gateway")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "trident-gateway"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]


def test_jobs_are_served_by_one_gateway_with_a_volume_and_routed_to_it(rendered):
    """A job lives on the gateway that took it: the scaled replicas have jobs off, one StatefulSet replica serves
    them from a volume, and the Ingress sends the job paths to it and every other path to the scaled Service."""
    _, docs = rendered
    objects = by_kind(docs)
    scaled = objects[("Deployment", "trident-gateway")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "TRIDENT_GATEWAY_JOBS", "value": "0"} in scaled["env"]
    jobs = objects[("StatefulSet", "trident-gateway-jobs")]["spec"]
    assert jobs["replicas"] == 1
    (container,) = jobs["template"]["spec"]["containers"]
    assert not any(e["name"] == "TRIDENT_GATEWAY_JOBS" for e in container["env"])
    data = next(e["value"] for e in container["env"] if e["name"] == "TRIDENT_GATEWAY_DATA")
    (claim,) = jobs["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": data} in container["volumeMounts"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert jobs["template"]["spec"]["securityContext"]["fsGroup"] == 10001  # the image's user writes the volume
    # Each Service selects its own pods only.
    labels = {name: objects[kind]["spec"]["template"]["metadata"]["labels"]
              for name, kind in (("api", ("Deployment", "trident-gateway")),
                                 ("jobs", ("StatefulSet", "trident-gateway-jobs")))}
    for service, own, other in (("trident-gateway", "api", "jobs"), ("trident-gateway-jobs", "jobs", "api")):
        selector = objects[("Service", service)]["spec"]["selector"].items()
        assert selector <= labels[own].items() and not selector <= labels[other].items(), service
    (rule,) = objects[("Ingress", "trident-gateway")]["spec"]["rules"]
    routes = {(p["path"], p["pathType"]): p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert routes == {("/v1/analyze", "Prefix"): "trident-gateway-jobs", ("/v1/jobs", "Prefix"): "trident-gateway-jobs",
                      ("/", "Prefix"): "trident-gateway"}


def test_network_policy_admits_only_the_gateway_and_prometheus_to_triton(rendered):
    _, docs = rendered
    objects = by_kind(docs)
    triton = objects[("Deployment", "trident")]["spec"]["template"]
    gateway_labels = objects[("Deployment", "trident-gateway")]["spec"]["template"]["metadata"]["labels"]
    jobs_labels = objects[("StatefulSet", "trident-gateway-jobs")]["spec"]["template"]["metadata"]["labels"]
    policy = objects[("NetworkPolicy", "trident-triton-ingress")]["spec"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= triton["metadata"]["labels"].items()
    assert not selected.items() <= gateway_labels.items(), "the policy would select the gateway's pods"
    (gateway_rule, prometheus_rule) = policy["ingress"]
    (source,) = gateway_rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert source["podSelector"]["matchLabels"].items() <= jobs_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= triton["metadata"]["labels"].items()
    assert [p["port"] for p in gateway_rule["ports"]] == [8001]
    assert prometheus_rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert [p["port"] for p in prometheus_rule["ports"]] == [8002]
    (container,) = triton["spec"]["containers"]
    assert {"secretRef": {"name": "trident-admin-key"}} in container["envFrom"]
