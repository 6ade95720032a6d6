#!/usr/bin/env bash
# `make engines`: yolov8's TensorRT engine, built by the serving image's own trtexec on the serving GPU. The one
# definition of the build: the Kubernetes fill Job (deploy/kubernetes/fill/fill-models.sh) runs it too.
#
#   1. python -m export yolo --flavour onnxruntime   -> $REPO/yolov8/1/model.onnx (dynamic batch, height, width)
#   2. trtexec (BUILD_IN=compose: in trident-triton:24.10 through `docker compose run`, the `triton` service's GPU;
#      BUILD_IN=here: this machine's, e.g. inside the fill image on its GPU node): fp16, profile
#      1 / OPT_BATCH / MAX_BATCH images of LETTERBOX's shapes (rect: 32x32 / 384x640 / 640x640, every multiple of 32
#      between; square: 640x640), timing cache persisted in $REPO/yolov8/trt_cache/ -> $REPO/yolov8/1/model.plan
#   3. $REPO/yolov8/engine.json (what the engine was built from and for) and python -m export yolo
#      --flavour tensorrt, which checks it and renders the tensorrt_plan config.
# An engine runs only on the TensorRT version that built it (the container's, 10.5 in 24.10) and, by default,
# on the GPU architecture it was built on: rebuild after changing either (or the weights).
#
# Environment: REPO, YOLO_WEIGHTS (official | synthetic | a yolov8 .pt; default WEIGHTS), SIZE, MAX_BATCH,
# OPT_BATCH, LETTERBOX (rect | square, detect's mode; default rect), PYTHON, BUILD_IN (compose | here), IMAGE (recorded in engine.json), DRY_RUN=1 (print the commands,
# run nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=${REPO:-model_repository}
YOLO_WEIGHTS=${YOLO_WEIGHTS:-${WEIGHTS:-official}}  # WEIGHTS: every model's default (deploy.sh)
SIZE=${SIZE:-n}
MAX_BATCH=${MAX_BATCH:-64}
OPT_BATCH=${OPT_BATCH:-$(( MAX_BATCH / 4 > 0 ? MAX_BATCH / 4 : 1 ))}  # export.yolo.opt_batch_size
PYTHON=${PYTHON:-.venv-deploy/bin/python}
BUILD_IN=${BUILD_IN:-compose}
IMAGE=${IMAGE:-trident-triton:24.10}
TRTEXEC=/usr/src/tensorrt/bin/trtexec  # in the tritonserver image (Triton's own QA calls it there)
LETTERBOX=${LETTERBOX:-rect}

. deploy/common.sh

if [ "$OPT_BATCH" -lt 1 ] || [ "$OPT_BATCH" -gt "$MAX_BATCH" ]; then
  fail "OPT_BATCH=$OPT_BATCH must lie in 1..MAX_BATCH=$MAX_BATCH"
fi
case $BUILD_IN in compose|here) ;; *) fail "BUILD_IN=$BUILD_IN: use compose (docker compose run) or here";; esac
# export.yolo.profile_shapes: the same profile, which `export yolo --flavour tensorrt` checks engine.json against
case $LETTERBOX in
  rect) MIN_HW=32x32; OPT_HW=384x640;;
  square) MIN_HW=640x640; OPT_HW=640x640;;
  *) fail "LETTERBOX=$LETTERBOX: use rect (predict()'s default) or square (a static 640x640 engine)";;
esac
MIN_SHAPES=images:1x3x$MIN_HW OPT_SHAPES=images:${OPT_BATCH}x3x$OPT_HW MAX_SHAPES=images:${MAX_BATCH}x3x640x640
yolov8=$(realpath -m "$REPO/yolov8")

echo "== yolov8 TensorRT engine: fp16, profile $MIN_SHAPES / $OPT_SHAPES / $MAX_SHAPES, weights $YOLO_WEIGHTS"
run "$PYTHON" -m export yolo --weights "$YOLO_WEIGHTS" --size "$SIZE" --flavour onnxruntime --kind gpu \
  --max-batch-size "$MAX_BATCH" --letterbox "$LETTERBOX" --repo "$REPO"
run mkdir -p "$yolov8/trt_cache"
# trtexec's log and the GPU it ran on go to trt_cache/ (engine.json records both); the engine is written under a
# temporary name and moved into place only when trtexec succeeds.
build() {  # the build as one bash command line, for the yolov8 folder as the builder sees it
  echo "set -o pipefail; $TRTEXEC --onnx=$1/1/model.onnx --saveEngine=$1/1/model.plan.partial \
--fp16 --minShapes=$MIN_SHAPES --optShapes=$OPT_SHAPES --maxShapes=$MAX_SHAPES \
--timingCacheFile=$1/trt_cache/timing.cache --memPoolSize=workspace:4096 --skipInference \
2>&1 | tee $1/trt_cache/trtexec.log && mv $1/1/model.plan.partial $1/1/model.plan \
&& nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader -i 0 > $1/trt_cache/gpu.txt"
}
if [ "$BUILD_IN" = compose ]; then
  run docker compose run --rm --no-deps --user "$(id -u):$(id -g)" -v "$yolov8:/engine" triton bash -c "$(build /engine)"
else
  run bash -c "$(build "$yolov8")"
fi
run "$PYTHON" - "$yolov8" "$MAX_BATCH" "$OPT_BATCH" "$IMAGE" "$LETTERBOX" "$MIN_SHAPES" "$OPT_SHAPES" "$MAX_SHAPES" <<'EOF'
import hashlib, json, re, sys, time
from pathlib import Path
folder, max_batch, opt_batch, image, letterbox = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
log = (folder / "trt_cache" / "trtexec.log").read_text(errors="replace")
version = re.search(r"TensorRT version: ([\d.]+)", log)
info = {"onnx_sha256": hashlib.sha256((folder / "1" / "model.onnx").read_bytes()).hexdigest(),
        "max_batch_size": max_batch, "opt_batch_size": opt_batch, "letterbox": letterbox,
        **dict(zip(("min_shapes", "opt_shapes", "max_shapes"), sys.argv[6:9])), "precision": "fp16",
        "tensorrt": version.group(1) if version else "unknown", "gpu": (folder / "trt_cache" / "gpu.txt").read_text().strip(),
        "image": image, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
(folder / "engine.json").write_text(json.dumps(info, indent=2) + "\n")
print(f"engine.json: {info}")
EOF
run "$PYTHON" -m export yolo --weights "$YOLO_WEIGHTS" --size "$SIZE" --flavour tensorrt --kind gpu \
  --max-batch-size "$MAX_BATCH" --letterbox "$LETTERBOX" --repo "$REPO"
