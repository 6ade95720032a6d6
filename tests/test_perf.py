"""The benchmark suite (perf/): input-data files, a smoke run against the test server, perf_analyzer failures."""
from __future__ import annotations

import base64
import csv
import json
import struct

import numpy as np
import pytest

from perf import analyzer, inputs, suite
from perf.__main__ import main as perf_main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The generated inputs (photos, letterboxed tensors, speech clips, text pages) and their manifest."""
    return inputs.generate(tmp_path_factory.mktemp("perf-data"), pages=2)


def test_input_data_round_trip(data):
    """Every element of every --input-data file decodes back to the bytes of the file it was made from."""
    assert set(data.sets) >= {"jpeg-640x480", "jpeg-1280x720", "jpeg-1280x320", "jpeg-720x1280", "letterboxed",
                              "letterboxed-square", "speech-5s", "speech-30s", "speech-2min", "pages-1280x720"}
    for input_set in data.sets.values():
        entries = json.loads(data.path(input_set.input_data).read_text())["data"]
        assert len(entries) == len(input_set.files) >= 2
        for entry, name in zip(entries, input_set.files):
            original = data.path(name).read_bytes()
            sent = inputs.read_entry(entry)  # what the suite's warm-up request sends
            if input_set.model == "yolov8":
                expected = inputs.letterboxed(original, input_set.letterbox)
                assert expected.shape == ((3, 480, 640) if input_set.letterbox == "rect" else (3, 640, 640))
                np.testing.assert_array_equal(sent["images"], expected[None])
            else:
                assert sent["AUDIO" if input_set.model == "whisper" else "IMAGE"].tolist() == [[original]]
            if input_set.model == "yolov8":
                element = entry["images"]
                tensor = np.frombuffer(base64.b64decode(element["b64"]), "<f4").reshape(element["shape"])
                np.testing.assert_array_equal(tensor, expected)
                continue
            key = "AUDIO" if input_set.model == "whisper" else "IMAGE"
            assert inputs.deserialize_bytes(entry[key]) == original
            raw = base64.b64decode(entry[key]["b64"])
            assert struct.unpack("<I", raw[:4])[0] == len(original)  # the serialized string-tensor form
    # what the inputs are: real sizes and lengths
    import cv2

    for label, (width, height) in inputs.IMAGE_SIZES.items():
        for name in data.sets[f"jpeg-{label}"].files:
            assert cv2.imread(str(data.path(name))).shape == (height, width, 3)
    from trident_serving.audio import decode_audio

    for name in data.sets["speech-30s"].files:
        assert len(decode_audio(data.path(name).read_bytes())) == 30 * inputs.SAMPLE_RATE
    with pytest.raises(ValueError, match="length prefix"):
        inputs.deserialize_bytes({"b64": base64.b64encode(b"\xff\xff\x00\x00abc").decode()})


def test_batching_off_override():
    """The 'off' override drops dynamic batching only; whisper also gets one window per step."""
    config = {"name": "whisper", "max_batch_size": 16, "dynamic_batching": {"max_queue_delay_microseconds": 2000},
              "instance_group": [{"count": 1, "kind": "KIND_CPU"}], "parameters": {"checkpoint": {"string_value": "x"}}}
    off = suite.batching_off(config)
    assert "dynamic_batching" not in off and off["instance_group"] == config["instance_group"]
    assert off["parameters"] == {"checkpoint": {"string_value": "x"}, "max_windows_per_step": {"string_value": "1"}}
    assert "dynamic_batching" in config  # the loaded config is not modified
    assert "parameters" not in suite.batching_off({"name": "detect", "dynamic_batching": {}})


@pytest.mark.yolo
def test_smoke_run_writes_csv_plots_and_report(triton, data, tmp_path):
    """One model, two concurrency levels, seconds long: CSV, JSON, three PNG plots and the Markdown report."""
    out = tmp_path / "out"
    status = perf_main(["--mode", "smoke", "--models", "detect", "--url", triton.grpc_url,
                        "--metrics-url", f"127.0.0.1:{triton.options.metrics_port}/metrics", "--no-toggle",
                        "--repository", str(triton.repository), "--data", str(data.folder), "--out", str(out),
                        "--concurrency", "1,2", "--no-progress"])
    assert status == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["batching"], int(r["concurrency"])) for r in rows] == [("detect", "on", 1),
                                                                                 ("detect", "on", 2)]
    for row in rows:
        assert float(row["throughput"]) > 0 and float(row["p99_ms"]) >= float(row["p50_ms"]) > 0
        assert float(row["compute_infer_ms"]) > 0  # the server-side split is there
        assert float(row["throughput_vs_baseline"]) > 0  # ratio to in-process YOLO.predict
    for name in ("throughput.png", "latency.png", "server_split.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "YOLO.predict" in report and "| detect | jpeg-640x480 | on | 2 |" in report and "machine:" in report
    payload = json.loads((out / "results.json").read_text())
    assert payload["baselines"][0]["model"] == "detect" and payload["environment"]["versions"]["tritonclient"]


@pytest.mark.yolo
def test_perf_analyzer_failure_is_reported(triton, data, tmp_path, capsys):
    """Bad input data (the raw file in "b64", no length prefix): the run fails with perf_analyzer's message."""
    jpeg = data.path(data.sets["jpeg-640x480"].files[0]).read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"IMAGE": {"b64": base64.b64encode(jpeg).decode()}}]}))
    measurement = analyzer.Measurement(model="detect", input_data=bad, concurrency=1, url=triton.grpc_url,
                                       metrics_url=None, interval_ms=500, stability_percent=1000, max_trials=2,
                                       timeout_s=60)
    with pytest.raises(analyzer.PerfAnalyzerError) as failure:
        analyzer.run(measurement, tmp_path / "pa")
    message = str(failure.value)
    assert "perf_analyzer failed" in message and "detect" in message
    assert len(message.splitlines()) > 2  # perf_analyzer's own lines, not just ours
    # through the CLI: exit status 1, the message on stderr, no report
    manifest = json.loads(data.path("manifest.json").read_text())
    manifest["sets"]["jpeg-640x480"]["input_data"] = str(bad)
    folder = tmp_path / "data"
    folder.mkdir()
    for name in manifest["sets"]["jpeg-640x480"]["files"]:
        (folder / name).write_bytes(data.path(name).read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))
    status = perf_main(["--mode", "smoke", "--models", "detect", "--url", triton.grpc_url, "--no-toggle",
                        "--repository", str(triton.repository), "--data", str(folder), "--out", str(tmp_path / "out"),
                        "--concurrency", "1", "--no-baselines", "--no-progress"])
    assert status == 1
    assert "perf_analyzer failed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()
