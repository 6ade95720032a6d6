#!/bin/bash
# `make gpu-bundle`: the files a GPU machine without Docker or a package index needs to run perf/gpu/run.sh,
# in two parts of at most 64 MiB each (the most one copy may carry), in the ignored folder .carry/:
#   .carry/gpu-1  the Triton 2.51 server bundle (tar.xz), numpy 1.26.4 and tritonclient 2.51 (perf_analyzer), libb64
#   .carry/gpu-2  PyAV, ultralytics, openai-whisper, easyocr and their small dependencies, tqdm
# Wheels are for CPython 3.12 on manylinux x86_64 (the GPU machine's interpreter); torch, opencv, onnx,
# onnxruntime, scipy, scikit-image, tiktoken, grpcio and protobuf are already there (shared/notes/gpu-device.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
CARRY=${CARRY:-$ROOT/.carry}
LIMIT=$((64 * 1024 * 1024))
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # folder, requirements...
  local dest=$1; shift
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dest" "$@"
}
# Versions as pinned in requirements.txt, so the GPU run measures the code and libraries tested here.
pin() { grep -E "^$1==" "$ROOT/requirements.txt" | head -1; }

rm -rf "$CARRY/gpu-1" "$CARRY/gpu-2"
mkdir -p "$CARRY/gpu-1" "$CARRY/gpu-2"

echo "part 1: Triton server bundle, numpy<2, tritonclient (perf_analyzer), libb64"
SITE=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent.parent)')
# Only the 3.12 stub (the GPU machine's Python) and no bundled libpython: the machine has its own.
tar -C "$SITE" -cJf "$CARRY/gpu-1/tsbundle.tar.xz" \
  --exclude='pytriton/tritonserver/python_backend_stubs/3.8' --exclude='pytriton/tritonserver/python_backend_stubs/3.9' \
  --exclude='pytriton/tritonserver/python_backend_stubs/3.10' --exclude='pytriton/tritonserver/python_backend_stubs/3.11' \
  --exclude='pytriton/tritonserver/python_backend_stubs/3.13' \
  --exclude='nvidia_pytriton.libs/libpython3*' --exclude='__pycache__' \
  pytriton/tritonserver nvidia_pytriton.libs
download "$CARRY/gpu-1" "$(pin numpy)" "tritonclient==$("$PY" -c 'from importlib.metadata import version; print(version("tritonclient"))')"
# libb64 for perf_analyzer, from Debian's package (the same one `make system-deps` installs here)
work=$(mktemp -d)
(cd "$work" && apt-get download libb64-0d >/dev/null 2>&1 && dpkg -x libb64-0d_*.deb x) \
  || { echo "apt-get download libb64-0d failed"; exit 1; }
cp -L "$work"/x/usr/lib/x86_64-linux-gnu/libb64.so.0d "$CARRY/gpu-1/"
rm -rf "$work"

echo "part 2: PyAV, ultralytics, openai-whisper, easyocr and dependencies"
download "$CARRY/gpu-2" "$(pin av)" "$(pin ultralytics)" "$(pin easyocr)" "$(pin tqdm)" ultralytics-thop \
  more-itertools python-bidi pyclipper shapely python-rapidjson
# openai-whisper is published as a source distribution only: build its (pure Python) wheel here.
work=$(mktemp -d)
"$PY" -m pip download --quiet --no-deps --no-binary=:all: -d "$work" "$(pin openai-whisper)"
"$PY" -m pip wheel --quiet --no-deps -w "$CARRY/gpu-2" "$work"/openai_whisper-*.tar.gz
rm -rf "$work"

status=0
for part in "$CARRY/gpu-1" "$CARRY/gpu-2"; do
  size=$(du -sb "$part" | cut -f1)
  printf '%s: %d files, %.1f MiB\n' "${part#"$ROOT"/}" "$(ls "$part" | wc -l)" "$(echo "$size / 1048576" | bc -l)"
  if [ "$size" -gt "$LIMIT" ]; then echo "  over the 64 MiB a copy may carry"; status=1; fi
done
echo "then on the GPU machine (perf/gpu/README.md): copy .carry/gpu-1, run 'bash perf/gpu/run.sh';"
echo "copy .carry/gpu-2, run 'bash perf/gpu/run.sh' again (installed parts stay in .gpu-env/)"
exit $status
