"""Whisper without Triton: audio decoding, bad input, and the batched engine against whisper.transcribe.

The engine runs on the tiny architecture with seeded random weights (`python -m export whisper --size tiny
--weights synthetic`): its text is garbage, but whisper.transcribe turns the same weights and audio into the
same garbage, which is what is compared. Windows are capped at SAMPLE_LEN tokens (a whisper decode option,
given to both sides) to keep the CPU runtime low; the window, seek and fallback logic does not depend on it.
"""
from __future__ import annotations

import io
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from whisper.decoding import DecodingOptions, GreedyDecoder

from export.whisper import synthetic_checkpoint
from trident_serving.asr import ASROptions, RowwiseDecodingTask, Scheduler, transcribe_many
from trident_serving.audio import SAMPLE_RATE, check_pcm, decode_audio
from trident_serving.errors import InvalidInput

pytestmark = pytest.mark.whisper
DATA = Path(__file__).parent / "data"
LANGUAGES = ("en", "ko")
LOSSY = ("mp3", "ogg", "m4a")
SAMPLE_LEN = 16
# Numeric fields computed by different kernels in a batch than alone: equal up to float rounding.
FLOAT_FIELDS = ("avg_logprob", "no_speech_prob", "compression_ratio")


def speech(language: str, ext: str = "wav") -> np.ndarray:
    return decode_audio((DATA / f"speech_{language}.{ext}").read_bytes())


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


@pytest.fixture(scope="module")
def model():
    return whisper.load_model(str(synthetic_checkpoint("tiny", seed=0)), device="cpu")


@pytest.fixture(scope="module")
def flat_model():
    """The same weights with a 20x smaller token embedding: flatter logits, in which timestamp tokens often win,
    so a window splits into several segments and the next one starts at its last timestamp."""
    model = whisper.load_model(str(synthetic_checkpoint("tiny", seed=0)), device="cpu")
    with torch.no_grad():
        model.decoder.token_embedding.weight.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def clips():
    """Short and long clips: one window, and four windows mixing speech, silence and both languages."""
    en, ko = speech("en"), speech("ko", "ogg")
    long = np.concatenate([en, silence(20), ko, en, silence(25), ko, silence(10)])
    noise = 0.1 * np.random.default_rng(0).standard_normal(3 * SAMPLE_RATE).astype(np.float32)
    return {"en": en, "ko": ko, "long": long, "noise": noise}


@pytest.fixture(scope="module")
def greedy(model, clips):
    """whisper.transcribe at T=0 (deterministic) of every clip."""
    return {name: reference(model, audio, temperature=0.0) for name, audio in clips.items()}


def reference(model, audio: np.ndarray, **options) -> dict:
    """whisper.transcribe as the engine claims to reproduce it, with the RNG seeded for T > 0 windows."""
    torch.manual_seed(0)
    return whisper.transcribe(model, audio, condition_on_previous_text=False, fp16=False,
                              sample_len=SAMPLE_LEN, **options)


def assert_same(result: dict, expected: dict, where: str = "") -> None:
    """Text, language and segments equal; the float fields only up to rounding."""
    assert result["text"] == expected["text"], where
    assert result["language"] == expected["language"], where
    assert len(result["segments"]) == len(expected["segments"]), where
    for got, want in zip(result["segments"], expected["segments"]):
        want = {k: v for k, v in want.items() if k != "words"}  # transcribe adds "words": [] to blanked ones
        assert set(got) == set(want)
        for key in want:
            if key in FLOAT_FIELDS:
                assert got[key] == pytest.approx(want[key], abs=1e-5), f"{where} segment {want['id']} {key}"
            else:
                assert got[key] == want[key], f"{where} segment {want['id']} {key}"


# ---------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("language", LANGUAGES)
def test_formats_decode_to_the_same_speech(language):
    wav = speech(language)
    assert wav.dtype == np.float32 and wav.ndim == 1 and 6 < wav.size / SAMPLE_RATE < 8
    np.testing.assert_array_equal(speech(language, "flac"), wav)  # lossless
    other = speech("ko" if language == "en" else "en")
    for ext in LOSSY:  # 44.1/48 kHz stereo: resampled and downmixed
        audio = speech(language, ext)
        assert abs(audio.size - wav.size) < 0.05 * SAMPLE_RATE, ext
        n = min(audio.size, wav.size, other.size)
        assert np.corrcoef(audio[:n], wav[:n])[0, 1] > 0.8, ext
        assert abs(np.corrcoef(audio[:n], other[:n])[0, 1]) < 0.3, ext  # the check can fail


@pytest.mark.parametrize("ext", ("wav", "flac", *LOSSY))
def test_matches_whisper_load_audio(ext):
    """whisper.load_audio runs the ffmpeg program (Debian's ffmpeg: `make system-deps`); never skipped."""
    assert shutil.which("ffmpeg"), "the ffmpeg program is missing: run `make system-deps`"
    for language in LANGUAGES:
        path = DATA / f"speech_{language}.{ext}"
        expected, audio = whisper.load_audio(str(path)), decode_audio(path.read_bytes())
        assert audio.shape == expected.shape
        # Same libraries, so the same samples, except that libswresample before FFmpeg 7 resamples 16-bit
        # sources in 16-bit (Debian 12's ffmpeg 5.1: up to 3 LSB apart); float sources (MP3, Opus, AAC) agree.
        assert np.abs(audio - expected).max() <= 3 / 32768, path.name


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


def test_other_rates_and_lengths():
    tone = (8000 * np.sin(np.arange(8000) * 0.05)).astype(np.int16)  # 1 s at 8 kHz
    audio = decode_audio(wav_bytes(tone, rate=8000))
    assert audio.size == SAMPLE_RATE and 0.2 < np.abs(audio).max() < 0.25
    assert decode_audio(wav_bytes(tone[:1])).size == 1


@pytest.mark.parametrize("ext", ["mp3", "flac"])
def test_truncated_files_are_refused(ext):
    """The ffmpeg CLI would decode the first half; a file whose header states its length is refused instead."""
    data = (DATA / f"speech_en.{ext}").read_bytes()
    with pytest.raises(InvalidInput, match="AUDIO is truncated or corrupt: its header says 6.47 s"):
        decode_audio(data[: len(data) // 2])


NOT_AUDIO = r": it is not a WAV, FLAC, MP3, OGG/Opus or M4A/AAC file, or its header is damaged"


@pytest.mark.parametrize("data, message", [
    (b"", "AUDIO is empty"),
    (bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffdb004300") + bytes(200),  # a JPEG head
     rf"AUDIO could not be decoded as audio \(225 bytes starting b'\\xff\\xd8\\xff\\xe0.*{NOT_AUDIO}"),
    (b"not audio at all " * 10, rf"AUDIO could not be decoded as audio \(170 bytes starting b'not audi'\){NOT_AUDIO}"),
    ((DATA / "speech_en.wav").read_bytes()[:40],  # header cut short
     rf"AUDIO could not be decoded as audio \(40 bytes starting b'RIFF.*{NOT_AUDIO}"),
    (wav_bytes(np.zeros(0)), "AUDIO decoded to no audio samples: it is empty, truncated or corrupt"),
])
def test_bad_audio(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_audio(data)


def test_audio_length_cap():
    with pytest.raises(InvalidInput, match="longer than the limit"):
        decode_audio((DATA / "speech_en.wav").read_bytes(), max_seconds=1)
    with pytest.raises(InvalidInput, match="above the limit"):
        check_pcm(np.zeros(2 * SAMPLE_RATE, np.float32), max_seconds=1)


@pytest.mark.parametrize("pcm, message", [
    (np.zeros(0, np.float32), "PCM is empty"),
    (np.zeros((2, 100), np.float32), "1-D"),
    (np.array([0.0, np.nan], np.float32), "NaN"),
    (np.array([0.0, np.inf], np.float32), "NaN or infinite"),
    (np.zeros(10, np.int16), "floats"),
])
def test_bad_pcm(pcm, message):
    with pytest.raises(InvalidInput, match=message):
        check_pcm(pcm)


def test_pcm_passes_through():
    pcm = np.linspace(-1, 1, 100, dtype=np.float64)
    out = check_pcm(pcm)
    assert out.dtype == np.float32 and out.flags.c_contiguous and np.allclose(out, pcm)


# --------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("clip, temperatures", [("en", (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)), ("long", (0.0, 1.0))])
def test_one_audio_equals_transcribe(model, clips, clip, temperatures):
    """Alone, the engine makes the same RNG draws as transcribe, so even the T > 0 windows match.

    Every window of these weights is too repetitive, so each one goes through all the temperatures (the
    long clip tries two only to save time; the first clip runs whisper's defaults).
    """
    expected = reference(model, clips[clip], temperature=temperatures)
    assert expected["text"].strip() and {s["temperature"] for s in expected["segments"]} == {temperatures[-1]}
    torch.manual_seed(0)
    result = transcribe_many(model, [clips[clip]], ASROptions(temperatures=temperatures, sample_len=SAMPLE_LEN))
    assert_same(result[0], expected, clip)


def test_batch_equals_each_alone(model, clips, greedy):
    """At T=0 decoding is deterministic: in a mixed batch each item gets what transcribe gives it alone."""
    names = ["en", "long", "ko", "noise"]
    batch = transcribe_many(model, [clips[n] for n in names], ASROptions(temperatures=(0.0,), sample_len=SAMPLE_LEN))
    for name, result in zip(names, batch):
        assert greedy[name]["text"].strip()
        assert_same(result, greedy[name], name)
    assert len({s["seek"] for s in batch[1]["segments"]}) == 3  # the long clip spans three windows


def test_timestamp_segments_and_seeks(flat_model, clips):
    """Segments cut at timestamp pairs and seeks to the last timestamp, batched, equal transcribe's."""
    names = ["long", "en"]
    options = ASROptions(temperatures=(0.0,), sample_len=SAMPLE_LEN)
    batch = transcribe_many(flat_model, [clips[n] for n in names], options)
    for name, result in zip(names, batch):
        assert_same(result, reference(flat_model, clips[name], temperature=0.0), name)
    seeks = {s["seek"] for s in batch[0]["segments"]}
    assert len(batch[0]["segments"]) > len(seeks) > 1 and any(seek % 3000 for seek in seeks)


def test_fallback_windows_equal_references(model, clips, greedy):
    """Only the windows that fail whisper's checks are decoded again, in a batch as in transcribe.

    The log-probability threshold is the median of the windows' T=0 scores, so some windows fall back and
    some do not. Re-decoded windows sample at random and cannot be compared token for token; which windows
    fell back (temperature > 0) and everything decoded at T=0 can.
    """
    names = ["long", "en", "ko"]
    threshold = float(np.median([s["avg_logprob"] for n in names for s in greedy[n]["segments"]]))
    temperatures = (0.0, 1.0)
    thresholds = dict(compression_ratio_threshold=None, logprob_threshold=threshold, no_speech_threshold=None)
    batch = transcribe_many(model, [clips[n] for n in names],
                            ASROptions(temperatures=temperatures, sample_len=SAMPLE_LEN, **thresholds))
    fell_back = []
    for name, result in zip(names, batch):
        expected = reference(model, clips[name], temperature=temperatures, **thresholds)
        windows = [(s["seek"], s["temperature"] > 0) for s in result["segments"]]
        assert windows == [(s["seek"], s["temperature"] > 0) for s in expected["segments"]], name
        for got, want in zip(result["segments"], expected["segments"]):
            if want["temperature"] == 0:
                assert (got["text"], got["start"], got["end"]) == (want["text"], want["start"], want["end"])
        fell_back += [flag for _, flag in windows]
    assert any(fell_back) and not all(fell_back)


@torch.no_grad()
def test_batch_rounding_is_far_below_decision_margins(model, clips):
    """Bound the near-ties: batch-vs-alone logit differences against the greedy choices' margins.

    A batch runs other matrix kernels than a single row, so logits differ in the last bits; a greedy token can
    only flip where its lead over the runner-up (after whisper's logit filters) is that small. Prints both.
    """
    names = ["en", "long", "ko", "noise"]
    mels = torch.stack([whisper.pad_or_trim(whisper.log_mel_spectrogram(clips[n]), 3000) for n in names])
    options = DecodingOptions(language="en", fp16=False, sample_len=SAMPLE_LEN)

    def greedy_logits(features: torch.Tensor) -> torch.Tensor:
        """Filtered logits of every row at every greedy step (steps, rows, vocabulary)."""
        steps = []

        class Recorder(GreedyDecoder):
            def update(self, tokens, logits, sum_logprobs):
                steps.append(logits.clone())
                return super().update(tokens, logits, sum_logprobs)

        task = RowwiseDecodingTask(model, options, [("en", "transcribe")] * len(features))
        task.decoder = Recorder(0.0, task.tokenizer.eot)
        task.run(features)
        return torch.stack(steps)

    together = greedy_logits(model.encoder(mels))
    noise, margin = 0.0, float("inf")
    for row in range(len(names)):
        alone = greedy_logits(model.encoder(mels[row : row + 1]))[:, 0]
        batched = together[: len(alone), row]  # the batch goes on while other rows are unfinished
        allowed = torch.isfinite(alone)
        noise = max(noise, float((batched - alone)[allowed].abs().max()))
        top2 = alone.topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    print(f"\nlargest batch-vs-alone logit difference {noise:.2e}, smallest greedy margin {margin:.2e}")
    assert noise < 1e-3 and margin > 100 * noise


def test_short_request_does_not_wait_for_long_one(model, clips, greedy):
    scheduler = Scheduler(model, max_windows=4)
    options = ASROptions(temperatures=(0.0,), sample_len=SAMPLE_LEN)
    long = scheduler.add(clips["long"], options)
    assert scheduler.step() == [] and long.seek == 3000
    short = scheduler.add(clips["en"], options)  # joins at a window boundary
    assert scheduler.step() == [short] and not long.done
    while not long.done:
        finished = scheduler.step()
    assert finished == [long] and scheduler.idle
    for job, name in ((short, "en"), (long, "long")):
        assert_same(scheduler.result(job), greedy[name], name)


def test_audio_without_content_frames(model):
    """Under one mel frame: no window to decode, but the language is still detected, like transcribe."""
    audio = silence(0.005)
    expected = reference(model, audio)
    assert expected["text"] == "" and expected["segments"] == []
    assert_same(transcribe_many(model, [audio], ASROptions(sample_len=SAMPLE_LEN))[0], expected)


def test_language_and_task_checked(model, clips):
    scheduler = Scheduler(model)
    with pytest.raises(InvalidInput, match="'xx'"):
        scheduler.add(clips["en"], ASROptions(language="xx"))
    with pytest.raises(InvalidInput, match="'summarize'"):
        scheduler.add(clips["en"], ASROptions(task="summarize"))
    for temperatures in ((), (-0.5,), (0.0, float("nan")), (3.0,), (0.1,) * 11):
        with pytest.raises(InvalidInput, match=r"TEMPERATURE must hold 1 to 10 values in \[0, 2\] tried in turn"):
            scheduler.add(clips["en"], ASROptions(temperatures=temperatures))
    assert scheduler.add(clips["en"], ASROptions(language="Korean")).language == "ko"
    assert scheduler.idle is False


def test_given_language_and_task_per_row(model, clips):
    """Rows with different languages and tasks share one decoder batch and match transcribe alone."""
    items = [("en", "transcribe"), ("ko", "translate"), ("de", "transcribe")]
    scheduler = Scheduler(model)
    jobs = [scheduler.add(clips["noise"], ASROptions(language=lang, task=task, temperatures=(0.0,),
                                                   sample_len=SAMPLE_LEN)) for lang, task in items]
    while not scheduler.idle:
        scheduler.step()
    texts = set()
    for job, (language, task) in zip(jobs, items):
        expected = reference(model, clips["noise"], temperature=0.0, language=language, task=task)
        assert_same(scheduler.result(job), expected, language)
        texts.add(expected["text"])
    assert len(texts) > 1  # the prompt tokens matter, so a mix-up would show
