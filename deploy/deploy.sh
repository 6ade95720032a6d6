#!/usr/bin/env bash
# `make deploy`: all four models on a GPU host, in the stock Triton 24.10 container (README, "Deploy on a GPU host").
#
#   1. prerequisites: Docker, Compose v2, the NVIDIA container runtime, a GPU that nvidia-smi sees
#   2. export the weights into model_repository/ (WEIGHTS=official downloads them; or a local .pt / folder)
#   3. build the image trident-triton:24.10 (deploy/Dockerfile)
#   4. build yolov8's TensorRT engine in that container (deploy/build_engine.sh; ENGINE=onnxruntime skips it and
#      serves yolov8 through onnxruntime with its TensorRT accelerator instead)
#   5. docker compose up -d, wait until the `triton` service is healthy
#   6. smoke-test every model through the `trident` CLI with the shipped samples, print the URLs
#
# Environment: WEIGHTS, WHISPER_SIZE, ENGINE (tensorrt | onnxruntime), MAX_BATCH, WAIT_SECONDS, PYTHON, DRY_RUN=1
# (print every command, run nothing). Ports and GPUs come from .env.
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=model_repository  # what docker-compose.yml mounts
WEIGHTS=${WEIGHTS:-official}
WHISPER_SIZE=${WHISPER_SIZE:-small}
ENGINE=${ENGINE:-tensorrt}
MAX_BATCH=${MAX_BATCH:-64}
WAIT_SECONDS=${WAIT_SECONDS:-900}
PYTHON=${PYTHON:-.venv/bin/python}
TRIDENT=${TRIDENT:-.venv/bin/trident}
DRY_RUN=${DRY_RUN:-}
set -a; . ./.env; set +a  # the ports and GPU ids compose uses
MIN_DRIVER=560  # Triton 24.10 is built on CUDA 12.6 (R535/R550 data-center drivers run it in compat mode)

run() {  # print a command, run it unless DRY_RUN
  printf '+ %s\n' "$*"
  if [ -z "$DRY_RUN" ]; then "$@"; fi
}
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'deploy: %s\n' "$*" >&2; exit 1; }
check() {  # check DESCRIPTION HINT COMMAND...: run a prerequisite check (printed only under DRY_RUN)
  local what=$1 hint=$2; shift 2
  printf '+ %s\n' "$*"
  if [ -z "$DRY_RUN" ] && ! "$@" >/dev/null 2>&1; then fail "$what: $hint"; fi
}

step "1/6 prerequisites"
check "docker not found" "install Docker Engine (https://docs.docker.com/engine/install/)" command -v docker
check "the Docker daemon does not answer" "start it (systemctl start docker) or add yourself to the docker group" \
  docker info
check "Docker Compose v2 not found" "install the docker-compose-plugin package (\`docker compose version\` must work)" \
  docker compose version
check "the NVIDIA container runtime is not registered with Docker" \
  "install the NVIDIA Container Toolkit and run \`nvidia-ctk runtime configure --runtime=docker\`, then restart Docker" \
  bash -c "docker info --format '{{json .Runtimes}}' | grep -q nvidia"
check "nvidia-smi sees no GPU" "install the NVIDIA driver (R$MIN_DRIVER+ for Triton 24.10) and check \`nvidia-smi -L\`" \
  bash -c "nvidia-smi -L | grep -q GPU"
printf '+ %s\n' "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
if [ -z "$DRY_RUN" ]; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  if [ "${driver%%.*}" -lt "$MIN_DRIVER" ]; then
    echo "warning: driver $driver is older than R$MIN_DRIVER: Triton 24.10 needs CUDA 12.6; only data-center GPUs" \
         "on R470/R525/R535/R545/R550 run it (forward compatibility)" >&2
  fi
fi
check "no virtual environment for export and the client" "run \`make venv\` first" test -x "$PYTHON"

step "2/6 export weights ($WEIGHTS) into $REPO"
export_hint="download failed? Pass local weights: make deploy WEIGHTS=/path/to/yolov8n.pt (yolo), or export each model by hand (python -m export <model> --weights <path>; see README)"
run "$PYTHON" -m export whisper --size "$WHISPER_SIZE" --weights "$WEIGHTS" --repo "$REPO" || fail "$export_hint"
run "$PYTHON" -m export easyocr --weights "$WEIGHTS" --repo "$REPO" || fail "$export_hint"

step "3/6 build the image trident-triton:24.10"
run docker compose build triton

step "4/6 yolov8 ($ENGINE)"
if [ "$ENGINE" = tensorrt ]; then
  # build_engine.sh prints its own commands (and runs nothing under DRY_RUN).
  printf '+ %s\n' "deploy/build_engine.sh  (make engines)"
  DRY_RUN="$DRY_RUN" REPO="$REPO" WEIGHTS="$WEIGHTS" MAX_BATCH="$MAX_BATCH" PYTHON="$PYTHON" deploy/build_engine.sh \
    | sed 's/^/    /'
elif [ "$ENGINE" = onnxruntime ]; then
  run "$PYTHON" -m export yolo --weights "$WEIGHTS" --flavour onnxruntime --kind gpu --max-batch-size "$MAX_BATCH" \
    --repo "$REPO" || fail "$export_hint"
else
  fail "ENGINE=$ENGINE: use tensorrt (trtexec engine) or onnxruntime (onnxruntime + its TensorRT accelerator)"
fi

step "5/6 start and wait until healthy (warm-up runs before READY; up to ${WAIT_SECONDS}s)"
run docker compose up -d
printf '+ %s\n' "until [ \"\$(docker inspect -f '{{.State.Health.Status}}' \$(docker compose ps -q triton))\" = healthy ]; do sleep 5; done"
if [ -z "$DRY_RUN" ]; then
  deadline=$((SECONDS + WAIT_SECONDS))
  while :; do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$(docker compose ps -q triton)" 2>/dev/null || echo missing)
    [ "$status" = healthy ] && break
    if [ "$status" = unhealthy ] || [ $SECONDS -ge $deadline ]; then
      docker compose logs --tail 60 triton >&2
      fail "the triton service is $status after $((WAIT_SECONDS - deadline + SECONDS))s (logs above; make logs)"
    fi
    sleep 5
  done
fi

step "6/6 smoke test through the trident CLI"
url="localhost:${GRPC_PORT:-8001}"
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
  HTTP     http://$host:${HTTP_PORT:-8000}/v2/health/ready
  gRPC     $host:${GRPC_PORT:-8001}   (trident --url $host:${GRPC_PORT:-8001} health)
  metrics  http://$host:${METRICS_PORT:-8002}/metrics
  logs: make logs    stop: make down
EOF
