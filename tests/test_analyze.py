"""`trident analyze` (trident.analyze.pipeline) over the real server, on the generated test media
(tests/data/make_media.py).

Synthetic weights (the session's server), through the CLI: the pipeline's results equal the models served one
request at a time on the same inputs (the transcript equals `whisper` on the extracted audio with word timestamps;
each frame's detections and text equal `detect` and `easyocr` on the frame sampled the same way, text scores to
1e-4 since the recogniser batches other crops with them); analysis.json
validates against its schema; every bad input gives its stated result while the others are analysed; a server
that goes away mid-run, and Ctrl-C, leave the partial results written.

Real weights (the real-weights server: Whisper base, EasyOCR English; YOLO synthetic), on the 640x360 copy of the
test video at 0.5 frame/s: the transcript's word error rate is at most 0.2 (measured 0.091: "a city must wait" for
"a city bus waits", "jump" for "jumps"), each sentence's words are timed while it is spoken, and every word of
each on-screen text is read on every analysed frame showing it, in a text event starting at the first of them.
By hand on the 720p video at 1 frame/s: WER 0.097, every on-screen text read; EasyOCR English takes ~6 s of
this 2-core CPU per 720p frame (perf.pipeline), ~1.3 s per 640x360 frame.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from real_speech import english_words, error_rate
from test_analyze_output import _ffmpeg_cues

from trident import cli, media
from trident.analyze import events, pipeline, subtitles
from trident.analyze.results import SCHEMA, Analysis, Options

pytestmark = [pytest.mark.yolo, pytest.mark.whisper, pytest.mark.easyocr]
ROOT = Path(__file__).resolve().parent.parent
FPS = 0.5  # synthetic runs: 10 frames of the 20 s video
GREEDY = "0"  # the same transcript every run: random weights fail whisper's checks, and sampling is random
TIMEOUT = 600.0
# the run is cut once this much is sent: the audio (240 kB) and a few of the 320x180 frames (~100 kB of PNG each)
SENT_BEFORE_THE_END = 600_000
SCHEMA_FILE = ROOT / "client" / "trident" / "analyze" / "schema.json"


def validate(document: dict) -> None:
    jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text())).validate(document)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def inputs(media_dir, tmp_path_factory) -> dict[str, Path]:
    """The inputs of the synthetic runs: good, odd and bad. The videos are the test video at 320x180 (OCR of a
    720p frame costs seconds of CPU; the plumbing is the same)."""
    made = tmp_path_factory.mktemp("inputs")
    small = media_dir / "small.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(small), "-an", "-c", "copy",
                    "-movflags", "+faststart", str(made / "silent.mp4")], check=True)
    data = small.read_bytes()
    (made / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])  # the index, written first, survives
    (made / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    (made / "notes.txt").write_text("not media")
    return {"video": small, "audio": media_dir / "speech.m4a", "silent": made / "silent.mp4",
            "image": ROOT / "tests" / "data" / "ocr_en_sign.jpg", "truncated": made / "truncated.mp4",
            "garbage": made / "garbage.mp4", "unknown": made / "notes.txt", "missing": made / "missing.mov"}


@pytest.fixture(scope="module")
def synthetic(triton, inputs, tmp_path_factory) -> tuple[Analysis, dict, Path, int, str]:
    """`trident analyze` of every input on the session's server: (analysis read back, its JSON, the output folder,
    exit code, what it printed)."""
    out = tmp_path_factory.mktemp("analysis")
    code, printed, _ = run_cli("--url", triton.grpc_url, "--timeout", str(TIMEOUT), "analyze",
                               *map(str, inputs.values()), "--fps", str(FPS), "--temperature", GREEDY,
                               "--out", str(out), "--quiet")
    document = json.loads((out / "analysis.json").read_text())
    return Analysis.from_dict(document), document, out, code, printed


def by_name(analysis: Analysis) -> dict[str, object]:
    return {Path(f.path).name: f for f in analysis.inputs}


def test_synthetic_run_validates_and_reports_each_input(synthetic, inputs):
    analysis, document, out, code, printed = synthetic
    validate(document)
    assert document["schema"] == SCHEMA and code == 1  # some inputs failed
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "report.html", "small.srt", "small.vtt",
                                                    "speech.srt", "speech.vtt"]
    files = by_name(analysis)
    assert set(files) == {p.name for p in inputs.values()}
    video, audio, silent, image = (files[inputs[k].name] for k in ("video", "audio", "silent", "image"))
    assert (video.kind, video.error, video.notes, len(video.frames)) == ("video", None, [], 10)
    assert [f.time for f in video.frames] == [2.0 * k for k in range(10)]
    assert [f.index for f in video.frames] == [50 * k for k in range(10)]
    # no video track: transcribed only; no audio track: frames only, and a note
    assert (audio.kind, audio.frames, audio.error, audio.transcript is not None) == ("audio", [], None, True)
    assert (silent.transcript, silent.notes, len(silent.frames)) == (None, ["no audio track: no transcript"], 10)
    assert (image.kind, [f.time for f in image.frames], image.transcript, image.error) == ("image", [0.0], None,
                                                                                           None)
    assert (image.media.width, image.media.height) == (480, 256)
    # bad inputs: an error naming the file each; a truncated one keeps the frames decoded before the damage
    truncated = files["truncated.mp4"]
    assert truncated.error.startswith(f"{inputs['truncated']}: is truncated or corrupt")
    assert 4 <= len(truncated.frames) < 10
    assert files["garbage.mp4"].error.startswith(f"{inputs['garbage']}: cannot be read as audio or video")
    assert files["notes.txt"].error.startswith("not a media file")
    assert files["missing.mov"].error == "does not exist"
    summary = analysis.summary
    assert (summary.files, summary.failed, summary.frames) == (8, 4, 21)
    assert summary.media_seconds == pytest.approx(60.0) and summary.realtime_factor > 0
    assert set(summary.model_seconds) == {"whisper", "detect", "easyocr"}
    assert analysis.server.models == {"whisper": "1", "detect": "1", "easyocr": "1"}
    assert "8 inputs, 4 failed: 60.0 s of media, 21 frames analysed in" in printed and "x realtime" in printed


def test_synthetic_results_equal_each_model_served_alone(synthetic, triton, inputs):
    """What the pipeline found equals the models' answers to the same inputs sent one request at a time."""
    files = by_name(synthetic[0])
    client = triton.client("grpc")
    client.timeout = TIMEOUT
    for name in ("video", "audio"):
        track = media.extract_audio(inputs[name])
        alone = client.transcribe(track.data, temperature=[0.0], word_timestamps=True)
        assert files[inputs[name].name].transcript == pipeline.shifted(alone, track.start)
        assert any(s.words for s in alone.segments)
    samples = list(media.sample_frames(inputs["video"], FPS))
    with ThreadPoolExecutor(4) as pool:
        detections = list(pool.map(lambda s: client.detect(s.image).detections, samples))
        lines = list(pool.map(lambda s: client.read_text(s.image), samples))
    frames = files["small.mp4"].frames
    assert [f.time for f in frames] == [s.frame_time for s in samples]
    assert [f.detections for f in frames] == detections
    assert sum(map(len, lines)) > 0  # the synthetic recogniser reads something: the comparison is not empty
    assert [[(t.text, t.box) for t in f.text] for f in frames] == [[(t.text, t.box) for t in ls] for ls in lines]
    # scores to float noise: the recogniser's batches hold other crops in the pipeline (seen: 2.4e-5)
    np.testing.assert_allclose([t.score for f in frames for t in f.text], [t.score for ls in lines for t in ls],
                               atol=1e-4)
    video = files["small.mp4"]
    assert video.text_events == events.text_events(frames, 1 / FPS)
    assert video.object_counts == events.object_counts(frames)


def test_subtitles_read_back_as_the_transcript_cues(synthetic):
    analysis, _, out, _, _ = synthetic
    transcript = by_name(analysis)["small.mp4"].transcript
    expected = [(round(c.start * 1000), round(c.end * 1000), "\n".join(c.lines)) for c in subtitles.cues(transcript)]
    assert expected and _ffmpeg_cues(out / "small.srt") == expected == _ffmpeg_cues(out / "small.vtt")


def test_unknown_server_or_bad_options_fail_before_decoding(tmp_path, inputs):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code, _, err = run_cli("--url", f"127.0.0.1:{port}", "analyze", str(inputs["image"]), "--out", str(tmp_path))
    assert code == 1 and f"127.0.0.1:{port}" in err and not list(tmp_path.iterdir())
    code, _, err = run_cli("analyze", str(inputs["image"]), "--fps", "0", "--out", str(tmp_path))
    assert code == 2 and "fps must be a positive number" in err
    # cli.main is callable from a program: it leaves the process's signals alone (a SIGPIPE set to its default
    # there once killed this test session at a closed socket; only the `trident` command sets it)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN


# -- the server goes away; Ctrl-C ------------------------------------------------------------------------------------

class Proxy:
    """A TCP proxy to a local port that counts the bytes the client sends; `close()` drops every connection and
    refuses new ones: to the client, the server went away."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:  # closed
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [near, far]
            threading.Thread(target=self._pump, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                self.sent += len(data) if counted else 0
                sink.sendall(data)

    def when_sent(self, nbytes: int, then, timeout: float = 300.0) -> threading.Thread:
        """Call `then()` from a thread once the client has sent `nbytes`."""
        def watch() -> None:
            deadline = time.monotonic() + timeout
            while self.sent < nbytes and time.monotonic() < deadline:
                time.sleep(0.01)
            then()
        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def check_partial(out: Path, inputs: dict[str, Path], first_error: str) -> Analysis:
    document = json.loads((out / "analysis.json").read_text())
    validate(document)
    analysis = Analysis.from_dict(document)
    video, audio = analysis.inputs
    assert video.path == str(inputs["video"]) and video.error.startswith(first_error)
    assert audio.path == str(inputs["audio"]) and audio.error == pipeline.NOT_REACHED
    assert (out / "report.html").is_file()
    return analysis


def test_server_going_away_mid_run_leaves_the_partial_results(triton, inputs, tmp_path):
    proxy = Proxy(triton.options.grpc_port)
    watcher = proxy.when_sent(SENT_BEFORE_THE_END, proxy.close)
    with pytest.raises(pipeline.ServerGone) as gone:
        pipeline.analyze([inputs["video"], inputs["audio"]], f"127.0.0.1:{proxy.port}",
                         options=Options(fps=FPS, temperature=[0.0]), out=tmp_path, timeout=TIMEOUT)
    watcher.join()
    assert str(gone.value).startswith(("whisper: ", "detect: ", "easyocr: "))  # the model whose call broke
    check_partial(tmp_path, inputs, "interrupted: ")
    assert triton.is_ready()


def test_ctrl_c_writes_what_is_done(triton, inputs, tmp_path):
    proxy = Proxy(triton.options.grpc_port)
    command = [sys.executable, "-m", "trident.cli", "--url", f"127.0.0.1:{proxy.port}", "analyze",
               str(inputs["video"]), str(inputs["audio"]), "--fps", str(FPS), "--temperature", GREEDY,
               "--out", str(tmp_path), "--quiet"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watcher = proxy.when_sent(SENT_BEFORE_THE_END, lambda: run.send_signal(signal.SIGINT))
    try:
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()
        proxy.close()
    watcher.join()
    assert run.returncode == 130, err
    assert f"interrupted; what was done is in {tmp_path}/" in err
    check_partial(tmp_path, inputs, "interrupted")
    assert triton.is_ready()


# -- real weights: what the pipeline hears and reads -----------------------------------------------------------------

REAL_FPS = 0.5  # 10 frames: every on-screen text is shown on two or three of them
MAX_WER = 0.2
WORD_SLACK = 1.0  # seconds a word's time may lie outside its sentence (whisper's DTW alignment of espeak-ng speech)


@pytest.fixture(scope="module")
def real_run(real_triton, media_dir, tmp_path_factory):
    """`analyze` of the 640x360 test video on the real-weights server (Whisper base, EasyOCR English; YOLO is
    synthetic there), greedy: (the video's analysis, the video's ground truth)."""
    analysis = pipeline.analyze([media_dir / "medium.mp4"], real_triton.grpc_url,
                                options=Options(fps=REAL_FPS, temperature=[0.0]),
                                out=tmp_path_factory.mktemp("real_analysis"), timeout=TIMEOUT)
    video = analysis.inputs[0]
    assert video.error is None and len(video.frames) == 10
    return video, json.loads((media_dir / "truth.json").read_text())


def test_real_transcript_hears_each_sentence_when_it_is_spoken(real_run):
    video, truth = real_run
    heard = video.transcript
    wer = error_rate([(english_words(" ".join(s["text"] for s in truth["speech"])), english_words(heard.text))])
    print(f"\nWER {wer:.3f}: {heard.text!r}")
    assert wer <= MAX_WER
    words = [w for s in heard.segments for w in s.words]
    for spoken in truth["speech"]:
        during = [w for w in words if spoken["start"] - WORD_SLACK <= w.start and w.end <= spoken["end"] + WORD_SLACK]
        assert len(during) >= len(spoken["text"].split()) * (1 - MAX_WER), (spoken, during)
        assert abs(during[0].start - spoken["start"]) <= WORD_SLACK, (spoken, during[0])
    assert all(any(s["start"] - WORD_SLACK <= w.start and w.end <= s["end"] + WORD_SLACK for s in truth["speech"])
               for w in words), "a word timed where nothing is spoken"


def test_real_text_is_read_on_every_frame_that_shows_it(real_run):
    """Every word of each on-screen text is read on each analysed frame showing it (OCR may split a line into
    words), and a text event holding it starts at the first of those frames."""
    video, truth = real_run
    for shown in truth["texts"]:
        frames = [f for f in video.frames if shown["start"] <= f.time < shown["end"]]
        assert len(frames) >= 2, shown
        for frame in frames:
            read = {word for line in frame.text for word in map(events.normalise, line.text.split())}
            assert {events.normalise(w) for w in shown["text"].split()} <= read, (shown, frame.time, frame.text)
        for word in map(events.normalise, shown["text"].split()):
            assert any(e.start == frames[0].time and word in map(events.normalise, e.text.split())
                       for e in video.text_events), (shown, word, video.text_events)
