#!/usr/bin/env bash
# `make deploy`: all four models on a GPU host, in the stock Triton 24.10 container (README, "Deploy on a GPU host").
#
#   1. prerequisites: Docker, Compose v2, the NVIDIA Container Toolkit, the driver (R570+) and the GPUs that
#      docker-compose.yml reserves (compute capability 7.5 to 9.0)
#   2. export Whisper's and EasyOCR's weights into model_repository/
#   3. build the image trident-triton:24.10 (deploy/Dockerfile)
#   4. yolov8: its TensorRT engine, built in that container (deploy/build_engine.sh); ENGINE=onnxruntime instead
#      serves it through onnxruntime with its TensorRT accelerator
#   5. secrets (.secrets/, git-ignored, made once): Triton's admin key, a first gateway API key; docker compose
#      up -d, wait until the `triton` service is healthy (deploy/wait_healthy.sh)
#   6. smoke-test every model through the `trident` CLI with the shipped samples, print the URLs
#
# Environment: WEIGHTS (official | synthetic: every model's default), YOLO_WEIGHTS, WHISPER_WEIGHTS,
# EASYOCR_WEIGHTS (official | synthetic | a local file or folder for that model), WHISPER_SIZE, ENGINE
# (tensorrt | onnxruntime), MAX_BATCH, LETTERBOX (rect | square: detect's letterbox), PYTHON, TRIDENT, DRY_RUN=1 (print every command, run nothing),
# CHECK_ONLY=1 (step 1 only: is this host ready?).
# .env fills in what the environment leaves unset (ports, START_PERIOD_SECONDS, the server's settings).
set -euo pipefail
cd "$(dirname "$0")/.."

while IFS= read -r line; do  # the environment first, .env for what it leaves unset (as docker compose does)
  case $line in '' | '#'*) continue ;; esac
  name=${line%%=*}
  if [ -z "${!name+set}" ]; then export "${line?}"; fi
done <.env

REPO=model_repository  # what docker-compose.yml mounts
WEIGHTS=${WEIGHTS:-official}
WHISPER_SIZE=${WHISPER_SIZE:-small}
ENGINE=${ENGINE:-tensorrt}
MAX_BATCH=${MAX_BATCH:-64}
LETTERBOX=${LETTERBOX:-rect}
PYTHON=${PYTHON:-.venv-deploy/bin/python}
TRIDENT=${TRIDENT:-.venv-deploy/bin/trident}
# torch 2.10 in the image is built with CUDA 12.8: R570+ runs it natively; an older driver only through CUDA's
# minor-version compatibility, which excludes PTX JIT (NVRTC-compiled kernels, cuDNN runtime fusion).
MIN_DRIVER=570
# TensorRT 10.5 in the image (trtexec and onnxruntime's TensorRT accelerator) dropped Volta (7.0) and predates
# Blackwell (10.0+, TensorRT 10.8): Turing (7.5) to Hopper (9.0).
MIN_CAPABILITY=7.5
MAX_CAPABILITY=9.0

. deploy/common.sh
step() { printf '\n== %s\n' "$*"; }
check() {  # check DESCRIPTION HINT COMMAND...: run a prerequisite check, failing with what to do
  local what=$1 hint=$2; shift 2
  printf '+ %s\n' "$(quoted "$@")"
  if [ -z "$DRY_RUN" ] && ! "$@" >/dev/null 2>&1; then fail "$what: $hint"; fi
}
tenths() { echo $((${1%.*} * 10 + ${1#*.})); }  # compute capability 8.6 -> 86

case $WEIGHTS in
  official | synthetic) ;;
  *) fail "WEIGHTS=$WEIGHTS: WEIGHTS is official or synthetic (for every model); give local weights per model:" \
       "YOLO_WEIGHTS=<yolov8 .pt>, WHISPER_WEIGHTS=<whisper .pt>, EASYOCR_WEIGHTS=<folder of EasyOCR .pth files>" ;;
esac
[[ $START_PERIOD_SECONDS =~ ^[0-9]+$ ]] || fail "START_PERIOD_SECONDS=$START_PERIOD_SECONDS: a whole number of seconds"
YOLO_WEIGHTS=${YOLO_WEIGHTS:-$WEIGHTS}
WHISPER_WEIGHTS=${WHISPER_WEIGHTS:-$WEIGHTS}
EASYOCR_WEIGHTS=${EASYOCR_WEIGHTS:-$WEIGHTS}
case $ENGINE in
  tensorrt | onnxruntime) ;;
  *) fail "ENGINE=$ENGINE: use tensorrt (trtexec engine) or onnxruntime (onnxruntime + its TensorRT accelerator)" ;;
esac

step "1/6 prerequisites"
check "docker not found" "install Docker Engine (https://docs.docker.com/engine/install/)" command -v docker
check "the Docker daemon does not answer" "start it (systemctl start docker) or add yourself to the docker group" \
  docker info
check "Docker Compose v2 not found" "install the docker-compose-plugin package (\`docker compose version\` must work)" \
  docker compose version
# Docker serves the GPU requests of docker-compose.yml through this hook (no `nvidia` runtime needs registering).
check "the NVIDIA Container Toolkit is not installed" \
  "install it (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/), then restart Docker" \
  command -v nvidia-container-runtime-hook
check "no virtual environment for export and the client" "run \`make deploy\` (it creates .venv-deploy)" \
  test -x "$PYTHON"
# The GPU ids that docker-compose.yml reserves, from Compose's own reading of the file.
gpu_ids_command=(docker compose config --format json)
printf '+ %s | %s\n' "$(quoted "${gpu_ids_command[@]}")" "$(quoted "$PYTHON") -c <the triton service's device_ids>"
gpu_query=(nvidia-smi --query-gpu=index,name,compute_cap,driver_version --format=csv,noheader)
if [ -n "$DRY_RUN" ]; then
  printf '+ %s -i <those ids>\n' "$(quoted "${gpu_query[@]}")"
else
  gpu_ids=$("${gpu_ids_command[@]}" | "$PYTHON" -c 'import json, sys
devices = json.load(sys.stdin)["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
print(",".join(i for d in devices for i in d.get("device_ids") or []))') || fail "docker compose config failed"
  gpus=$("${gpu_query[@]}" -i "$gpu_ids") ||
    fail "nvidia-smi does not show GPU(s) $gpu_ids that docker-compose.yml reserves: install the NVIDIA driver" \
      "(R$MIN_DRIVER+) and check \`nvidia-smi -L\`, or edit device_ids in docker-compose.yml"
  printf '%s\n' "$gpus"
  while IFS=, read -r index name capability driver; do
    name=${name# } capability=${capability// /} driver=${driver// /}
    if [ "$(tenths "$capability")" -lt "$(tenths $MIN_CAPABILITY)" ] ||
      [ "$(tenths "$capability")" -gt "$(tenths $MAX_CAPABILITY)" ]; then
      fail "GPU $index ($name) has compute capability $capability: the 24.10 image's TensorRT 10.5 runs on" \
        "$MIN_CAPABILITY (Turing) to $MAX_CAPABILITY (Hopper) only; reserve another GPU in docker-compose.yml"
    fi
    if [ "${driver%%.*}" -lt "$MIN_DRIVER" ]; then
      fail "driver $driver is older than R$MIN_DRIVER: the image's torch 2.10 uses CUDA 12.8; upgrade the" \
        "driver (every supported NVIDIA branch, e.g. R580, qualifies)"
    fi
  done <<<"$gpus"
fi
if [ -n "${CHECK_ONLY:-}" ]; then echo "deploy: the prerequisites are met"; exit 0; fi

step "2/6 export Whisper ($WHISPER_WEIGHTS) and EasyOCR ($EASYOCR_WEIGHTS) into $REPO"
export_hint="download failed? Pass local weights per model (YOLO_WEIGHTS=, WHISPER_WEIGHTS=, EASYOCR_WEIGHTS=),
or export each model by hand (README, Export)"
run "$PYTHON" -m export whisper --size "$WHISPER_SIZE" --weights "$WHISPER_WEIGHTS" --repo "$REPO" ||
  fail "$export_hint"
run "$PYTHON" -m export easyocr --weights "$EASYOCR_WEIGHTS" --repo "$REPO" || fail "$export_hint"

step "3/6 build the image trident-triton:24.10"
run docker compose build triton

step "4/6 yolov8 ($ENGINE, weights $YOLO_WEIGHTS)"
if [ "$ENGINE" = tensorrt ]; then
  # build_engine.sh prints its own commands (and runs nothing under DRY_RUN).
  DRY_RUN="$DRY_RUN" REPO="$REPO" YOLO_WEIGHTS="$YOLO_WEIGHTS" MAX_BATCH="$MAX_BATCH" LETTERBOX="$LETTERBOX" \
    PYTHON="$PYTHON" deploy/build_engine.sh | sed 's/^/    /'
else
  run "$PYTHON" -m export yolo --weights "$YOLO_WEIGHTS" --flavour onnxruntime --kind gpu \
    --max-batch-size "$MAX_BATCH" --letterbox "$LETTERBOX" --repo "$REPO" || fail "$export_hint"
fi

# Docker declares the service unhealthy at most 3 failed checks (10 s apart, 5 s each) after the start period.
wait_seconds=$((START_PERIOD_SECONDS + 60))
step "5/6 start and wait until healthy (every model loads and warms up first; up to ${wait_seconds}s)"
# TRIDENT_ADMIN_KEY restricts Triton's model-repository API (README "Security"); the services read .secrets/admin.env,
# the smoke test below (trident health) the exported variable.
# Each made once (printed always, so that a dry run shows the same plan on every host), kept across deploys.
printf '+ %s\n' "test -s .secrets/admin.env || <write TRIDENT_ADMIN_KEY=<32 random bytes, hex> into it>"
if [ -z "$DRY_RUN" ] && [ ! -s .secrets/admin.env ]; then
  (umask 077 && mkdir -p .secrets &&
    printf 'TRIDENT_ADMIN_KEY=%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >.secrets/admin.env)
fi
if [ -z "$DRY_RUN" ]; then export "$(grep '^TRIDENT_ADMIN_KEY=' .secrets/admin.env)"; fi
# the gateway's first API key, shown once (more: python -m trident_gateway keys create NAME --keys <that file>)
keys_command=("$PYTHON" -m trident_gateway keys create deploy --keys .secrets/gateway-keys.json)
printf '+ test -s .secrets/gateway-keys.json || %s\n' "$(quoted "${keys_command[@]}")"
if [ -z "$DRY_RUN" ] && [ ! -s .secrets/gateway-keys.json ]; then (umask 077 && "${keys_command[@]}"); fi
run docker compose build api
run docker compose up -d
run deploy/wait_healthy.sh triton "$wait_seconds"

step "6/6 smoke test through the trident CLI"
url="localhost:$GRPC_PORT"
# ultralytics' bundled bus.jpg, located without importing ultralytics (slow)
assets=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('ultralytics').submodule_search_locations[0])" \
  2>/dev/null || echo "<ultralytics>")/assets/bus.jpg
run "$TRIDENT" --url "$url" health
run "$TRIDENT" --url "$url" detect "$assets"
run "$TRIDENT" --url "$url" transcribe --temperature 0 tests/data/speech_en.wav tests/data/speech_ko.mp3
run "$TRIDENT" --url "$url" ocr tests/data/ocr_en_sign.jpg tests/data/ocr_ko_mixed.png

host=$(hostname -f 2>/dev/null || hostname)
cat <<EOF

Trident is up$([ -n "$DRY_RUN" ] && echo " (dry run: nothing was run)"):
  REST API http://$host:${API_PORT:-8080}/docs   (the published service; Bearer key above)
  Triton, on ${TRITON_BIND:-127.0.0.1} (README "Security"):
  HTTP     http://$host:$HTTP_PORT/v2/health/ready
  gRPC     $host:$GRPC_PORT   (trident --url $host:$GRPC_PORT health)
  metrics  http://$host:$METRICS_PORT/metrics
  logs: make logs    stop: make down
EOF
