#!/bin/bash
# `make gpu-bundle`: what the GPU machine (no Docker, no package index, Python 3.12; perf/gpu/README.md) needs to
# run perf/gpu/run.sh, packed small enough to travel with a device call (64 MiB with the tracked files), into
# the ignored folder .carry/:
#   .carry/gpu-base/base.tar.xz  the carried rows of perf/gpu/packages.py for CPython 3.12 x86_64, unpacked:
#                                site/   every carried package but numpy, and the Triton 2.51 server of the
#                                        nvidia-pytriton wheel (binary, Python backend, 3.12 stub, its libraries)
#                                numpy1/ numpy 1.26.4 (first on the path of the Python stubs only)
#   .carry/gpu-perf/             perf_analyzer (xz) and Debian's libb64.so.0d: call 2 only
# Versions are those installed in this checkout's .venv (requirements.txt), so the GPU run measures what the
# tests here ran. Every ELF file is stripped of what loading it does not need (strip --strip-unneeded, as
# distributions strip theirs: debug sections and the static symbol table; 2 MiB of the xz); perf_client, a
# second copy of perf_analyzer, is dropped. Then DRY_RUN=1 perf/gpu/run.sh checks both calls' carry.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
CARRY=${CARRY:-$ROOT/.carry}
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
               --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
               --platform manylinux1_x86_64)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/base/site" "$STAGE/base/numpy1" "$STAGE/perf" "$STAGE/sdist"

pip() {  # this machine's pip, without the warnings about its absent local mirrors
  "$PY" -m pip "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
install_into() {  # target folder, requirements or wheel files...: unpacked as pip installs them, for cp312
  local target=$1; shift
  pip install --quiet --no-deps --no-compile --no-warn-script-location --target "$target" "${PLATFORM_ARGS[@]}" "$@"
}

echo "packages (perf/gpu/packages.py, carried rows, versions of $PY):"
wheels=() ; sdists=() ; server=""
while read -r pin form; do
  echo "  $pin ($form)"
  case $form in
    wheel) [[ $pin == numpy==* ]] && numpy=$pin || wheels+=("$pin") ;;
    sdist) sdists+=("$pin") ;;
    server) server=$pin ;;
  esac
done < <("$PY" perf/gpu/packages.py pins)
for pin in "${sdists[@]}"; do
  # published as a source distribution only (openai-whisper): build its pure-Python wheel here
  pip download --quiet --no-deps --no-binary=:all: -d "$STAGE/sdist" "$pin"
  pip wheel --quiet --no-deps -w "$STAGE/sdist" "$STAGE"/sdist/*.tar.gz
  rm "$STAGE"/sdist/*.tar.gz
done
install_into "$STAGE/base/numpy1" "$numpy"
install_into "$STAGE/base/site" "${wheels[@]}" "$STAGE"/sdist/*.whl

# The Triton server as the nvidia-pytriton wheel lays it out (trident_serving.server finds it through the
# `pytriton` package): the 3.12 stub only, no bundled libpython (the machine has its own), an empty
# pytriton/__init__.py (the real one imports PyTriton's own client, which nothing here uses).
site_packages=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent.parent)')
tar -C "$site_packages" -cf - --exclude='__pycache__' --exclude='nvidia_pytriton.libs/libpython3*' \
  pytriton/tritonserver nvidia_pytriton.libs | tar -C "$STAGE/base/site" -xf -
stubs=$STAGE/base/site/pytriton/tritonserver/python_backend_stubs
find "$stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
[ -x "$stubs/3.12/triton_python_backend_stub" ] || { echo "no Python 3.12 stub in $site_packages/pytriton"; exit 1; }
: > "$STAGE/base/site/pytriton/__init__.py"
mkdir "$STAGE/base/site/nvidia_pytriton-${server#*==}.dist-info"
printf 'Metadata-Version: 2.1\nName: nvidia-pytriton\nVersion: %s\nSummary: server part only (perf/gpu/bundle.sh)\n' \
  "${server#*==}" > "$STAGE/base/site/nvidia_pytriton-${server#*==}.dist-info/METADATA"

# perf_analyzer (tritonclient's wheel puts it in bin/) travels in call 2 only; perf_client is the same binary.
mv "$STAGE/base/site/bin/perf_analyzer" "$STAGE/perf/"
rm -rf "$STAGE/base/site/bin"
rm -rf "$STAGE"/base/numpy1/numpy/*/tests "$STAGE"/base/numpy1/numpy/tests
work=$(mktemp -d -p "$STAGE")
(cd "$work" && apt-get download libb64-0d >/dev/null 2>&1 && dpkg -x libb64-0d_*.deb x) \
  || { echo "apt-get download libb64-0d failed"; exit 1; }
cp -L "$work"/x/usr/lib/x86_64-linux-gnu/libb64.so.0d "$STAGE/perf/"
rm -rf "$work"

before=$(du -sb "$STAGE/base" "$STAGE/perf" | awk '{s += $1} END {print s}')
find "$STAGE/base" "$STAGE/perf" -type f -print0 | while IFS= read -r -d '' f; do
  [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] && strip --strip-unneeded "$f"
done
after=$(du -sb "$STAGE/base" "$STAGE/perf" | awk '{s += $1} END {print s}')
printf 'unpacked: %.1f MiB, %.1f MiB after strip --strip-unneeded\n' "$(echo "$before / 1048576" | bc -l)" \
  "$(echo "$after / 1048576" | bc -l)"

rm -rf "$CARRY/gpu-base" "$CARRY/gpu-perf"
mkdir -p "$CARRY/gpu-base" "$CARRY/gpu-perf"
echo "compressing (xz -9, a few minutes) ..."
tar -C "$STAGE/base" -cf - site numpy1 | xz -9 -T0 > "$CARRY/gpu-base/base.tar.xz"
xz -9 -T0 -c "$STAGE/perf/perf_analyzer" > "$CARRY/gpu-perf/perf_analyzer.xz"
cp "$STAGE/perf/libb64.so.0d" "$CARRY/gpu-perf/"
for part in gpu-base gpu-perf; do
  # install stamps on the device are keyed to this file: a new bundle is installed afresh
  { echo "# perf/gpu/bundle.sh $(date -u '+%Y-%m-%d %H:%M UTC'), for CPython 3.12 x86_64"
    "$PY" perf/gpu/packages.py pins
    (cd "$CARRY/$part" && sha256sum -- *)
  } > "$CARRY/$part/MANIFEST"
  printf '%s: %.1f MiB\n' ".carry/$part" "$(du -sb "$CARRY/$part" | cut -f1 | awk '{print $1 / 1048576}')"
done
DRY_RUN=1 bash perf/gpu/run.sh call1 && DRY_RUN=1 bash perf/gpu/run.sh call2
