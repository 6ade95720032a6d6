"""Hostile and unusual input: decompression bombs, formats nobody documented, playlists that name server files,
valid files that used to be refused (motion photos, EXIF rotation, upper-case options), and a short fuzz run.

Orientation, per model (README "Input limits and unusual files"): `detect` decodes like `cv2.imread`, which
applies a JPEG's EXIF orientation; so does ultralytics (its `imread` is cv2.imdecode), so parity holds for
rotated photos. `easyocr` applies it to both images it reads (colour for CRAFT, grey for the recogniser).
EasyOCR's own readtext(path) does not agree with itself there: its colour image comes from scikit-image,
which ignores EXIF, and its grey one from cv2.imread, which applies it; the server equals readtext's pipeline
on the upright image instead (tested with a grayscale JPEG, whose two images are the same pixels).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from trident import InvalidInputError
from trident_serving import audio, images
from trident_serving.errors import InvalidInput

DATA = Path(__file__).resolve().parent / "data"
ROOT = DATA.parent.parent


def bus() -> bytes:
    from ultralytics.utils import ASSETS

    return (ASSETS / "bus.jpg").read_bytes()


def exif_jpeg(image: np.ndarray, orientation: int) -> bytes:
    """`image` (BGR or grey) as a JPEG carrying an EXIF orientation tag."""
    pil = Image.fromarray(image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def motion_photo(jpeg: bytes) -> bytes:
    """A phone's "motion photo": the still JPEG, then an MP4 appended after its end marker."""
    return jpeg + b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + np.random.default_rng(0).bytes(3_000_000)


# -- images: formats, bombs, limits -------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".tiff", ".ppm", ".pfm", ".ras", ".hdr", ".jp2"])
def test_undocumented_image_formats_are_refused(ext):
    """OpenCV decodes these too (and allocates their canvas first); only JPEG/PNG/BMP/WebP are served."""
    image = np.full((48, 64, 3), 120, np.uint8)
    ok, data = cv2.imencode(ext, image.astype(np.float32) if ext == ".pfm" else image)
    assert ok
    with pytest.raises(InvalidInput, match="not a JPEG, PNG, BMP or WebP file"):
        images.decode_image(data.tobytes())


def radiance_hdr(width: int, height: int) -> bytes:
    """A valid run-length-encoded Radiance HDR image (a format OpenCV decodes into a float32 canvas)."""
    runs = bytearray()
    for _ in range(4):  # R, G, B, E planes of one scanline, in runs of at most 127
        left = width
        while left:
            count = min(127, left)
            runs += bytes([128 + count, 128])
            left -= count
    line = bytes([2, 2, width >> 8, width & 0xFF]) + bytes(runs)
    return f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode() + line * height


def test_bomb_is_refused_before_any_decoder_allocates(tmp_path):
    """A 6 MB HDR file that OpenCV would decode into a 10001x10000 float canvas (1.2 GB): refused without
    allocating, which a fresh process's peak memory shows."""
    path = tmp_path / "bomb.hdr"
    path.write_bytes(radiance_hdr(10001, 10000))
    script = ("import resource, sys\nfrom trident_serving.images import decode_image\n"
              "from trident_serving.errors import InvalidInput\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    decode_image(open(sys.argv[1], 'rb').read())\n    print('decoded')\n"
              "except InvalidInput as exc:\n    print(exc)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(2 ** 30)})  # OpenCV's default
    message, grown_mb = done.stdout.strip().splitlines()
    assert "not a JPEG, PNG, BMP or WebP file" in message
    assert int(grown_mb) < 100, f"peak memory grew by {grown_mb} MB while refusing a bomb"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WebP-VP8X", "WebP-VP8L"])
def test_declared_size_above_the_limit(fmt):
    """Every accepted format's header is read for the size: a file declaring 10001x10000 is refused."""
    small = np.zeros((8, 8, 3), np.uint8)
    if fmt == "PNG":
        data = bytearray(cv2.imencode(".png", small)[1].tobytes())
        data[16:24] = struct_pack(">II", 10001, 10000)
    elif fmt == "JPEG":
        data = bytearray(cv2.imencode(".jpg", small)[1].tobytes())
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct_pack(">HH", 10000, 10001)
    elif fmt == "BMP":
        data = bytearray(cv2.imencode(".bmp", small)[1].tobytes())
        data[18:26] = struct_pack("<ii", 10001, -10000)  # top-down rows
    elif fmt == "WebP-VP8L":
        data = bytearray(cv2.imencode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes())
        data[21:25] = struct_pack("<I", (10001 - 1) | (10000 - 1) << 14 | (data[24] >> 5) << 29)
    else:
        out = io.BytesIO()
        Image.new("RGBA", (8, 8)).save(out, "WEBP", exif=b"Exif\x00\x00")  # extended format: VP8X chunk
        data = bytearray(out.getvalue())
        assert data[12:16] == b"VP8X"
        data[24:30] = (10001 - 1).to_bytes(3, "little") + (10000 - 1).to_bytes(3, "little")
    with pytest.raises(InvalidInput, match=f"10001x10000 pixels, above the limit of {images.MAX_PIXELS:,}"):
        images.decode_image(bytes(data))
    assert images.read_header(bytes(data)) == images.Header(fmt.split("-")[0], 10001, 10000)


def struct_pack(fmt: str, *values: int) -> bytes:
    import struct

    return struct.pack(fmt, *values)


def test_header_sizes_match_the_decoder():
    """read_header's size is the decoded size for every kind of file accepted (EXIF rotation aside)."""
    base = cv2.resize(cv2.imdecode(np.frombuffer(bus(), np.uint8), cv2.IMREAD_COLOR), (203, 147))
    files = [bus(), *(p.read_bytes() for p in sorted(DATA.glob("ocr_*")) if p.suffix in (".png", ".jpg"))]
    files += [cv2.imencode(ext, base, params)[1].tobytes() for ext, params in [
        (".png", []), (".bmp", []), (".webp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])]]
    for mode, fmt in [("L", "PNG"), ("P", "BMP"), ("1", "BMP"), ("RGBA", "WEBP"), ("L", "JPEG"), ("P", "PNG")]:
        out = io.BytesIO()
        Image.fromarray(base).convert(mode).save(out, fmt)
        files.append(out.getvalue())
    for data in files:
        header = images.read_header(data)
        assert images.decode_image(data).shape[:2] == (header.height, header.width)


def test_opencv_pixel_limit_is_set_before_cv2_loads():
    """OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when it loads: importing trident_serving.images first sets it,
    and the launcher sets it for the stubs (which may import cv2 before us)."""
    from trident_serving import server

    assert server.server_env()["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(images.MAX_PIXELS)
    script = ("import numpy as np, sys\nimport trident_serving.images\nimport cv2\n"
              "data = np.frombuffer(open(sys.argv[1], 'rb').read(), np.uint8)\n"
              "try:\n    print(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).shape)\n"
              "except cv2.error as exc:\n    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(exc) else exc)\n")
    png = cv2.imencode(".png", np.zeros((10001, 10000), np.uint8))[1].tobytes()
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trident-limit-{os.getpid()}.png"
        path.write_bytes(png)
        try:
            done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                  timeout=120, env=env)
        finally:
            path.unlink()
    assert done.stdout.strip() == "refused", done.stdout + done.stderr


def test_extreme_aspect_ratio_is_refused():
    """A 100000x1 image has fewer pixels than a photo, but EasyOCR's resize turns it into zero rows."""
    thin = cv2.imencode(".png", np.zeros((2, 1999, 3), np.uint8))[1].tobytes()
    assert images.decode_image(thin).shape == (2, 1999, 3)
    with pytest.raises(InvalidInput, match="more than 1000 times the other"):
        images.decode_image(cv2.imencode(".png", np.zeros((1, 100000), np.uint8))[1].tobytes())


# -- images: valid files that used to be refused ------------------------------------------------------------------

def test_jpeg_with_data_after_its_end_marker():
    """A motion photo decodes as its still image; a JPEG cut anywhere before its end marker is still refused."""
    still = bus()
    np.testing.assert_array_equal(images.decode_image(motion_photo(still)), images.decode_image(still))
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    assert images.decode_image(png + b"trailing bytes" * 100).shape == (8, 8, 3)
    for data in (still, exif_jpeg(cv2.imdecode(np.frombuffer(still, np.uint8), 1), 6),
                 cv2.imencode(".jpg", np.zeros((64, 64, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()):
        for cut in range(0, len(data) - 1, max(1, len(data) // 300)):
            with pytest.raises(InvalidInput):
                images.decode_image(data[:cut])


def test_easyocr_reference_reads_exif_rotated_files_inconsistently(tmp_path):
    """The fact the server's documented choice rests on: readtext(path) takes its colour image from
    scikit-image (EXIF ignored) and its grey image from cv2.imread (EXIF applied)."""
    from easyocr.utils import reformat_input

    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_jpeg(np.zeros((60, 100, 3), np.uint8), 6))
    colour, grey = reformat_input(str(path))
    assert colour.shape[:2] == (60, 100) and grey.shape == (100, 60)
    assert images.decode_image(path.read_bytes()).shape[:2] == (100, 60)  # the server: upright, like cv2.imread


# -- audio ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("playlist", [b"ffconcat version 1.0\nfile tests/data/speech_en.wav\n",
                                      b"#EXTM3U\n#EXTINF:6.0,\ntests/data/speech_en.wav\n#EXT-X-ENDLIST\n"])
def test_playlists_naming_server_files_are_refused(playlist, monkeypatch):
    """FFmpeg's concat demuxer would open (and whisper transcribe) a file of the server's own disk."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(InvalidInput, match="not a WAV, FLAC, MP3, OGG/Opus or M4A/AAC file"):
        audio.decode_audio(playlist)


def encode_audio(container: str, codec: str, seconds: float, rate: int = 16000, **options: str) -> bytes:
    """A tone of `seconds` encoded by PyAV."""
    out = io.BytesIO()
    with av.open(out, "w", format=container, options=options) as file:
        stream = file.add_stream(codec, rate=rate)
        stream.layout = "mono"
        samples = (np.sin(np.arange(int(rate * seconds)) * 0.05) * 8000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono",
                                      rate=rate)
        for converted in resampler.resample(frame):
            file.mux(stream.encode(converted))
        file.mux(stream.encode(None))
    return out.getvalue()


def test_declared_duration_above_the_limit_is_refused_before_decoding():
    flac = bytearray(encode_audio("flac", "flac", 2.0))
    # STREAMINFO's 36-bit total-samples field (bytes 22-25 hold its low 32 bits) set to 3 hours at 16 kHz
    flac[22:26] = (3 * 3600 * 16000).to_bytes(4, "big")
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match="header says it lasts 10800 s, longer than the limit of 7200 s"):
        audio.decode_audio(bytes(flac))
    with pytest.raises(InvalidInput, match="header says it lasts 6 s, longer than the limit of 5 s"):
        audio.decode_audio((DATA / "speech_en.flac").read_bytes(), max_seconds=5)
    assert time.perf_counter() - started < 5


def test_mp3_length_is_trusted_only_when_stated():
    """An MP3 states its length in a Xing/Info frame; without one FFmpeg estimates it from the bit rate."""
    for options, stated in (({}, True), ({"write_xing": "0"}, False)):
        data = encode_audio("mp3", "libmp3lame", 3.0, **options)
        with av.open(io.BytesIO(data)) as container:
            assert (audio.declared_seconds(container, data) is not None) == stated
        assert abs(audio.decode_audio(data).size / 16000 - 3.0) < 0.1


def test_english_names_and_upper_case_languages_on_an_english_only_model():
    """whisper.transcribe takes "English" or "EN" for an English-only model (and ignores the language)."""
    from whisper.model import ModelDimensions, Whisper

    from trident_serving.asr import ASROptions, Scheduler

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=1, n_audio_layer=1,
                           n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=1, n_text_layer=1)
    scheduler = Scheduler(Whisper(dims))
    assert not scheduler.model.is_multilingual
    for language in ("en", "EN", "English", "english", None):
        assert scheduler.check(ASROptions(language=language)) == "en"
    with pytest.raises(InvalidInput, match="English-only"):
        scheduler.check(ASROptions(language="Korean"))


# -- over the real server ------------------------------------------------------------------------------------------

@pytest.mark.yolo
def test_detect_motion_photo_and_exif_rotation(triton, tmp_path):
    """Both served, equal to ultralytics' predict on the same file (it applies EXIF orientation as we do)."""
    from test_detect import CONF, assert_same_detections
    from ultralytics import YOLO

    weights = json.loads((triton.repository / "export.json").read_text())["yolov8"]["weights"]
    reference = YOLO(weights, task="detect")
    client = triton.client("grpc")
    upright = cv2.imdecode(np.frombuffer(bus(), np.uint8), cv2.IMREAD_COLOR)
    for name, data in (("motion.jpg", motion_photo(bus())), ("rotated.jpg", exif_jpeg(np.rot90(upright), 6))):
        path = tmp_path / name
        path.write_bytes(data)
        served = client.detect(path, conf=CONF)
        expected = reference.predict(str(path), conf=CONF, verbose=False)[0]
        assert expected.orig_shape == upright.shape[:2] and len(served) >= 24
        assert_same_detections(served, expected)
        assert (served.boxes[:, 2] <= upright.shape[1] + 0.5).all()
        assert (served.boxes[:, 3] <= upright.shape[0] + 0.5).all()


@pytest.mark.easyocr
def test_easyocr_exif_rotation_equals_readtext_on_the_upright_image(triton, tmp_path):
    from test_easyocr import assert_same_lines

    from trident_serving.ocr import load_reader

    reader = load_reader(triton.repository / "easyocr" / "1" / "weights", "cpu")
    grey = cv2.imread(str(DATA / "ocr_en_sign.jpg"), cv2.IMREAD_GRAYSCALE)
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(exif_jpeg(np.ascontiguousarray(np.rot90(grey)), 6))  # upright once EXIF is applied
    upright = tmp_path / "upright.png"
    upright.write_bytes(cv2.imencode(".png", cv2.imread(str(rotated), cv2.IMREAD_GRAYSCALE))[1].tobytes())
    expected = reader.readtext(str(upright))
    assert len(expected) >= 1
    assert_same_lines(triton.client("grpc").read_text(rotated), expected)


@pytest.mark.easyocr
def test_easyocr_extreme_aspect_ratio_is_a_clear_error(triton):
    with pytest.raises(InvalidInputError, match="more than 1000 times"):
        triton.client("grpc").read_text(cv2.imencode(".png", np.zeros((1, 100000), np.uint8))[1].tobytes())
    assert triton.is_ready()


@pytest.mark.whisper
def test_whisper_options_in_other_cases(triton):
    """A language code or name and the task in any case get whisper.transcribe's result for the canonical options
    (greedy, on the checkpoint the server loaded), and the task is not ignored: translating differs."""
    import whisper
    from test_whisper import assert_same, reference

    model = whisper.load_model(json.loads((triton.repository / "export.json").read_text())["whisper"]["weights"],
                               device="cpu")
    data = (DATA / "speech_ko.wav").read_bytes()
    expected = {task: reference(model, audio.decode_audio(data), language="ko", task=task)
                for task in ("transcribe", "translate")}
    assert expected["transcribe"]["text"] != expected["translate"]["text"], "the task must change this transcript"
    client = triton.client("grpc")
    variants = (("KO", "TRANSCRIBE"), ("Korean", "Transcribe"), ("ko", "Translate"), ("KOREAN", "TRANSLATE"))
    for language, task in variants:
        served = client.transcribe(data, language=language, task=task, temperature=[0.0])
        assert served.language == "ko", (language, task)
        assert_same(served, expected[task.lower()])


@pytest.mark.whisper
def test_whisper_refuses_playlists(triton):
    with pytest.raises(InvalidInputError, match="not a WAV, FLAC, MP3"):
        triton.client("grpc").transcribe(b"ffconcat version 1.0\nfile tests/data/speech_en.wav\n")


# A fuzzed header may state up to whisper's default limit of 2 h of audio, which a slow CPU does not transcribe
# within the fuzz's 300 s client timeout: the short run below caps it for the test server.
CAPPED_AUDIO_SECONDS = 60


@pytest.fixture(scope="module")
def capped_whisper(triton):
    """The session server's `whisper` loaded with max_audio_seconds=60 (Triton's load with a config override),
    while this module needs it; its exported parameters are loaded back afterwards (a plain load would keep the
    override: the files did not change). Both loads skip the warm-up: it only spares the first request some
    latency, which no later test measures. Nothing to do when whisper is not under test."""
    import tritonclient.http as httpclient
    from conftest import selected_models

    if "whisper" not in selected_models():
        yield
        return
    exported = httpclient.InferenceServerClient(triton.http_url).get_model_config("whisper")
    assert exported["parameters"]["max_audio_seconds"] == {"string_value": "7200"}, exported["parameters"]
    restored = {key: value for key, value in exported.items() if key != "model_warmup"}
    capped = {**restored, "parameters": {**exported["parameters"],
                                         "max_audio_seconds": {"string_value": str(CAPPED_AUDIO_SECONDS)}}}

    def load(config: dict) -> dict:
        """The config served after loading `config`, warm-up aside."""
        served = triton.load_config("whisper", config)
        return {key: value for key, value in served.items() if key != "model_warmup"}

    assert load(capped) == capped
    try:
        yield
    finally:
        assert load(restored) == restored


@pytest.mark.whisper
def test_whisper_refuses_audio_longer_than_its_configured_limit(triton, capped_whisper):
    """max_audio_seconds (config parameter): a stated length above it is refused before decoding, PCM by size."""
    client = triton.client("grpc")
    flac = bytearray(encode_audio("flac", "flac", 2.0))
    flac[22:26] = ((CAPPED_AUDIO_SECONDS + 1) * 16000).to_bytes(4, "big")  # STREAMINFO's total samples: 61 s
    with pytest.raises(InvalidInputError, match="AUDIO's header says it lasts 61 s, longer than the limit of 60 s"):
        client.transcribe(bytes(flac))
    with pytest.raises(InvalidInputError, match="PCM is 61 s long, above the limit of 60 s"):
        client.transcribe(np.zeros((CAPPED_AUDIO_SECONDS + 1) * 16000, np.float32))
    assert triton.is_ready()


def test_fuzz_short_run(triton, capped_whisper):
    """`make fuzz` in small: mutated inputs to every served model; clear errors or results, no crash."""
    from conftest import selected_models
    from perf import fuzz

    served = {"yolo": ("detect", "yolov8"), "whisper": ("whisper",), "easyocr": ("easyocr",)}
    models = tuple(m for name in selected_models() for m in served[name])
    options = fuzz.FuzzOptions(url=triton.grpc_url, http_url=triton.http_url, n=8 * len(models), seed=1,
                               models=models, server_pid=int(triton.options.pid_file.read_text()))
    outcomes, problems = fuzz.run(options, progress=False)
    result = fuzz.summary(outcomes, problems)
    assert result["ok"], json.dumps(result, indent=1)  # whole: pytest would cut a dict short
    assert result["totals"].get("clear error", 0) >= len(outcomes) // 3  # most mutations are caught...
    assert result["totals"].get("result", 0) >= 1  # ...and some still decode
