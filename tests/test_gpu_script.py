"""The GPU device script (perf/gpu/), checked here in seconds: its package list against the code the stages run
and the carried packages' declared requirements, its dry run (time limits, carry size, what $OUT holds), the
$OUT check and the device's first step (the import table). The device run itself needs the GPU machine; its
CPU rehearsal (`CPU_FALLBACK=1 bash perf/gpu/run.sh call1`) takes minutes and is a manual check.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "perf" / "gpu"))

import packages  # noqa: E402  perf/gpu/packages.py

RUN = ROOT / "perf" / "gpu" / "run.sh"
# The GPU machine's interpreter, for evaluating requirement markers
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Rows no import statement of ours and no declared requirement leads to: each with the evidence checked below
IMPORTED_INSIDE_CARRIED = {"onnx": ("ultralytics", "engine/exporter.py", "import onnx")}


def listed_modules() -> set[str]:
    return {packages.top_level(p.module) for p in packages.PACKAGES}


def listed_distributions() -> set[str]:
    return {canonicalize_name(p.distribution) for p in packages.PACKAGES}


def exempt() -> set[str]:
    return {canonicalize_name(name) for name in packages.NOT_NEEDED}


def carried_requirements() -> dict[str, set[str]]:
    """Distribution -> the carried distributions requiring it on the device (extras the stages use included)."""
    found: dict[str, set[str]] = {}
    for p in packages.PACKAGES:
        if p.source != packages.CARRY or p.form == "server":  # the server: its binaries only, no Python code
            continue
        for extra in ("", *packages.EXTRAS.get(p.distribution, ())):
            for line in metadata.requires(p.distribution) or []:
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate({**DEVICE_MARKERS, "extra": extra}):
                    found.setdefault(canonicalize_name(requirement.name), set()).add(p.distribution)
    return found


def test_every_third_party_import_of_the_stages_is_listed():
    imports = packages.third_party_imports()
    assert {"torch", "ultralytics", "whisper", "easyocr", "av", "tritonclient"} <= set(imports)  # the walk works
    missing = {name: sorted(files) for name, files in imports.items()
               if name not in listed_modules() and canonicalize_name(name) not in exempt()}
    assert not missing, f"imported by the stage code but neither in PACKAGES nor NOT_NEEDED: {missing}"


def test_every_requirement_of_a_carried_package_is_listed():
    missing = {name: sorted(by) for name, by in carried_requirements().items()
               if name not in listed_distributions() and name not in exempt()}
    assert not missing, f"declared by carried packages but neither in PACKAGES nor NOT_NEEDED: {missing}"


def test_every_row_and_exemption_is_still_needed():
    imports = {canonicalize_name(n) for n in packages.third_party_imports()}
    required = set(carried_requirements())
    for module, (distribution, path, statement) in IMPORTED_INSIDE_CARRIED.items():
        source = Path(metadata.distribution(distribution).locate_file(distribution)) / path
        assert statement in source.read_text(), f"{source} no longer has {statement!r}: drop the {module} row?"
    stale = [p.module for p in packages.PACKAGES if p.source != packages.REPO
             and canonicalize_name(packages.top_level(p.module)) not in imports
             and canonicalize_name(p.distribution) not in required and p.module not in IMPORTED_INSIDE_CARRIED]
    stale += [name for name in packages.NOT_NEEDED if canonicalize_name(name) not in imports | required]
    assert not stale, f"listed, but nothing the stages run imports or requires them: {stale}"


def test_our_modules_in_the_table_exist():
    ours = [p.module for p in packages.PACKAGES if p.source == packages.REPO]
    assert ours and all(packages._local_file(m) for m in ours), ours


def test_carried_pins_are_the_tested_versions():
    pinned = dict(line.split("==", 1) for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    pins = dict(line.split()[0].split("==") for line in packages.pins())
    assert pins["numpy"].startswith("1."), "the 2.51 stub needs numpy 1.x"
    differ = {name: (version, pinned[name]) for name, version in pins.items()
              if name in pinned and pinned[name] != version}
    assert not differ, f"carried versions differ from requirements.txt: {differ}"


def test_import_table_names_what_is_missing_or_not_carried(tmp_path):
    rows = (packages.Package("json", "json-stdlib", packages.MACHINE, "a test"),
            packages.Package("no_such_module_here", "no-such-dist", packages.MACHINE, "the table's test"),
            packages.Package("csv", "csv-stdlib", packages.CARRY, "a test"))
    table, problems = packages.check(packages.SERVE, tmp_path, None, rows=rows)
    assert [r[0] for r in table] == ["json", "no_such_module_here", "csv"]
    assert table[0][-1].endswith("json") and len(problems) == 2
    assert problems[0].startswith("no_such_module_here (no-such-dist, machine; needed by the table's test): "
                                  "FAIL: ModuleNotFoundError")
    assert f"not from the carried {tmp_path}" in problems[1]


def test_import_table_checks_the_perf_analyzer_libraries(tmp_path):
    _, problems = packages.check(packages.SERVE, None, Path("/bin/ls"), rows=())
    assert problems == []
    _, problems = packages.check(packages.SERVE, None, tmp_path / "perf_analyzer", rows=())
    assert problems and "missing or not executable" in problems[0]


def dry_run(call: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN), call], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("call", ["call1", "call2"])
def test_dry_run_proves_the_budget_and_the_out_limits(call, tmp_path):
    done = dry_run(call, CARRY=str(tmp_path))  # no bundle here: the carry's size is the next test's
    assert done.returncode == 0, done.stdout + done.stderr
    total = re.search(r"= (\d+) s \(limit 270\)", done.stdout)
    assert total and int(total.group(1)) <= 270, done.stdout
    assert re.search(r"\$OUT: [1-8] files", done.stdout), done.stdout
    assert f'run(command="bash perf/gpu/run.sh {call}"' in done.stdout


def test_dry_run_refuses_stages_over_the_call_limit():
    done = dry_run("call1", CALL1_STAGES="install:25 export:200 check:100")
    assert done.returncode == 1 and "OVER: call 1's stages must all fit whole" in done.stdout, done.stdout
    done = dry_run("call1", CALL1_STAGES="install:25 export")
    assert done.returncode == 1 and "export: no limit" in done.stdout, done.stdout


def test_dry_run_refuses_a_carry_over_the_transfer_limit(tmp_path):
    part = tmp_path / "gpu-base"
    part.mkdir()
    (part / "MANIFEST").write_text("test\n")
    with open(part / "base.tar.xz", "wb") as f:
        f.truncate(65 * 1024 * 1024)  # sparse: over 64 MiB with the tree
    done = dry_run("call1", CARRY=str(tmp_path))
    assert done.returncode == 1 and "OVER: what travels exceeds 64 MiB" in done.stdout, done.stdout


def test_out_check_refuses_what_would_not_come_back(tmp_path):
    def verify(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(RUN), "verify-out", str(folder)], capture_output=True, text=True,
                              timeout=60)

    good = tmp_path / "good"
    (good / "a" / "b").mkdir(parents=True)
    (good / "a" / "b" / "summary.txt").write_text("ok")
    assert verify(good).returncode == 0
    bad = tmp_path / "bad"
    (bad / "a" / "b" / "c").mkdir(parents=True)
    (bad / "a" / "b" / "c" / "deep.txt").write_text("x")
    (bad / "odd name.txt").write_text("x")
    for i in range(8):
        (bad / f"f{i}.log").write_text("x")
    done = verify(bad)
    assert done.returncode == 1
    for message in ("deeper than", "a name of letters", "10 files: at most 8"):
        assert message in done.stdout, done.stdout
