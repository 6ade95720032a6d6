"""`python perf/gpu/sweep.py [python -m perf arguments]`: `python -m perf --mode gpu` fitted to one device call.

The gpu mode's full sweep (perf/suite.py: 2.5 s windows, up to 4 per level, five levels for whisper) takes about
eight minutes, more than the second call of perf/gpu/run.sh may run. This plan keeps what the goals need: per
model the library baseline, concurrency 1 and one high level with batching on, the high level with batching
off (the gain). Three time windows per level, reported as seen (stability 1000 %: an unstable level would
stop the whole run and lose the report): 1 s, 2 s for easyocr and 4 s for whisper, whose requests (a 30 s
window of synthetic weights: up to 224 tokens) take ~2 s alone, so that every window sees requests finish.
Ctrl-C or SIGINT writes the report of what was measured so far (perf/__main__.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perf import __main__ as perf_main, suite  # noqa: E402

# model -> [(input set, concurrency levels)]; "off" is measured at the highest level
PLAN = {
    "detect": [("jpeg-640x480", (1, 128))],
    "whisper": [("speech-30s", (1, 32))],  # the goal is stated on 30 s clips (one window each)
    "easyocr": [("pages-1280x720", (1, 16))],
    "yolov8": [("letterboxed", (1, 128))],
}
WINDOWS = ("time", 1000, 1000.0, 3)  # time windows of 1000 ms, stability 1000 % (always accepted), 3 trials
SLOW = {"whisper": 0.25, "easyocr": 0.5}  # their windows: 1000 ms / SLOW
MODELS = ",".join(PLAN)  # the order they run in: the goals' models first


def main(argv: list[str]) -> int:
    # perf/suite.py reads these tables when it runs (report.py shares the SETTINGS dict): the gpu entries
    # are replaced in place for this process only.
    suite.PLANS["gpu"] = PLAN
    suite.SETTINGS["gpu"] = WINDOWS
    suite.SLOW.update(SLOW)
    return perf_main.main(["--mode", "gpu", "--models", MODELS, "--baseline-seconds", "2", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
