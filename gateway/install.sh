#!/bin/sh
# The gateway image's Python packages (gateway/Dockerfile; tests/test_deploy.py runs it into a fresh venv): numpy,
# the trident client with its media extra (PyAV: the analysis jobs decode uploads) and the gateway, at the versions
# requirements.txt pins, given as constraints (pip takes no extras there: they are cut).
# Usage: install.sh ROOT [PYTHON], ROOT holding requirements.txt, client/ and gateway/.
set -eu
root=${1:?usage: install.sh ROOT [PYTHON]}
python=${2:-python}
constraints=$(mktemp)
sed 's/\[[^]]*\]//' "$root/requirements.txt" > "$constraints"
"$python" -m pip install -c "$constraints" numpy "$root/client" "$root/gateway"
rm -f "$constraints"
