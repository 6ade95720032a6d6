"""`whisper` word timestamps (WORD_TIMESTAMPS) over the real server: parity with
`whisper.transcribe(word_timestamps=True, temperature=0, condition_on_previous_text=False)`.

Synthetic tiny weights (the session's server) for one- and multi-window audio and for concurrent requests with
and without words; the real Whisper base converted from CTranslate2 (a server of its own, as in
tests/test_whisper_real.py) on the espeak-ng clips, its reference model given whisper's own alignment heads for
`base`, which the export must have carried over from CTranslate2's config.json.

The server reuses each window's encoder output from the decoding step for the alignment, where
whisper.transcribe encodes the window again: words and segment texts are compared exactly, times to within
one DTW frame (0.02 s), word probabilities to 1e-3.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import whisper
from conftest import Server, serve
from real_speech import TRUTH, language_of, load_clip

from export import __main__ as export_main
from trident import Client, InvalidInputError
from trident.results import Transcription
from trident_serving.asr import load_model
from trident_serving.audio import SAMPLE_RATE, decode_audio

pytestmark = pytest.mark.whisper
DATA = Path(__file__).resolve().parent / "data"
FRAME = 0.02 + 1e-6  # one DTW frame; the epsilon absorbs the rounding of times to 0.01 s
PROBABILITY = 1e-3
TIMEOUT = 600.0  # seconds per request: two shared CPU cores can be slow


def reference(model, audio: np.ndarray, **options) -> dict:
    return whisper.transcribe(model, audio, word_timestamps=True, temperature=0.0, condition_on_previous_text=False,
                              fp16=False, verbose=None, **options)


def assert_same_words(result: Transcription, expected: dict) -> None:
    """Same segments and words; times within one frame; probabilities close."""
    assert result.text == expected["text"] and result.language == expected["language"]
    assert [s.text for s in result.segments] == [s["text"] for s in expected["segments"]]
    got = [w for s in result.segments for w in s.words]
    want = [w for s in expected["segments"] for w in s["words"]]
    assert [w.word for w in got] == [w["word"] for w in want]
    assert [len(s.words) for s in result.segments] == [len(s["words"]) for s in expected["segments"]]
    np.testing.assert_allclose([(w.start, w.end) for w in got], [(w["start"], w["end"]) for w in want],
                               atol=FRAME, rtol=0)
    np.testing.assert_allclose([w.probability for w in got], [w["probability"] for w in want],
                               atol=PROBABILITY, rtol=0)
    # add_word_timestamps moves segment boundaries onto the words
    np.testing.assert_allclose([(s.start, s.end) for s in result.segments],
                               [(s["start"], s["end"]) for s in expected["segments"]], atol=FRAME, rtol=0)


# ------------------------------------------------------------------------------------ synthetic tiny weights

@pytest.fixture(scope="module")
def model(triton):
    """whisper.load_model on the very checkpoint the server loaded (synthetic: default alignment heads)."""
    manifest = json.loads((triton.repository / "export.json").read_text())
    return whisper.load_model(manifest["whisper"]["weights"], device="cpu")


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    en = decode_audio((DATA / "speech_en.wav").read_bytes())
    ko = decode_audio((DATA / "speech_ko.ogg").read_bytes())
    return {"en": en, "ko": ko, "multi": np.concatenate([en, np.zeros(15 * SAMPLE_RATE, np.float32), ko, en])}


@pytest.fixture(scope="module")
def references(model, clips) -> dict[str, dict]:
    return {name: reference(model, audio) for name, audio in clips.items()}


@pytest.fixture(scope="module")
def plain(model, clips) -> dict[str, dict]:
    """The references without word timestamps."""
    return {name: whisper.transcribe(model, clips[name], temperature=0.0, condition_on_previous_text=False,
                                     fp16=False, verbose=None) for name in ("en", "ko")}


def assert_same_plain(result: Transcription, expected: dict) -> None:
    assert result.text == expected["text"] and all(not s.words for s in result.segments)
    assert [(s.start, s.end, s.text) for s in result.segments] == \
        [(s["start"], s["end"], s["text"]) for s in expected["segments"]]


@pytest.mark.parametrize("clip", ["en", "multi"])
def test_words_equal_whisper_transcribe(triton, references, clips, clip):
    expected = references[clip]
    assert sum(len(s["words"]) for s in expected["segments"]) >= 2, "the comparison must be between words"
    if clip == "multi":
        assert len({s["seek"] for s in expected["segments"]}) >= 2, "the audio must span several windows"
    served = Client(triton.grpc_url, timeout=TIMEOUT).transcribe(clips[clip], temperature=0.0, word_timestamps=True)
    assert_same_words(served, expected)


def test_http_words_and_without_the_input_no_words(triton, references, plain, clips):
    """HTTP carries the BOOL input too; without it SEGMENTS holds no "words" key at all (the output is as before)."""
    http = Client(f"http://{triton.http_url}", timeout=TIMEOUT)
    assert_same_words(http.transcribe(clips["en"], temperature=0.0, word_timestamps=True), references["en"])
    outputs = http.infer("whisper", {"PCM": clips["en"].reshape(1, -1), "TEMPERATURE": np.zeros((1, 1), np.float32)},
                         ["SEGMENTS"])
    segments = json.loads(outputs["SEGMENTS"].reshape(-1)[0])
    assert segments and all("words" not in s for s in segments)
    assert [(s["start"], s["end"], s["text"]) for s in segments] == \
        [(s["start"], s["end"], s["text"]) for s in plain["en"]["segments"]]


def test_concurrent_requests_with_and_without_words(triton, references, plain, clips):
    """Requests with and without words share the scheduler's steps; each gets its own reference's answer."""
    client = Client(triton.grpc_url, timeout=TIMEOUT)
    asks = [("multi", True), ("ko", False), ("en", True), ("ko", True), ("en", False)]
    with ThreadPoolExecutor(len(asks)) as pool:
        results = list(pool.map(lambda ask: client.transcribe(clips[ask[0]], temperature=0.0,
                                                                word_timestamps=ask[1]), asks))
    for (name, words), result in zip(asks, results):
        if words:
            assert_same_words(result, references[name])
        else:
            assert_same_plain(result, plain[name])


@pytest.mark.parametrize("value, message", [
    (np.array([[1.0]], np.float32), "WORD_TIMESTAMPS"),  # wrong type: Triton checks it against the config
    (np.array([[True, False]]), "WORD_TIMESTAMPS"),  # wrong shape
])
def test_bad_word_timestamps_input(triton, value, message):
    client = Client(triton.grpc_url)
    with pytest.raises(InvalidInputError, match=message):
        client.infer("whisper", {"PCM": np.zeros((1, 1600), np.float32), "WORD_TIMESTAMPS": value}, ["TEXT"])
    assert triton.is_ready()


# ------------------------------------------------------------------------------------------------ real weights

@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Server:
    """A server of its own serving only the converted Whisper base (CPU), on free ports."""
    repo = tmp_path_factory.mktemp("words_real_repository")
    assert export_main.main(["whisper", "--weights", "base-offline", "--kind", "cpu", "--repo", str(repo)]) == 0
    with serve(repo, tmp_path_factory.mktemp("words_real_run")) as started:
        yield started


def test_real_weights_words_equal_whisper_transcribe(real):
    checkpoint = json.loads((real.repository / "export.json").read_text())["whisper"]["weights"]
    base = whisper.load_model(checkpoint, device="cpu")
    base.set_alignment_heads(whisper._ALIGNMENT_HEADS["base"])
    # The export carried CTranslate2's alignment heads, equal to whisper's own for base (not the default).
    assert load_model(checkpoint).alignment_heads.to_dense().equal(base.alignment_heads.to_dense())
    audio = {name: load_clip(name) for name in TRUTH}
    english = [name for name in TRUTH if TRUTH[name]["language"] == "en"]
    gap = np.zeros(12 * SAMPLE_RATE, np.float32)
    audio["long"] = np.concatenate([audio[english[0]], gap, audio[english[1]], gap, audio[english[2]]])  # 40 s
    language = {name: language_of(name) if name in TRUTH else None for name in audio}
    client = Client(real.grpc_url, timeout=TIMEOUT)
    with ThreadPoolExecutor(len(audio)) as pool:
        served = dict(zip(audio, pool.map(lambda n: client.transcribe(audio[n], language=language[n],
                                                                       temperature=0.0, word_timestamps=True),
                                          audio)))
    for name in audio:
        expected = reference(base, audio[name], language=language[name])
        print(f"\n{name}: {[(w['word'], w['start'], w['end']) for s in expected['segments'] for w in s['words']]}")
        assert_same_words(served[name], expected)
    assert [w for s in served["long"].segments for w in s.words][-1].end > 30, "words in the second window"
