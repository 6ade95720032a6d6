"""Kubernetes manifests (deploy/kubernetes) and the scale-out simulation (perf/scaleout.py).

* Every overlay renders with real Kustomize (`kubectl kustomize`) and validates against the Kubernetes
  schemas bundled in `kubernetes-validate` (strict: unknown fields fail), oldest and newest bundled versions.
* The simulation runs two real Triton servers behind a real nginx (gRPC per request), a real Prometheus and
  perf_analyzer: requests spread over the replicas, a killed replica is routed around with only its
  in-flight requests failing, and the Prometheus Adapter / KEDA queries, evaluated by Prometheus over the
  servers' live metrics, cross the HPA's target under load and fall back when idle.
"""
from __future__ import annotations

import shutil
import subprocess
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


def render(overlay: str) -> list[dict]:
    """The overlay's objects as `kubectl apply -k` would send them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in Kustomize) is needed to render deploy/kubernetes")
    out = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_overlays_exist():
    assert {"production", "keda"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", ["1.25.0", kubernetes_validate.latest_version()])
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    _, docs = rendered
    validated = set()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError on any defect
        validated.add(doc["kind"])
    assert {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"} <= validated


def test_deployment_serves_the_trident_image_on_a_gpu(rendered):
    _, docs = rendered
    objects = by_kind(docs)
    deployment = objects[("Deployment", "trident")]
    assert deployment["metadata"]["namespace"] == "trident"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "trident-triton:24.10"
    assert container["command"][:5] == ["python3", "-m", "trident_serving.supervisor", "--", "tritonserver"]
    assert {"--model-repository=/models", "--model-control-mode=explicit", "--load-model=*"} <= set(container["command"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                            "metrics": 8002}
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["memory"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}, probe
    assert container["livenessProbe"]["exec"]["command"][:4] == ["python3", "-m", "trident_serving.supervisor", "check"]
    # Liveness gives up only after readiness has failed for minutes; readiness reacts within seconds.
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60 > ready["periodSeconds"] * ready["failureThreshold"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "dshm"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "trident-models"
    assert mounts["/models"]["readOnly"] is True
    assert ("PersistentVolumeClaim", "trident-models") in objects
    # Every Service and monitor selects exactly the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for (kind, name), obj in objects.items():
        if kind == "Service":
            assert obj["spec"]["selector"].items() <= labels.items(), name
    headless = objects[("Service", "trident-grpc-headless")]["spec"]
    assert headless["clusterIP"] == "None" and [p["port"] for p in headless["ports"]] == [8001]
    monitor = objects[("PodMonitor", "trident")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


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
        names = {m["pods"]["metric"]["name"] for m in hpa["metrics"]}
        # Every metric the HPA asks for is served by a Prometheus Adapter rule.
        assert names <= set(scaleout.adapter_rules()), names
        assert "trident_queued_requests" in names
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
    """One run of perf/scaleout.py over two replicas serving the test repository's yolov8."""
    options = scaleout.ScaleOutOptions(replicas=2, repository=repository,
                                       work_dir=tmp_path_factory.mktemp("scaleout"))
    report = scaleout.run(options, log=lambda line: print(line, flush=True))
    print(report)
    return report


@pytest.mark.yolo
def test_proxy_spreads_requests_across_replicas(simulation):
    counts = simulation.requests_per_replica
    assert len(counts) == 2 and min(counts.values()) > 0
    # nginx round-robins each gRPC request: the replicas' own counters agree within a factor of 1.5.
    assert min(counts.values()) * 1.5 >= max(counts.values()), counts
    assert simulation.perf_analyzer_throughput > 0


@pytest.mark.yolo
def test_proxy_balances_http_requests_of_one_connection(simulation):
    # One sequential HTTP client (one keep-alive connection to nginx): each request goes to the next replica.
    assert list(simulation.http_per_replica.values()) == [2, 2], simulation.http_per_replica


@pytest.mark.yolo
def test_client_side_round_robin_spreads_requests(simulation):
    counts = simulation.client_side_per_replica
    assert len(counts) == 2 and min(counts.values()) > 0, counts


@pytest.mark.yolo
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
def test_autoscaling_metric_crosses_threshold_under_load_and_falls_back(simulation):
    metric = simulation.metric
    assert metric["idle_before"] < metric["threshold"] < metric["load_peak"], metric
    assert metric["idle_after"] < metric["threshold"], metric  # within ScaleOutOptions.idle_timeout of the end
    assert metric["seconds_above_threshold"] > 0
    assert metric["hpa_desired_replicas_at_peak"] > simulation.replicas
    assert metric["keda_load_peak"] > metric["keda_threshold"], metric
    # Every Prometheus Adapter and KEDA query was evaluated by Prometheus over the live series.
    assert set(simulation.adapter_queries) == set(scaleout.adapter_rules())
    assert set(simulation.keda_queries) == set(scaleout.keda_triggers())
