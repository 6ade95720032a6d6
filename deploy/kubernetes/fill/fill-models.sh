#!/usr/bin/env bash
# The trident-fill-models Job (deploy/kubernetes/fill/job.yaml): writes the model repository that every serving
# pod mounts read-only, on a GPU node of the type that will serve it, in the trident-fill image (the serving
# image plus the exporters).
#   1. export whisper and easyocr into $REPO, as `make deploy` does;
#   2. deploy/build_engine.sh (`make engines`) with BUILD_IN=here: yolov8's model.onnx, its TensorRT engine built
#      by this image's trtexec on this GPU (fp16, batch profile 1 / MAX_BATCH/4 / MAX_BATCH, timing cache in
#      yolov8/trt_cache), engine.json, and the tensorrt_plan config rendered by `export yolo`. Serving pods then
#      load a finished engine in seconds and write nothing (onnxruntime's TensorRT accelerator would rebuild its
#      engine in every pod, for minutes, into a read-only volume);
#   3. `export plan` for this GPU's memory: instance counts, batches, budgets and gpu_plan.json. Its "rate-limiter
#      pool" is the RATE_LIMIT_GPU_MEMORY_MIB of components/resources.
# An engine runs only with the TensorRT that built it (this image's) on the GPU architecture it was built on:
# run the Job again after changing the image, the GPU type or the weights (with the Deployment scaled to 0).
#
# Environment: REPO (/models), WEIGHTS (whisper + easyocr: official | a path), YOLO_WEIGHTS (official | synthetic
# | a .pt path), WHISPER_SIZE (small), YOLO_SIZE (n), MAX_BATCH (64), GPU_MEMORY (default: GPU 0's, from
# nvidia-smi), DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root (/opt/trident in the image): export/, model_repository/

REPO=${REPO:-/models}
WEIGHTS=${WEIGHTS:-official}
YOLO_WEIGHTS=${YOLO_WEIGHTS:-official}
WHISPER_SIZE=${WHISPER_SIZE:-small}
YOLO_SIZE=${YOLO_SIZE:-n}
MAX_BATCH=${MAX_BATCH:-64}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}

. deploy/common.sh  # run: print each command, run it unless DRY_RUN

if [ -z "$DRY_RUN" ] && [ ! -w "$REPO" ]; then
  echo "$REPO is not writable: the trident-models claim must be ReadWriteMany (deploy/kubernetes/models)" >&2
  exit 2
fi
if [ -z "${GPU_MEMORY:-}" ]; then
  if [ -n "$DRY_RUN" ]; then
    GPU_MEMORY=81920MiB
  else
    GPU_MEMORY="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | tr -d ' ')MiB"
  fi
fi

echo "== 1/3 export: whisper $WHISPER_SIZE and easyocr ($WEIGHTS) into $REPO"
run "$PYTHON" -m export whisper --size "$WHISPER_SIZE" --weights "$WEIGHTS" --repo "$REPO"
run "$PYTHON" -m export easyocr --weights "$WEIGHTS" --repo "$REPO"

echo "== 2/3 yolov8$YOLO_SIZE ($YOLO_WEIGHTS): model.onnx and its TensorRT engine, built on this GPU as make engines does"
# deploy/build_engine.sh prints its own commands (and runs nothing under DRY_RUN)
DRY_RUN="$DRY_RUN" BUILD_IN=here IMAGE=trident-fill:24.10 REPO="$REPO" YOLO_WEIGHTS="$YOLO_WEIGHTS" SIZE="$YOLO_SIZE" \
  MAX_BATCH="$MAX_BATCH" PYTHON="$PYTHON" deploy/build_engine.sh

echo "== 3/3 plan for this GPU ($GPU_MEMORY)"
run "$PYTHON" -m export plan --gpu-memory "$GPU_MEMORY" --repo "$REPO"
echo "Done. Set RATE_LIMIT_GPU_MEMORY_MIB in deploy/kubernetes/components/resources/resources.yaml to the" \
  "rate-limiter pool above, then: kubectl apply -k deploy/kubernetes/overlays/production"
