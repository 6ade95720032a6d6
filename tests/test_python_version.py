"""The README's Python version claim is the interpreter the suite runs on (CI), so the claim stays tested."""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_claims_the_tested_python():
    claimed = re.findall(r"\*\*Python (\d+)\.(\d+)\*\*", README.read_text(encoding="utf-8"))
    assert claimed, "README must state the supported Python version as **Python X.Y**"
    assert (sys.version_info.major, sys.version_info.minor) in {(int(a), int(b)) for a, b in claimed}
