#!/bin/bash
# The GPU device run: two calls of at most 270 s each on a GPU machine without Docker or a package index
# (Python 3.12 with a CUDA torch; perf/gpu/README.md has the exact device-tool calls and the budget):
#
#   bash perf/gpu/run.sh call1   # install .carry/gpu-base, check what imports, export, GPU-vs-CPU checks
#   bash perf/gpu/run.sh call2   # install .carry/gpu-perf (perf_analyzer), perf sweep, GPU memory per model
#   DRY_RUN=1 bash perf/gpu/run.sh call1|call2   # run nothing: print the stages and limits, check the budget,
#                                                # the carry's size and what $OUT would hold
#   CPU_FALLBACK=1 MODELS=yolo bash perf/gpu/run.sh call1   # rehearsal on a CPU with this checkout's .venv
#
# Every stage runs under a time limit: its own, cut to what is left of the call's CALL_LIMIT less PACK_RESERVE
# (a stage with less than MIN_STAGE seconds left is skipped). GRACE seconds before its limit the stage gets
# SIGINT (perf writes its partial report), at the limit SIGKILL; servers it left are stopped. After every stage $OUT is
# packed again and summary.txt is appended line by line, so a call cut short still returns what it had.
# Call 2 on a machine that lost call 1's .gpu-env/ (recycled) says so, reinstalls from the carry and
# re-exports before measuring, in whatever time is left.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SCRIPT=$ROOT/perf/gpu/run.sh
cd "$ROOT" || exit 2

CALL_LIMIT=${CALL_LIMIT:-270}
PACK_RESERVE=${PACK_RESERVE:-10}  # packing $OUT after the last stage
GRACE=${GRACE:-10}                # between SIGINT and SIGKILL, inside the stage's limit
MIN_STAGE=${MIN_STAGE:-15}
WARM_SKIPS=${WARM_SKIPS:-15}      # call 2 on a warm machine: the installed/exported checks, perf_analyzer's ldd
# name:limit in seconds, in order. Expected times on an H100/H200: perf/gpu/README.md.
CALL1_STAGES=${CALL1_STAGES:-"install:25 preflight:45 inputs:15 export:80 check:95"}
CALL2_STAGES=${CALL2_STAGES:-"install:25 preflight:45 inputs:15 export:80 perf:175 memory:65"}
WARM_ONLY="install preflight inputs export"  # call 2 finds these done by call 1 unless the machine was recycled
MIB=1048576
OUT_FILES=8 OUT_FILE_MIB=16 OUT_TOTAL_MIB=64 CARRY_MIB=64  # the device tool's limits

ENV_DIR=${TRIDENT_GPU_ENV:-$ROOT/.gpu-env}
CARRY=${CARRY:-$ROOT/.carry}
MODELS=${MODELS:-yolo whisper easyocr}
if [ "${CPU_FALLBACK:-}" = 1 ]; then
  PY_SERVE=$ROOT/.venv/bin/python PY_EXPORT=$ROOT/.venv/bin/python KIND=cpu WHISPER=tiny
  LIMIT_SCALE=${LIMIT_SCALE:-4}  # a rehearsal of the sequence on a small CPU machine, not of the timing
else
  PY_SERVE=$ENV_DIR/serve/bin/python PY_EXPORT=$ENV_DIR/export/bin/python KIND=gpu WHISPER=small
  LIMIT_SCALE=${LIMIT_SCALE:-1}
fi
REPO=$ENV_DIR/repo-$KIND
export ROOT ENV_DIR CARRY MODELS PY_SERVE PY_EXPORT KIND WHISPER REPO

stages_of() { local v=${1^^}_STAGES; echo "${!v}"; }
carry_of() { [ "$1" = call1 ] && echo gpu-base || echo "gpu-perf gpu-base"; }
key_files() {  # copied flat into $OUT besides summary.txt and results-<call>.tar.gz
  [ "$1" = call1 ] && echo "packages.txt checks/checks.json gpu_memory.csv" \
    || echo "packages.txt perf/report.md perf/results.csv memory.json"
}
# served model names for the export names in MODELS, in perf/gpu/sweep.py's order
served_models() {
  local m out=()
  for m in detect whisper easyocr yolov8; do
    case $m in detect|yolov8) [[ " $MODELS " == *" yolo "* ]] ;; *) [[ " $MODELS " == *" $m "* ]] ;; esac && out+=("$m")
  done
  (IFS=,; echo "${out[*]}")
}

# ---------------------------------------------------------------------------------------------------- stages
stage_install() {
  if [ "${CPU_FALLBACK:-}" = 1 ]; then echo "CPU_FALLBACK: using $ROOT/.venv, nothing to install"; return 0; fi
  install_part gpu-base && install_part gpu-perf || return 1
  ls "$ENV_DIR"/installed-gpu-base-* >/dev/null 2>&1 \
    || { echo "nothing installed and .carry/gpu-base not carried: carry it (make gpu-bundle here first)"; return 1; }
}

install_part() {  # gpu-base | gpu-perf: unpack what was carried, once per bundle (a stamp keyed to its MANIFEST)
  local part=$1 manifest=$CARRY/$1/MANIFEST system_python=${SYSTEM_PYTHON:-python3}
  [ -f "$manifest" ] || { echo "$part: not carried"; return 0; }
  local stamp
  stamp=$ENV_DIR/installed-$part-$(md5sum < "$manifest" | cut -c1-12)
  [ -e "$stamp" ] && { echo "$part: already installed"; return 0; }
  if [ "$part" = gpu-base ]; then
    rm -rf "${ENV_DIR:?}"/{site,numpy1,serve,export,lib} "$ENV_DIR"/installed-* "$ENV_DIR"/preflight-ok
    mkdir -p "$ENV_DIR/lib"
    xz -dc "$CARRY/gpu-base/base.tar.xz" | tar -C "$ENV_DIR" -xf - || return 1
    local machine_sites env purelib
    machine_sites=$("$system_python" -c 'import site; print("\n".join(site.getsitepackages()))') || return 1
    for env in serve export; do
      # Our own venvs over the machine's Python: the stub's embedded interpreter takes its prefix from the
      # first python3 on PATH (trident_serving.server puts the launching venv there), so it reads this .pth.
      # In order: numpy 1.26 (serve only), the carried packages, our sources, then the machine's packages.
      "$system_python" -m venv --without-pip "$ENV_DIR/$env" || return 1
      purelib=$("$ENV_DIR/$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      { [ "$env" = serve ] && echo "$ENV_DIR/numpy1"
        printf '%s\n' "$ENV_DIR/site" "$ROOT/serving" "$ROOT/client"
        printf "import site; site.addsitedir('%s')\n" $machine_sites  # their own .pth files apply too
      } > "$purelib/trident-gpu.pth"
    done
  else
    [ -d "$ENV_DIR/serve/bin" ] || { echo "$part: install gpu-base first"; return 1; }
    # analyzer.py runs the perf_analyzer beside the interpreter
    xz -dc "$CARRY/gpu-perf/perf_analyzer.xz" > "$ENV_DIR/serve/bin/perf_analyzer" || return 1
    chmod +x "$ENV_DIR/serve/bin/perf_analyzer"
    cp "$CARRY/gpu-perf/libb64.so.0d" "$ENV_DIR/lib/"  # libcudart.so.12: perf/analyzer.py links the bundled one
  fi
  touch "$stamp"
  echo "$part: installed into $ENV_DIR ($(du -sh "$ENV_DIR" | cut -f1))"
}

stage_preflight() {
  local args=(--out "$WORK/packages.txt") serve=()
  [ "${CPU_FALLBACK:-}" = 1 ] || args+=(--carried "$ENV_DIR")
  [ "$CALL" = call2 ] && serve+=(--perf-analyzer "$(dirname "$PY_SERVE")/perf_analyzer")
  if [ -e "$ENV_DIR/preflight-ok" ] && [ "${CPU_FALLBACK:-}" != 1 ]; then
    echo "imports already checked on this machine ($ENV_DIR/preflight-ok)"
    if [ "$CALL" = call2 ]; then
      "$PY_SERVE" perf/gpu/packages.py check --env serve --no-imports "${args[@]}" "${serve[@]}"
    fi
    return
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY_EXPORT" perf/gpu/packages.py check --env export "${args[@]}"; local rc=$?
  "$PY_SERVE" perf/gpu/packages.py check --env serve "${args[@]}" "${serve[@]}" || rc=$?
  [ $rc -eq 0 ] && touch "$ENV_DIR/preflight-ok"
  return $rc
}

stage_inputs() {
  [ -f perf/data/manifest.json ] && { echo "perf/data already generated"; return 0; }
  "$PY_SERVE" -m perf.inputs
}

stage_export() {
  if [ "$(cat "$REPO/.complete" 2>/dev/null)" = "$MODELS" ]; then echo "already exported: $REPO"; return 0; fi
  rm -rf "$REPO"
  local model start
  for model in $MODELS; do
    start=$SECONDS
    case $model in
      # synthetic (seeded random) weights of the real sizes: nothing can be downloaded there
      yolo) "$PY_EXPORT" -m export yolo --size n --weights synthetic --flavour python --kind "$KIND" --repo "$REPO" ;;
      whisper) "$PY_EXPORT" -m export whisper --size "$WHISPER" --weights synthetic --kind "$KIND" --repo "$REPO" ;;
      easyocr) "$PY_EXPORT" -m export easyocr --weights synthetic --kind "$KIND" --repo "$REPO" ;;
      *) echo "unknown model $model in MODELS"; false ;;
    esac || return 1
    echo "   export $model: $((SECONDS - start)) s"
  done
  if [ "$KIND" = gpu ] && [[ " $MODELS " == *" yolo "* ]]; then
    # neither onnxruntime-gpu nor TensorRT is there: yolov8 runs the same weights in PyTorch fp16
    cp perf/gpu/yolov8_torch.py "$REPO/yolov8/1/model.py"
  fi
  echo "$MODELS" > "$REPO/.complete"
}

stage_check() {
  echo "stage,pid,used_mib,process" > "$WORK/gpu_memory.csv"
  "$PY_SERVE" perf/gpu/check.py --repository "$REPO" --out "$WORK/checks" --kind "$KIND" \
    --memory-csv "$WORK/gpu_memory.csv" --models "$(served_models)"
}

stage_perf() {
  local args=(--repository "$REPO" --out "$WORK/perf" --no-progress --models "$(served_models)")
  [ "$KIND" = cpu ] && args+=(--mode smoke --concurrency 1)
  "$PY_SERVE" perf/gpu/sweep.py "${args[@]}"
}

stage_memory() {
  [ "$KIND" = cpu ] && { echo "skipped: perf.memory needs an NVIDIA GPU"; return 0; }
  local models
  models=$(served_models | tr , '\n' | grep -vx yolov8 | paste -sd,)  # detect is measured with its yolov8
  "$PY_SERVE" -m perf.memory --repo "$REPO" --out "$WORK/memory.json" --models "$models"
}

environment() {
  export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False PYTHONIOENCODING=utf-8 PYTHONUNBUFFERED=1
  export YOLO_CONFIG_DIR=$ENV_DIR/ultralytics TRIDENT_CACHE=$ENV_DIR/cache TMPDIR=$WORK/tmp
  [ "${CPU_FALLBACK:-}" = 1 ] || export LD_LIBRARY_PATH="$ENV_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  mkdir -p "$TMPDIR" "$YOLO_CONFIG_DIR"
}

# ---------------------------------------------------------------------------------------------- the call
say() { echo "$*" | tee -a "$SUMMARY"; }

stop_servers() {  # servers left running (their client was killed) by the pid files under the folders given
  local file pid
  while IFS= read -r file; do
    pid=$(cat "$file" 2>/dev/null) || continue
    kill -0 -- "-$pid" 2>/dev/null || continue
    say "   stopping server group $pid left running ($file)"
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null
  done < <(find "$@" -name tritonserver.pid 2>/dev/null)
}

run_stage() {  # name limit: its function under the limit, cut to the call's deadline; 124 when cut or skipped
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) left
  left=$(( DEADLINE - $(date +%s) - PACK_RESERVE ))
  (( limit > left )) && limit=$left
  if (( limit < MIN_STAGE * LIMIT_SCALE )); then
    say "== [$(( $(date +%s) - START )) s] $name: SKIPPED, ${left} s left of the call's $((CALL_LIMIT * LIMIT_SCALE)) s"
    return 124
  fi
  say "== [$(( $(date +%s) - START )) s] $name (limit $limit s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after="$GRACE" "$(( limit - GRACE ))" "$BASH" "$SCRIPT" __stage "$name" \
    >> "$WORK/$name.log" 2>&1
  local rc=$?
  stop_servers "$WORK"
  tail -n 12 "$WORK/$name.log" | sed 's/^/    /' >> "$SUMMARY"
  local why=""
  case $rc in 124|137) why=" (cut at its limit)" ;; 3) why=" (missing packages: see packages.txt)" ;; esac
  say "   $name: exit $rc after $(( SECONDS - t0 )) s$why"
  pack
  return $rc
}

pack() {  # $OUT: summary.txt (live), results-<call>.tar.gz, the key files flat; never more than OUT_FILES
  local archive=$WORK.tar.gz exclude=$WORK.exclude f
  # a file too big to travel is left out, named in left-out.txt: logs are text and stay far below this
  find "$WORK" -type f -size +$(( OUT_FILE_MIB / 2 ))M ! -name '*.pt' ! -name '*.pth' ! -name '*.onnx' \
    -printf './%P\n' > "$WORK/left-out.txt"
  [ -s "$WORK/left-out.txt" ] || rm "$WORK/left-out.txt"
  { echo "./tmp"; echo "*/backends"; echo "*.pt"; echo "*.pth"; echo "*.onnx"; cat "$WORK/left-out.txt" 2>/dev/null
  } > "$exclude"
  tar -C "$WORK" -X "$exclude" -czf "$archive" . 2>/dev/null
  if [ "$(stat -c %s "$archive")" -le $(( OUT_FILE_MIB * MIB )) ]; then
    cp "$archive" "$OUT/.results.part" && mv -f "$OUT/.results.part" "$OUT/results-$CALL.tar.gz"
  else
    say "   results-$CALL.tar.gz would exceed $OUT_FILE_MIB MiB: not updated"
  fi
  for f in $(key_files "$CALL"); do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(basename "$f")"
  done
  rm -f "$archive" "$exclude"
}

verify_out() {  # the device tool's limits on what comes back from $OUT; prints each breach, returns 1 if any
  local dir=$1 count=0 total=0 bad=0 path rel size part parts
  while IFS= read -r -d '' path; do
    rel=${path#"$dir"/}
    if [ ! -f "$path" ] || [ -L "$path" ]; then echo "  $rel: not a plain file"; bad=1; continue; fi
    count=$((count + 1)); size=$(stat -c %s "$path"); total=$((total + size))
    [ "$(tr -cd / <<< "$rel" | wc -c)" -le 2 ] || { echo "  $rel: deeper than \$OUT/a/b/file"; bad=1; }
    IFS=/ read -ra parts <<< "$rel"
    for part in "${parts[@]}"; do
      [[ $part =~ ^[A-Za-z0-9._-]+$ ]] || { echo "  $rel: a name of letters, digits, '.', '_', '-' only"; bad=1; }
    done
    [ "$size" -le $(( OUT_FILE_MIB * MIB )) ] || { echo "  $rel: over $OUT_FILE_MIB MiB"; bad=1; }
  done < <(find "$dir" -mindepth 1 ! -type d -print0)
  [ $count -le $OUT_FILES ] || { echo "  $count files: at most $OUT_FILES come back"; bad=1; }
  [ $total -le $(( OUT_TOTAL_MIB * MIB )) ] \
    || { echo "  $((total / MIB)) MiB: at most $OUT_TOTAL_MIB together"; bad=1; }
  echo "  \$OUT: $count files, $(( total / 1024 )) KiB"
  return $bad
}

tree_bytes() {  # what travels with every call besides the carry: tracked and untracked-not-ignored files
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard 2>/dev/null \
    | (cd "$ROOT" && xargs -0 -r stat -c %s 2>/dev/null) | awk '{s += $1} END {print s + 0}'
}

dry_run() {  # the plan of one call and the limits it must keep; exit 1 on a breach
  local call=$1 bad=0 t=0 name limit eff entry budget=$(( CALL_LIMIT - PACK_RESERVE ))
  echo "$call: stages (limit; start if every earlier stage ran to its limit; the call ends by $CALL_LIMIT s," \
       "$PACK_RESERVE s of it for packing)"
  local full=0 warm=$WARM_SKIPS
  for entry in $(stages_of "$call"); do
    name=${entry%%:*} limit=${entry##*:}
    [[ $limit =~ ^[0-9]+$ ]] || { echo "  $entry: no limit"; bad=1; continue; }
    (( limit > GRACE )) || { echo "  $name: limit $limit s leaves nothing after the $GRACE s grace"; bad=1; }
    eff=$(( limit < budget - t ? limit : budget - t ))
    if (( eff < MIN_STAGE )); then
      printf '  %-10s %4d s  from %3d s: skipped (%d s left)\n' "$name" "$limit" "$t" "$eff"
    else
      printf '  %-10s %4d s  from %3d s%s\n' "$name" "$limit" "$t" \
        "$( (( eff < limit )) && echo ": cut to $eff s (only on a recycled machine)")"
      t=$(( t + eff ))
    fi
    full=$(( full + limit ))
    [[ " $WARM_ONLY " == *" $name "* ]] || warm=$(( warm + limit ))
  done
  if [ "$call" = call1 ]; then
    echo "  sum $full s + $PACK_RESERVE s packing = $(( full + PACK_RESERVE )) s (limit $CALL_LIMIT)"
    (( full + PACK_RESERVE <= CALL_LIMIT )) || { echo "  OVER: call 1's stages must all fit whole"; bad=1; }
  else
    echo "  warm machine (call 1's install, checks, inputs and export found: ~$WARM_SKIPS s): $warm s +" \
         "$PACK_RESERVE s packing = $(( warm + PACK_RESERVE )) s (limit $CALL_LIMIT)"
    (( warm + PACK_RESERVE <= CALL_LIMIT )) || { echo "  OVER: call 2's measuring stages must fit whole"; bad=1; }
    echo "  recycled machine: reinstall and re-export first; later stages get what is left (above)"
  fi
  # the carry
  local tree part size carry_bytes=0 carried=()
  tree=$(tree_bytes)
  for part in $(carry_of "$call"); do
    if [ -f "$CARRY/$part/MANIFEST" ]; then
      size=$(du -sb "$CARRY/$part" | cut -f1); carry_bytes=$((carry_bytes + size)); carried+=("\".carry/$part\"")
      printf '  carry .carry/%s: %.1f MiB\n' "$part" "$(awk "BEGIN {print $size / $MIB}")"
    else
      echo "  carry .carry/$part: not built here (make gpu-bundle): size not checked"
    fi
  done
  printf '  travels: tree %.1f MiB + carry %.1f MiB = %.1f MiB (limit %d MiB)\n' "$(awk "BEGIN {print $tree / $MIB}")" \
    "$(awk "BEGIN {print $carry_bytes / $MIB}")" "$(awk "BEGIN {print ($tree + $carry_bytes) / $MIB}")" "$CARRY_MIB"
  (( tree + carry_bytes <= CARRY_MIB * MIB )) || { echo "  OVER: what travels exceeds $CARRY_MIB MiB"; bad=1; }
  echo "  run(command=\"bash perf/gpu/run.sh $call\", carry=[$(IFS=,; echo "${carried[*]}" | sed 's/,/, /g')]," \
       "timeout_s=$(( CALL_LIMIT + 30 )))"
  # $OUT: pack a stand-in of every file the call writes and check it against the tool's limits
  local scratch
  scratch=$(mktemp -d)
  (
    WORK=$scratch/work OUT=$scratch/out CALL=$call SUMMARY=$scratch/out/summary.txt
    mkdir -p "$WORK/checks/server/backends" "$WORK/perf/perf_analyzer/on-speech-5s" "$WORK/tmp" "$OUT"
    for entry in $(stages_of "$call"); do echo "log" > "$WORK/${entry%%:*}.log"; done
    for f in $(key_files "$call"); do mkdir -p "$(dirname "$WORK/$f")"; echo "{}" > "$WORK/$f"; done
    echo "x" > "$WORK/perf/perf_analyzer/on-speech-5s/whisper-c32.csv"
    echo "x" > "$WORK/checks/server/tritonserver.log"
    echo "summary" > "$SUMMARY"
    pack; pack  # twice: a repacked $OUT must not grow
    verify_out "$OUT"
  ) || bad=1
  rm -rf "$scratch"
  return $bad
}

case ${1:-} in
  __stage) environment; "stage_$2"; exit $? ;;  # run_stage runs each stage so, under its time limit
  verify-out) verify_out "$2"; exit $? ;;
  call1|call2) CALL=$1 ;;
  *) echo "usage: [DRY_RUN=1] [CPU_FALLBACK=1] bash perf/gpu/run.sh call1|call2"; exit 2 ;;
esac
if [ "${DRY_RUN:-}" = 1 ]; then dry_run "$CALL"; exit $?; fi

WORK=$ROOT/perf/results/gpu-$CALL
OUT=${OUT:-$WORK-out}
SUMMARY=$OUT/summary.txt
START=$(date +%s)
DEADLINE=$(( START + CALL_LIMIT * LIMIT_SCALE ))
mkdir -p "$OUT"
for f in summary.txt "results-$CALL.tar.gz" .results.part $(key_files "$CALL"); do rm -f "$OUT/$(basename "$f")"; done
say "Trident GPU $CALL $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
    "stages: $(stages_of "$CALL"); call limit $(( CALL_LIMIT * LIMIT_SCALE )) s"
# a call the device tool killed leaves its servers running (their own sessions) on the machine
stop_servers "$ROOT"/perf/results/gpu-call[12]
rm -rf "$WORK"
mkdir -p "$WORK"
export CALL WORK
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$SUMMARY"
if [ "$CALL" = call2 ] && [ "${CPU_FALLBACK:-}" != 1 ] && ! ls "$ENV_DIR"/installed-gpu-base-* >/dev/null 2>&1; then
  say "NOTE: no $ENV_DIR from call 1 here: the machine was recycled (or call 1 did not run). Reinstalling from"
  say "      the carry and re-exporting first; perf and memory get what is left of the $CALL_LIMIT s."
fi
status=0 next="send call 2 at once (the machine is given back after ~30 s idle)"
for entry in $(stages_of "$CALL"); do
  name=${entry%%:*}
  run_stage "$name" "${entry##*:}"; rc=$?
  [ $rc -ne 0 ] && status=1
  # without an installed, importable environment or a model repository nothing later can run
  if [ $rc -ne 0 ] && [[ " install preflight export " == *" $name "* ]]; then
    say "stopping: $name failed (its log: results-$CALL.tar.gz, $name.log)"
    next="do not send call 2: give the machine back, fix $name here, then both calls again"
    break
  fi
done
say "$CALL done in $(( $(date +%s) - START )) s, exit $status$([ "$CALL" = call1 ] && echo "; $next")"
pack
verify_out "$OUT" | tee -a "$SUMMARY"
exit $status
