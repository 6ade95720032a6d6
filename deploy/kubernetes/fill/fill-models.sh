#!/usr/bin/env bash
# The trident-fill-models Job (deploy/kubernetes/fill/job.yaml): writes the model repository that every serving
# pod mounts read-only, on a GPU node of the type that will serve it, in the trident-fill image (the serving
# image plus the exporters).
#   1. export whisper, easyocr and yolov8 (model.onnx, dynamic batch) into $REPO, as `make deploy` does;
#   2. yolov8's TensorRT engine, built by this image's trtexec on this GPU with deploy/build_engine.sh's settings
#      (fp16, batch profile 1 / MAX_BATCH/4 / MAX_BATCH, timing cache in yolov8/trt_cache), and engine.json beside
#      it; `export yolo --flavour tensorrt` checks both and renders the tensorrt_plan config. Serving pods then
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
OPT_BATCH=$(( MAX_BATCH / 4 > 0 ? MAX_BATCH / 4 : 1 ))  # export.yolo.opt_batch_size
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}
TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}  # in the tritonserver image
IMGSZ=640

run() {  # print a command, run it unless DRY_RUN
  printf '+ %s\n' "$*"
  if [ -z "$DRY_RUN" ]; then "$@"; fi
}

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
yolov8="$REPO/yolov8"
shape() { echo "images:${1}x3x${IMGSZ}x${IMGSZ}"; }

echo "== 1/3 export: whisper $WHISPER_SIZE and easyocr ($WEIGHTS), yolov8$YOLO_SIZE ($YOLO_WEIGHTS) into $REPO"
run "$PYTHON" -m export whisper --size "$WHISPER_SIZE" --weights "$WEIGHTS" --repo "$REPO"
run "$PYTHON" -m export easyocr --weights "$WEIGHTS" --repo "$REPO"
run "$PYTHON" -m export yolo --size "$YOLO_SIZE" --weights "$YOLO_WEIGHTS" --flavour onnxruntime --kind gpu \
  --max-batch-size "$MAX_BATCH" --repo "$REPO"

echo "== 2/3 yolov8 TensorRT engine: fp16, batch profile 1/$OPT_BATCH/$MAX_BATCH, on this GPU"
trtexec_logged() { "$TRTEXEC" "$@" 2>&1 | tee "$yolov8/trt_cache/trtexec.log"; }  # pipefail: its status counts
run mkdir -p "$yolov8/trt_cache"
# Written under a temporary name and moved into place only when trtexec succeeds.
run trtexec_logged --onnx="$yolov8/1/model.onnx" --saveEngine="$yolov8/1/model.plan.partial" --fp16 \
  --minShapes="$(shape 1)" --optShapes="$(shape "$OPT_BATCH")" --maxShapes="$(shape "$MAX_BATCH")" \
  --timingCacheFile="$yolov8/trt_cache/timing.cache" --memPoolSize=workspace:4096 --skipInference
run mv "$yolov8/1/model.plan.partial" "$yolov8/1/model.plan"
# engine.json: what `export yolo --flavour tensorrt` checks the engine against (the model.onnx it was built
# from, its batch profile) and what built it.
run "$PYTHON" - "$yolov8" "$MAX_BATCH" "$OPT_BATCH" <<'EOF'
import json, re, subprocess, sys, time
from pathlib import Path
from export.download import file_digest
folder, max_batch, opt_batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
version = re.search(r"TensorRT version: ([\d.]+)", (folder / "trt_cache" / "trtexec.log").read_text(errors="replace"))
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader", "-i", "0"],
                     capture_output=True, text=True).stdout.strip()
info = {"onnx_sha256": file_digest(folder / "1" / "model.onnx", "sha256"), "max_batch_size": max_batch,
        "opt_batch_size": opt_batch, "precision": "fp16", "tensorrt": version.group(1) if version else "unknown",
        "gpu": gpu, "image": "trident-fill (trident-triton:24.10)",
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
(folder / "engine.json").write_text(json.dumps(info, indent=2) + "\n")
print(f"engine.json: {info}")
EOF
run "$PYTHON" -m export yolo --size "$YOLO_SIZE" --weights "$YOLO_WEIGHTS" --flavour tensorrt --kind gpu \
  --max-batch-size "$MAX_BATCH" --repo "$REPO"

echo "== 3/3 plan for this GPU ($GPU_MEMORY)"
run "$PYTHON" -m export plan --gpu-memory "$GPU_MEMORY" --repo "$REPO"
echo "Done. Set RATE_LIMIT_GPU_MEMORY_MIB in deploy/kubernetes/components/resources/resources.yaml to the" \
  "rate-limiter pool above, then: kubectl apply -k deploy/kubernetes/overlays/production"
