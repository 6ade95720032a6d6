"""`whisper` word timestamps (WORD_TIMESTAMPS) over the real server: parity with
`whisper.transcribe(word_timestamps=True, temperature=0, condition_on_previous_text=False)`.

The engine alone (no server) on synthetic tiny weights: one batch mixing a 47 s and a 9 s audio, with and without
words, where word-driven seeking moves windows. Over the server, the real Whisper base converted from
CTranslate2 (it decodes a window in tens of tokens, where random weights decode 224): the espeak-ng clips (one
window each) and a 40 s clip of two windows, with words, and two without, all at once over gRPC and HTTP, against
a reference model given whisper's own alignment heads for `base`, which the export must have carried over from
CTranslate2's config.json. Bad WORD_TIMESTAMPS inputs on the session's synthetic server.

The openai engine reuses each window's encoder output from the decoding step for the alignment, where
whisper.transcribe encodes the window again: words and segment texts are compared exactly, times to within
one DTW frame (0.02 s), word probabilities to 1e-3 (measured: times equal, probabilities within 4e-6).

The ctranslate2 engine (the same real base served as it is, float32) against faster-whisper's
`transcribe(word_timestamps=True, beam_size=1, temperature=0, condition_on_previous_text=False, vad_filter=False)`:
in process the very words and times, probabilities within 2e-6 (measured on all five clips); served, batched, with
the same bounds as above.
"""
from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from conftest import Server
from real_speech import TRUTH, language_of, load_clip

from export.whisper import synthetic_checkpoint
from trident import Client, InvalidInputError, cli
from trident import calls
from trident.results import Segment, Transcription
from trident_serving.asr import ASROptions, Scheduler, load_model
from trident_serving.audio import SAMPLE_RATE, decode_audio

pytestmark = pytest.mark.whisper
DATA = Path(__file__).resolve().parent / "data"
FRAME = 0.02 + 1e-6  # one DTW frame; the epsilon absorbs the rounding of times to 0.01 s
PROBABILITY = 1e-3
TIMEOUT = 600.0  # seconds per request: two shared CPU cores can be slow
SAMPLE_LEN = 16  # tokens per window in the engine test (a whisper decode option, given to both sides)


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


@contextlib.contextmanager
def one_torch_thread():
    """References on one thread: beside a server on two shared cores, two threads of OpenMP spin-waiting made
    them several times slower (greedy tokens do not depend on it; floats differ only by rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------- the engine alone (no server)

def test_engine_words_in_a_mixed_batch_equal_transcribe():
    """The Scheduler, in one batch, with and without words, on a 47 s audio and a 9 s one: each equals
    whisper.transcribe. Weights with a flattened token embedding (so timestamp tokens often win: windows split
    into segments, some end on a single timestamp) and 16 tokens per window keep it cheap and varied."""
    model = whisper.load_model(str(synthetic_checkpoint("tiny", seed=0)), device="cpu")
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(0.05)
    en, ko = (decode_audio((DATA / name).read_bytes()) for name in ("speech_en.wav", "speech_ko.ogg"))
    silence = lambda seconds: np.zeros(seconds * SAMPLE_RATE, np.float32)  # noqa: E731
    audio = {"long": np.concatenate([en, silence(20), ko, en]), "en": en}  # 47 s and 9 s
    asks = [("long", True), ("en", True), ("en", False)]  # without words, long audio is test_whisper.py's
    scheduler = Scheduler(model, max_windows=len(asks))
    with one_torch_thread():
        jobs = [scheduler.add(audio[name], ASROptions(temperatures=(0.0,), sample_len=SAMPLE_LEN, word_timestamps=words))
                for name, words in asks]
        while not scheduler.idle:
            scheduler.step()
        for (name, words), job in zip(asks, jobs):
            expected = whisper.transcribe(model, audio[name], word_timestamps=words, temperature=0.0, fp16=False,
                                          condition_on_previous_text=False, sample_len=SAMPLE_LEN, verbose=None)
            result = scheduler.result(job)
            assert job.error is None and result["text"] == expected["text"]
            assert [s["seek"] for s in result["segments"]] == [s["seek"] for s in expected["segments"]]
            if words:
                assert_same_words(transcription(result), expected)
                seeks = {s["seek"] for s in expected["segments"]}
                assert len(seeks) >= 3 and any(seek % 3000 for seek in seeks)  # windows moved by word ends
            else:
                assert all("words" not in s for s in result["segments"])
                assert [(s["start"], s["end"]) for s in result["segments"]] == \
                    [(s["start"], s["end"]) for s in expected["segments"]]


def transcription(result: dict) -> Transcription:
    """The engine's result as the client reads it."""
    return Transcription(result["text"], result["language"], [Segment.from_dict(s) for s in result["segments"]])


# ------------------------------------------------------------------------------------ synthetic tiny weights

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
def real(real_triton) -> Server:
    """The session's real-weights server (conftest.real_triton): the converted Whisper base on a CPU instance."""
    return real_triton


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
    # Every clip with words, and two without, at once over both protocols: they share the scheduler's steps.
    asks = [(name, True) for name in audio] + [(english[0], False), ("long", False)]
    clients = [Client(real.grpc_url, timeout=TIMEOUT), Client(f"http://{real.http_url}", timeout=TIMEOUT)]

    def ask(i: int) -> tuple:
        name, words = asks[i]
        request = calls.transcribe(audio[name], language=language[name], temperature=0.0, word_timestamps=words)
        return request, clients[i % 2].infer(request.model, request.inputs, request.outputs)

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, range(len(asks))))
    served = {}
    for (name, words), (request, output) in zip(asks, answers):
        with one_torch_thread():
            expected = reference(base, audio[name], language=language[name]) if words else \
                whisper.transcribe(base, audio[name], language=language[name], temperature=0.0,
                                   condition_on_previous_text=False, fp16=False, verbose=None)
        result = request.parse(output)
        if words:
            assert_same_words(result, expected)
            served[name] = result
        else:  # without the input the output is as before: no "words" key at all
            assert all("words" not in s for s in json.loads(output["SEGMENTS"].reshape(-1)[0]))
            assert result.text == expected["text"]
            assert [(s.start, s.end, s.text) for s in result.segments] == \
                [(s["start"], s["end"], s["text"]) for s in expected["segments"]]
    assert [w for s in served["long"].segments for w in s.words][-1].end > 30, "words in the second window"


# ------------------------------------------------------------------------ the ctranslate2 engine, real weights

def real_clips() -> dict[str, np.ndarray]:
    """The espeak-ng clips and a 40 s clip of three English ones 12 s apart (two windows)."""
    audio = {name: load_clip(name) for name in TRUTH}
    english = [name for name in TRUTH if TRUTH[name]["language"] == "en"]
    gap = np.zeros(12 * SAMPLE_RATE, np.float32)
    audio["long"] = np.concatenate([audio[english[0]], gap, audio[english[1]], gap, audio[english[2]]])
    return audio


@pytest.fixture(scope="module")
def faster_whisper_words() -> dict[str, dict]:
    """faster-whisper's word timestamps on the real clips (same model.bin, float32, greedy, no conditioning), in
    whisper.transcribe's shape."""
    from faster_whisper import WhisperModel

    from export.whisper import offline_base_dir

    model = WhisperModel(str(offline_base_dir()), device="cpu", compute_type="float32", cpu_threads=2)
    found = {}
    for name, audio in real_clips().items():
        segments, info = model.transcribe(audio, language=language_of(name) if name in TRUTH else None,
                                          beam_size=1, temperature=0.0, condition_on_previous_text=False,
                                          vad_filter=False, word_timestamps=True)
        segments = [{"text": s.text, "start": s.start, "end": s.end,
                     "words": [{"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                               for w in s.words]} for s in segments]
        found[name] = {"text": "".join(s["text"] for s in segments), "language": info.language,
                       "segments": segments}
    return found


def test_ctranslate2_engine_words_equal_faster_whisper(faster_whisper_words):
    """In process, each clip alone: the very words and times of faster-whisper (CTranslate2's
    align on the same encoder output, whisper's add_word_timestamps rules, as faster-whisper's own copy)."""
    from export.whisper import offline_base_dir
    from trident_serving.asr_ct2 import CTranslate2Whisper, scheduler_for

    scheduler = scheduler_for(CTranslate2Whisper(offline_base_dir(), compute_type="float32", replicas=1, threads=2))
    for name, audio in real_clips().items():
        job = scheduler.add(audio, ASROptions(language=language_of(name) if name in TRUTH else None,
                                              temperatures=(0.0,), word_timestamps=True))
        while not job.done:
            scheduler.step()
        result, expected = scheduler.result(job), faster_whisper_words[name]
        assert [[(w["word"], w["start"], w["end"]) for w in s["words"]] for s in result["segments"]] == \
            [[(w["word"], w["start"], w["end"]) for w in s["words"]] for s in expected["segments"]], name
        np.testing.assert_allclose([w["probability"] for s in result["segments"] for w in s["words"]],
                                   [w["probability"] for s in expected["segments"] for w in s["words"]],
                                   atol=1e-5, rtol=0)  # measured: within 2e-6 (float32 sums)


def test_ctranslate2_server_words_equal_faster_whisper(real_triton_ct2, faster_whisper_words):
    """Served by the ctranslate2 engine, every clip with words and one without, all at once over gRPC and HTTP
    (batched: times within a frame, see the module docstring), against faster-whisper."""
    audio = real_clips()
    one_window = next(name for name in TRUTH if TRUTH[name]["language"] == "en")  # the same text with or without
    asks = [(name, True) for name in audio] + [(one_window, False)]
    clients = [Client(real_triton_ct2.grpc_url, timeout=TIMEOUT), Client(f"http://{real_triton_ct2.http_url}",
                                                                         timeout=TIMEOUT)]

    def ask(i: int) -> Transcription:
        name, words = asks[i]
        return clients[i % 2].transcribe(audio[name], language=language_of(name) if name in TRUTH else None,
                                         temperature=0.0, word_timestamps=words)

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, range(len(asks))))
    for (name, words), result in zip(asks, answers):
        if words:
            assert_same_words(result, faster_whisper_words[name])
        else:
            assert all(not s.words for s in result.segments)
            assert result.text == faster_whisper_words[name]["text"]
    assert [w for s in answers[list(audio).index("long")].segments for w in s.words][-1].end > 30


def test_official_export_carries_whisper_alignment_heads(tmp_path, monkeypatch):
    """`--weights official` stores whisper's alignment heads of that size in the checkpoint, and the served
    model sets them. The download is the one part replaced (no network here): by a checkpoint of tiny's shape."""
    from export import whisper as export_whisper

    downloaded = tmp_path / "whisper-tiny.pt"
    downloaded.write_bytes(export_whisper.synthetic_checkpoint("tiny", 0).read_bytes())
    monkeypatch.setattr(export_whisper, "fetch", lambda url, filename, sha256: downloaded)
    model = load_model(str(export_whisper.official_checkpoint("tiny")))
    official = whisper.load_model(str(downloaded), device="cpu")
    assert not model.alignment_heads.to_dense().equal(official.alignment_heads.to_dense())  # not the default
    official.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny"])  # what whisper.load_model("tiny") sets
    assert model.alignment_heads.to_dense().equal(official.alignment_heads.to_dense())


def test_cli_prints_words(real, capsys):
    path = DATA / "real_en_carter.flac"
    assert cli.main(["--url", real.grpc_url, "--timeout", str(TIMEOUT), "transcribe", "--words", "--json",
                     "--temperature", "0", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    words = [w for s in printed["result"]["segments"] for w in s["words"]]
    assert [w["word"].strip() for w in words][:3] == ["Dr.", "Emily", "Carter"]
    assert all(set(w) == {"word", "start", "end", "probability"} and w["start"] <= w["end"] for w in words)
    assert cli.main(["--url", real.grpc_url, "--timeout", str(TIMEOUT), "transcribe", "--words",
                     "--temperature", "0", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(words) and lines[1].split()[-1] == "Dr."
    assert cli.main(["--url", real.grpc_url, "--timeout", str(TIMEOUT), "transcribe", "--json",
                     "--temperature", "0", str(path)]) == 0
    assert all(not s["words"] for s in json.loads(capsys.readouterr().out)["result"]["segments"])
