"""What pip installs from the image's and the deploy host's requirements, resolved for a target Python without
installing anything (`pip install --dry-run --report`), and the image's lock file made from it.

    make image-lock      (python deploy/pip_resolve.py) rewrite deploy/constraints-image.txt after a pin changes

tests/test_deploy.py resolves with the same functions: the image's pins with its lock for CPython 3.10, the
host's requirements for 3.10, 3.11 and 3.12.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEPLOY = Path(__file__).resolve().parent
IMAGE_REQUIREMENTS = DEPLOY / "requirements-image.txt"
NODEPS_REQUIREMENTS = DEPLOY / "requirements-image-nodeps.txt"  # installed with --no-deps (see that file)
HOST_REQUIREMENTS = DEPLOY / "requirements-host.txt"
IMAGE_LOCK = DEPLOY / "constraints-image.txt"
# The 24.10 image: Python 3.10 on Ubuntu 22.04 (glibc 2.35). The deploy host: glibc 2.28 and up (RHEL 8,
# Ubuntu 20.04, Debian 10), resolving against that floor proves every wheel installs there.
IMAGE_PYTHON, IMAGE_GLIBC = "3.10", 35
HOST_PYTHONS, HOST_GLIBC = ("3.10", "3.11", "3.12"), 28
# What pip prints when it could not reach an index (it then reports "no matching distribution" as well).
# pip evaluates environment markers (`; python_version >= "3.11"`) against the interpreter that runs it, even with
# --python-version (which sets only the wheel tags and Requires-Python): run pip's own main with the marker
# values of the target Python.
PIP_FOR_TARGET = """
import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv.pop(1))
running = markers.default_environment()
markers.default_environment = lambda: {**running, **target}
from pip._internal.cli.main import main
sys.exit(main())
"""
NETWORK_ERROR = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                           r"Network is unreachable|ConnectTimeoutError|ReadTimeoutError|Could not fetch URL")


class ResolveError(Exception):
    """pip could not resolve the requirements; `network` when it could not reach a package index."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


def marker_environment(python: str) -> dict[str, str]:
    """The environment-marker values of CPython `python` on x86-64 Linux."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def target_options(python: str, glibc_minor: int) -> list[str]:
    """pip options that select CPython `python` wheels for x86-64 Linux with glibc 2.<glibc_minor>."""
    abi = "cp" + python.replace(".", "")
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
            *(arg for platform in platforms for arg in ("--platform", platform))]


def resolve(requirements: Path, python: str, glibc_minor: int, *options: str) -> list[dict]:
    """The `install` entries of pip's report for `requirements` (with `options`) on that target."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        result = subprocess.run(
            [sys.executable, "-c", PIP_FOR_TARGET, json.dumps(marker_environment(python)),
             "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), "--target", str(Path(scratch) / "target"),
             *target_options(python, glibc_minor), *options, "-r", str(requirements)],
            capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise ResolveError(f"{requirements.name} does not resolve for CPython {python} (glibc 2.{glibc_minor}):\n"
                               f"{result.stderr[-3000:]}", bool(NETWORK_ERROR.search(result.stderr)))
        return json.loads(report.read_text())["install"]


def versions(report: list[dict]) -> dict[str, str]:
    """{canonical name: version} of a resolve's `install` entries."""
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report}


def unmet_nodeps_requirements(installed: dict[str, str], python: str, glibc_minor: int) -> list[str]:
    """What the --no-deps packages (ultralytics, openai-whisper) need that `installed` does not provide.

    ultralytics' GUI `opencv-python` counts as met by `opencv-python-headless`, which provides the same `cv2`.
    """
    environment = {**marker_environment(python), "extra": ""}
    unmet = []
    for item in resolve(NODEPS_REQUIREMENTS, python, glibc_minor, "--no-deps"):
        for line in item["metadata"].get("requires_dist", []):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            name = "opencv-python-headless" if name == "opencv-python" else name
            if name not in installed or not requirement.specifier.contains(installed[name], prereleases=True):
                unmet.append(f"{item['metadata']['name']} needs {line}, gets {installed.get(name, 'nothing')}")
    return unmet


def lock_lines(path: Path = IMAGE_LOCK) -> dict[str, str]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def write_lock() -> None:
    """Resolve the image's requirements afresh (no lock) and write every package of the result to IMAGE_LOCK."""
    installed = versions(resolve(IMAGE_REQUIREMENTS, IMAGE_PYTHON, IMAGE_GLIBC, "--only-binary=:all:"))
    header = (f"# Every package deploy/Dockerfile installs from requirements-image.txt, direct and transitive, as\n"
              f"# pip resolved it for CPython {IMAGE_PYTHON} manylinux (glibc 2.{IMAGE_GLIBC}): the image's lock "
              "(-c).\n"
              "# Written by `make image-lock`; tests/test_deploy.py checks that it is complete and current.\n")
    IMAGE_LOCK.write_text(header + "".join(f"{name}=={version}\n" for name, version in sorted(installed.items())))
    print(f"{IMAGE_LOCK}: {len(installed)} packages")


if __name__ == "__main__":
    write_lock()
