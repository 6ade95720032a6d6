"""GPU results against CPU fp32 references, within stated fp16 tolerances (perf/gpu/run.sh, stage `check`).

Starts the local server on the repository (every instance on the GPU: exported with `--kind gpu`), records
NVML's GPU memory per process once loaded and after the checks, and compares, on the suite's inputs:

* `yolov8` (PyTorch fp16 on the GPU) with onnxruntime fp32 on the CPU running the repository's `model.onnx`
  (the same weights) on the same letterboxed tensors: box rows |diff| <= 1 px at the 99.9th percentile,
  class scores |diff| <= 0.01 everywhere. fp16 has 11 significant bits: ~0.3 px at 640, ~5e-4 on a score.
* `detect` with ultralytics `YOLO(model.onnx).predict()` (defaults: rect letterbox) on the CPU, on 640x480,
  16:9, wide and portrait photos: >= 95 % of the reference boxes matched by a served box of the same class with IoU >= 0.9 and |score diff| <= 0.02 (NMS may flip near-ties).
* `whisper` (fp16) with `whisper.transcribe` fp32 greedy on the CPU, 5 s clips: difflib similarity of the
  texts >= 0.8 (synthetic weights decode long runs of near-tied tokens; one flip changes the rest).
* `easyocr` with `Reader.readtext` fp32 on the CPU (quantize=False): >= 90 % of the reference lines matched
  by a served line with the same text, corners within 2 px and |score diff| <= 0.02.

    python perf/gpu/check.py --repository DIR --out DIR [--kind gpu|cpu] [--memory-csv FILE] [--models yolov8,...]

Writes checks.json (after each check, with the seconds each took); exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import difflib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from perf import inputs  # noqa: E402

TOLERANCES = {
    "yolov8": {"box_px_p999": 1.0, "score_abs_max": 0.01},
    "detect": {"matched_min": 0.95, "iou_min": 0.9, "score_abs": 0.02},
    "whisper": {"similarity_min": 0.8},
    "easyocr": {"matched_min": 0.9, "corner_px": 2.0, "score_abs": 0.02},
}


def record_memory(path: Path | None, label: str) -> list[dict]:
    """NVML's memory per process (nvidia-smi), appended to `path` as CSV: label, pid, MiB, command line."""
    if not shutil.which("nvidia-smi"):
        return []
    done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True)
    found = []
    for line in done.stdout.splitlines():
        pid, mib = (part.strip() for part in line.split(",")[:2])
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            command = ""
        model = command.split("/1/model.py")[0].rsplit("/", 1)[-1] if "/1/model.py" in command else "tritonserver"
        found.append({"stage": label, "pid": int(pid), "used_mib": float(mib), "process": model})
    if path is not None:
        with open(path, "a") as f:
            for row in found:
                f.write(f"{label},{row['pid']},{row['used_mib']},{row['process']}\n")
    return found


def infer(client, model: str, inputs_: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, array in inputs_.items():
        dtype = "BYTES" if array.dtype == np.object_ else "FP32"
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                          client_timeout=600)
    return {n: result.as_numpy(n) for n in outputs}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def check_yolov8(client, repository: Path, manifest: inputs.Manifest) -> dict:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(repository / "yolov8" / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    box, score = [], []
    for name in manifest.sets["letterboxed"].files:
        x = inputs.letterboxed(manifest.path(name).read_bytes())[None]
        served = infer(client, "yolov8", {"images": x}, ["output0"])["output0"]
        reference = session.run(["output0"], {"images": x})[0]
        box.append(np.abs(served[:, :4] - reference[:, :4]).ravel())
        score.append(np.abs(served[:, 4:] - reference[:, 4:]).ravel())
    box_p999, score_max = float(np.percentile(np.concatenate(box), 99.9)), float(np.concatenate(score).max())
    t = TOLERANCES["yolov8"]
    return {"box_px_p999": box_p999, "score_abs_max": score_max,
            "passed": box_p999 <= t["box_px_p999"] and score_max <= t["score_abs_max"]}


def check_detect(client, repository: Path, manifest: inputs.Manifest) -> dict:
    from ultralytics import YOLO

    model = YOLO(str(repository / "yolov8" / "1" / "model.onnx"), task="detect")
    t = TOLERANCES["detect"]
    matched = total = served_total = 0
    sets = ("jpeg-640x480", "jpeg-1280x720", "jpeg-1280x320", "jpeg-720x1280")
    for name in [file for s in sets for file in manifest.sets[s].files]:
        data = manifest.path(name).read_bytes()
        out = infer(client, "detect", {"IMAGE": np.array([[data]], dtype=np.object_)}, ["BOXES", "SCORES", "CLASSES"])
        boxes, scores, classes = out["BOXES"][0], out["SCORES"][0], out["CLASSES"][0]
        reference = model.predict(str(manifest.path(name)), verbose=False, device="cpu")[0].boxes
        served_total += len(boxes)
        for ref_box, ref_score, ref_class in zip(reference.xyxy.numpy(), reference.conf.numpy(),
                                                 reference.cls.numpy().astype(int)):
            total += 1
            matched += any(c == ref_class and abs(s - ref_score) <= t["score_abs"] and iou(b, ref_box) >= t["iou_min"]
                           for b, s, c in zip(boxes, scores, classes))
    fraction = matched / total if total else 1.0
    return {"reference_boxes": total, "served_boxes": served_total, "matched": fraction,
            "passed": fraction >= t["matched_min"] and total > 0}


def check_whisper(client, repository: Path, manifest: inputs.Manifest) -> dict:
    import whisper

    from perf.baselines import whisper_checkpoint
    from trident_serving.audio import decode_audio

    model = whisper.load_model(str(whisper_checkpoint(repository)), device="cpu")
    similarities, pairs = [], []
    for name in manifest.sets["speech-5s"].files:
        data = manifest.path(name).read_bytes()
        served = infer(client, "whisper", {"AUDIO": np.array([[data]], dtype=np.object_),
                                           "TEMPERATURE": np.zeros((1, 1), np.float32)}, ["TEXT"])["TEXT"][0, 0]
        served = served.decode("utf-8")
        reference = whisper.transcribe(model, decode_audio(data), temperature=0.0, condition_on_previous_text=False,
                                       fp16=False)["text"]
        similarities.append(difflib.SequenceMatcher(None, served, reference).ratio())
        pairs.append({"served": served[:200], "reference": reference[:200]})
    return {"similarity": similarities, "texts": pairs,
            "passed": min(similarities) >= TOLERANCES["whisper"]["similarity_min"]}


def check_easyocr(client, repository: Path, manifest: inputs.Manifest) -> dict:
    from trident_serving.ocr import load_reader

    reader = load_reader(repository / "easyocr" / "1" / "weights", "cpu")
    t = TOLERANCES["easyocr"]
    matched = total = 0
    for name in manifest.sets["pages-1280x720"].files[:2]:
        data = manifest.path(name).read_bytes()
        out = infer(client, "easyocr", {"IMAGE": np.array([[data]], dtype=np.object_)}, ["BOXES", "TEXTS", "SCORES"])
        served = list(zip(out["BOXES"][0], [x.decode("utf-8") for x in out["TEXTS"][0]], out["SCORES"][0]))
        for box, text, score in reader.readtext(str(manifest.path(name))):
            total += 1
            box = np.asarray(box, np.float32)
            matched += any(text == s_text and np.abs(box - s_box).max() <= t["corner_px"]
                           and abs(score - s_score) <= t["score_abs"] for s_box, s_text, s_score in served)
    fraction = matched / total if total else 1.0
    return {"reference_lines": total, "matched": fraction, "passed": fraction >= t["matched_min"]}


CHECKS = {"yolov8": check_yolov8, "detect": check_detect, "whisper": check_whisper, "easyocr": check_easyocr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=inputs.DEFAULT_DIR)
    parser.add_argument("--kind", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--memory-csv", type=Path, default=None)
    parser.add_argument("--models", default=",".join(CHECKS), help="comma separated (default: all four); the "
                        "served models of the repository (detect, yolov8, whisper, easyocr)")
    args = parser.parse_args(argv)
    checks = {}
    for name in (m for m in args.models.split(",") if m):
        if name not in CHECKS:
            parser.error(f"--models: no check for {name!r}; choose from {', '.join(CHECKS)}")
        checks[name] = CHECKS[name]

    import tritonclient.grpc as grpcclient

    from trident_serving import server

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = inputs.Manifest.load(args.data) if (args.data / "manifest.json").exists() else inputs.generate(args.data)
    options = server.on_free_ports(repository=args.repository, run_dir=args.out / "server")
    results: dict = {"tolerances": TOLERANCES, "kind": args.kind}

    def save() -> None:  # after each check: a run cut at its time limit keeps the checks done
        (args.out / "checks.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=float))

    started = time.monotonic()
    server.start(options)
    results["server_start_s"] = round(time.monotonic() - started, 1)
    try:
        results["memory_loaded"] = record_memory(args.memory_csv, "loaded")
        save()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{options.grpc_port}")
        for name, check in checks.items():
            started = time.monotonic()
            try:
                results[name] = check(client, args.repository, manifest)
            except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
                results[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            results[name]["seconds"] = round(time.monotonic() - started, 1)
            save()
            print(f"{name:8s} {'PASS' if results[name]['passed'] else 'FAIL'} "
                  f"{ {k: v for k, v in results[name].items() if k not in ('passed', 'texts')} }", flush=True)
        results["memory_after_checks"] = record_memory(args.memory_csv, "after checks")
        save()
    finally:
        server.stop(options)
    print(f"server ready in {results['server_start_s']} s")
    for row in results["memory_after_checks"]:
        print(f"GPU memory {row['process']:14s} pid {row['pid']}: {row['used_mib']:.0f} MiB")
    return 0 if all(results[n]["passed"] for n in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
