#!/bin/bash
# One command on a GPU machine without Docker or a package index (Python 3.12 with torch+CUDA; see
# perf/gpu/README.md): installs the copied files, exports synthetic weights of the real sizes, serves every
# model on KIND_GPU with the local Triton 2.51 server, checks GPU results against CPU fp32 references,
# runs the perf suite in GPU mode (batching on/off, baselines), records GPU memory per process, and writes
# everything under $OUT. Run from the repository root:
#
#   bash perf/gpu/run.sh              # all stages (after both parts of `make gpu-bundle` were copied)
#   bash perf/gpu/run.sh install      # install whatever part is here (.carry/gpu-1 or .carry/gpu-2), then stop
#   STAGES="check perf" bash perf/gpu/run.sh
#
# CPU_FALLBACK=1 runs the same stages on a machine without a GPU, with this checkout's .venv (a dry run of
# everything but the install: the instances then run on the CPU and the suite in smoke mode).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/perf/results/gpu-run}
ENV_DIR=${TRIDENT_GPU_ENV:-$ROOT/.gpu-env}
CARRY=${CARRY:-$ROOT/.carry}
STAGES=${STAGES:-${1:-install export check perf small memory}}
[ "${1:-}" = install ] && STAGES=install
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
say() { echo "$*" | tee -a "$SUMMARY"; }
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
stage() { say "== [$(elapsed) s] $*"; }

if [ "${CPU_FALLBACK:-}" = 1 ]; then
  PY=$ROOT/.venv/bin/python
  KIND=cpu; MODE=smoke; WHISPER=tiny
  PERF_ARGS=${PERF_ARGS:---concurrency 1}; LIMIT_SCALE=${LIMIT_SCALE:-6}  # a dry run on a small CPU machine
else
  PY=$ENV_DIR/venv/bin/python
  KIND=gpu; MODE=gpu; WHISPER=small
fi
PERF_ARGS=${PERF_ARGS:-}       # extra arguments of `python -m perf`
LIMIT_SCALE=${LIMIT_SCALE:-1}  # multiplies every stage's time limit
REPO=$ENV_DIR/repo-$KIND        # YOLOv8n, Whisper small, EasyOCR ko+en
REPO_S=$ENV_DIR/repo-$KIND-s    # YOLOv8s (detect + yolov8 only)

install() {
  # Idempotent: each part is installed once (a stamp per part); both live in $ENV_DIR, which git ignores and
  # which stays on the machine between copies.
  local system_python=${SYSTEM_PYTHON:-python3}
  mkdir -p "$ENV_DIR/lib"
  if [ ! -x "$ENV_DIR/venv/bin/python" ]; then
    # A venv of our own, so the Python stub finds our packages the way the local server's does (its
    # embedded interpreter takes its prefix from the first python3 on PATH). Its .pth file lists each part's
    # folder, then our sources, then the machine's own site-packages (torch, opencv, scipy...): in that order
    # on sys.path, so numpy 1.26.4 shadows the machine's numpy 2.
    "$system_python" -m venv --without-pip "$ENV_DIR/venv" || return 1
  fi
  SITE=$("$ENV_DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  local machine_site
  machine_site=$("$system_python" -c 'import site; print(site.getsitepackages()[0])')
  printf '%s\n' "$ENV_DIR/gpu-1" "$ENV_DIR/gpu-2" "$ROOT/serving" "$ROOT/client" "$machine_site" \
    > "$SITE/trident-gpu.pth"
  for part in "$CARRY"/gpu-1 "$CARRY"/gpu-2; do
    [ -d "$part" ] || continue
    local stamp
    stamp="$ENV_DIR/installed-$(basename "$part")-$(ls "$part" | md5sum | cut -c1-8)"
    [ -e "$stamp" ] && { say "$(basename "$part") already installed"; continue; }
    local target
    target="$ENV_DIR/$(basename "$part")"  # one folder per part: a second --target install would replace bin/
    rm -rf "$target" "$ENV_DIR"/installed-"$(basename "$part")"-*
    if ls "$part"/*.whl >/dev/null 2>&1; then
      "$system_python" -m pip install --quiet --no-index --no-deps --no-compile --target "$target" \
        "$part"/*.whl || return 1
    fi
    if [ -f "$part/tsbundle.tar.xz" ]; then
      # pytriton/tritonserver + nvidia_pytriton.libs, laid out as the nvidia-pytriton wheel installs them, so
      # trident_serving.server finds the server binary, the 3.12 stub and the bundled libraries as it does here.
      tar -xJf "$part/tsbundle.tar.xz" -C "$target" && touch "$target/pytriton/__init__.py"
    fi
    [ -f "$part/libb64.so.0d" ] && cp "$part/libb64.so.0d" "$ENV_DIR/lib/"
    touch "$stamp"
    say "installed $(basename "$part") into $ENV_DIR"
  done
  chmod +x "$ENV_DIR/gpu-1/bin/perf_analyzer" 2>/dev/null || true
  for part in gpu-1 gpu-2; do
    ls "$ENV_DIR"/installed-$part-* >/dev/null 2>&1 || {
      say "$part not installed yet: copy .carry/$part (make gpu-bundle) and rerun"; return 3; }
  done
  local module
  for module in numpy tritonclient pytriton av torch ultralytics whisper easyocr tqdm; do
    "$ENV_DIR/venv/bin/python" -c "import $module" > "$ENV_DIR/import.log" 2>&1 \
      || { say "import $module fails: $(tail -n 1 "$ENV_DIR/import.log")"; return 1; }
  done
  "$ENV_DIR/venv/bin/python" -c 'import numpy; assert numpy.__version__.startswith("1."), numpy.__version__' \
    || { say "numpy 2 would be imported by the Python stub (breaks TYPE_STRING inputs)"; return 1; }
}

environment() {
  if [ "${CPU_FALLBACK:-}" != 1 ]; then
    export PATH="$ENV_DIR/venv/bin:$ENV_DIR/gpu-1/bin:$PATH"
    export LD_LIBRARY_PATH="$ENV_DIR/lib:${LD_LIBRARY_PATH:-}"
  fi
  export YOLO_OFFLINE=1 PYTHONIOENCODING=utf-8 YOLO_CONFIG_DIR=${TMPDIR:-/tmp}/trident-ultralytics
}

export_models() {
  # Synthetic (seeded random) weights of the real architectures and sizes: official weights cannot be copied.
  rm -rf "$REPO" "$REPO_S"
  "$PY" -m export yolo --size n --weights synthetic --flavour python --kind "$KIND" --repo "$REPO" &&
  "$PY" -m export whisper --size "$WHISPER" --weights synthetic --kind "$KIND" --repo "$REPO" &&
  "$PY" -m export easyocr --weights synthetic --kind "$KIND" --repo "$REPO" &&
  "$PY" -m export yolo --size s --weights synthetic --flavour python --kind "$KIND" --repo "$REPO_S" || return 1
  if [ "$KIND" = gpu ]; then
    # neither onnxruntime-gpu nor TensorRT is on that machine: yolov8 runs the same weights in PyTorch fp16
    cp perf/gpu/yolov8_torch.py "$REPO/yolov8/1/model.py"
    cp perf/gpu/yolov8_torch.py "$REPO_S/yolov8/1/model.py"
  fi
}

run_stage() {
  local name=$1 limit=$2; shift 2
  limit=$((limit * LIMIT_SCALE))
  stage "$name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY" >/dev/null
  say "   $name: exit $rc"
  return $rc
}

say "Trident GPU run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname); stages: $STAGES"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$SUMMARY"
for name in $STAGES; do
  case $name in
    install)
      [ "${CPU_FALLBACK:-}" = 1 ] && { say "install skipped (CPU_FALLBACK: using .venv)"; continue; }
      stage install; install; rc=$?
      [ $rc -ne 0 ] && { say "install: exit $rc"; exit $rc; } ;;
    export)
      environment; stage export
      export_models > "$OUT/export.log" 2>&1 || { tail -n 25 "$OUT/export.log" | tee -a "$SUMMARY"; say "export failed"; exit 1; }
      say "   exported into $REPO and $REPO_S" ;;
    check)
      environment
      echo "stage,pid,used_mib,command" > "$OUT/gpu_memory.csv"
      run_stage check 120 "$PY" perf/gpu/check.py --repository "$REPO" --out "$OUT/checks" \
        --kind "$KIND" --memory-csv "$OUT/gpu_memory.csv" ;;
    perf)
      environment
      # shellcheck disable=SC2086  # PERF_ARGS is a list of words
      run_stage perf 360 "$PY" -m perf --mode "$MODE" --repository "$REPO" --out "$OUT/perf" --no-progress $PERF_ARGS ;;
    small)
      # YOLOv8s: parity and throughput of detect, batching on (the n model carries the on/off comparison)
      environment
      run_stage small 80 "$PY" -m perf --mode "$MODE" --models detect --repository "$REPO_S" --out "$OUT/perf-s" \
        --batching on --concurrency "$([ "$MODE" = gpu ] && echo 1,128 || echo 1)" --no-progress ;;
    memory)
      environment
      if [ -f perf/memory.py ] && [ "$KIND" = gpu ]; then
        run_stage memory 90 "$PY" -m perf.memory --repo "$REPO" --out "$OUT/memory.json"
      else
        say "memory: skipped (perf/memory.py needs a GPU); per-process GPU memory of the check run: gpu_memory.csv"
      fi ;;
    *) say "unknown stage $name"; exit 2 ;;
  esac
done
say "done in $(elapsed) s; results under $OUT (perf/report.md, checks/checks.json, gpu_memory.csv)"
