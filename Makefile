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

.PHONY: venv system-deps export serve stop status demo test clean
.DEFAULT_GOAL := demo

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt serving/pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e serving -e client
	touch $@

# Debian packages the tests need (one per line below, with why):
#   libb64-0d   perf_analyzer (shipped in the tritonclient wheel)
SYSTEM_PACKAGES := libb64-0d
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

# The main job on this machine: official weights when they can be downloaded, else synthetic ones
# (random weights of the same architectures: the pipeline is real, the answers are not meaningful).
demo: venv
	@for model in "yolo --flavour python" "whisper --size $(WHISPER_SIZE)" easyocr; do \
	  $(PY) -m export $$model --weights official --repo $(REPO) || { \
	    echo ">>> no official weights for $${model%% *} here: using synthetic (random) weights instead"; \
	    $(PY) -m export $$model --weights synthetic --repo $(REPO) || exit 1; }; \
	done
	$(PY) -m trident_serving.server start $(SERVER_ARGS)
	@status=0; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) health || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) detect $$($(PY) -c "from ultralytics.utils import ASSETS; print(*sorted(ASSETS.glob('*.jpg')))") || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) transcribe --temperature 0 tests/data/speech_en.wav tests/data/speech_ko.mp3 || status=1; \
	$(VENV)/bin/trident --url localhost:$(GRPC_PORT) ocr tests/data/ocr_en_sign.jpg tests/data/ocr_ko_mixed.png || status=1; \
	$(PY) -m trident_serving.server stop; exit $$status

test: venv system-deps
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf .run $(REPO)/export.json $(REPO)/yolov8/config.pbtxt $(REPO)/yolov8/1/model.onnx
