"""What `trident analyze` writes, without a server: analysis.json against its schema, text events, object counts,
SRT/WebVTT read back by ffmpeg, and report.html rendered by headless Chromium (Debian's `chromium` package)."""
from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from ultralytics.utils import ASSETS

from trident.analyze import events, report, subtitles
from trident.analyze.output import write
from trident.analyze.results import (SCHEMA, Analysis, FileAnalysis, Frame, MediaInfo, ObjectCounts, Options,
                                     Server, Timings)
from trident.results import Detection, Segment, TextLine, Transcription, Word

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "client" / "trident" / "analyze" / "schema.json"
INTERVAL = 1.5  # seconds between the clip's analysed frames
HOSTILE = "<img src=x onerror=alert(1)> & </script>"
SENTENCES = [  # what tests/data/make_real_speech.py's voices say (real_speech.json)
    (0.8, "Doctor Emily Carter will meet John Baker at four o'clock on Friday in room 27."),
    (6.4, "Please send 250 dollars to Michael Brown before the 15th of March."),
    (16.0, "The train to London leaves at 9 with 12 passengers and 3 dogs, and the next one leaves at 10 "
           "with nobody on board at all."),
]


# -- a realistic analysis, built from the shapes the models return ------------------------------------------------

def _timed_segment(start: float, text: str, seconds_per_char: float = 0.075) -> Segment:
    """A segment whose words are timed in proportion to their length, with short pauses, as whisper times them."""
    words, at = [], start
    for n, token in enumerate(text.split()):
        length = len(token) * seconds_per_char + 0.1
        probability = 0.35 if n % 7 == 3 else 0.9  # a few unsure words
        words.append(Word(" " + token, round(at, 2), round(at + length, 2), probability))
        at += length + 0.06
    return Segment(start=start, end=words[-1].end, text=" " + text, avg_logprob=-0.21, no_speech_prob=0.01,
                   temperature=0.0, words=words)


def _scene_picture(name: str) -> Image.Image:
    """An ultralytics sample photo cropped to 1280x720, as a 720p video shows it."""
    image = Image.open(ASSETS / name).convert("RGB")
    scale = 1280 / image.width
    image = image.resize((1280, round(image.height * scale)))
    top = (image.height - 720) // 2
    return image.crop((0, top, 1280, top + 720))


# ultralytics' boxes on its sample photos, moved into the 1280x720 crops above
BUS_SCENE = [(5, "bus", (27, 365, 1267, 720), 0.87), (0, "person", (76, 136, 387, 720), 0.87),
             (0, "person", (1059, 107, 1280, 720), 0.85), (0, "person", (349, 147, 544, 720), 0.83),
             (0, "person", (0, 376, 100, 720), 0.41)]
ZIDANE_SCENE = [(0, "person", (747, 41, 1141, 711), 0.88), (0, "person", (143, 200, 1109, 711), 0.80),
                (27, "tie", (437, 436, 524, 709), 0.71)]


def _draw_text(image: Image.Image, text: str, at: tuple[int, int], size: int) -> list[tuple[float, float]]:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    x1, y1, x2, y2 = draw.textbbox(at, text, font=font)
    draw.rectangle((x1 - 8, y1 - 8, x2 + 8, y2 + 8), fill=(20, 20, 20))
    draw.text(at, text, font=font, fill=(255, 255, 255))
    return [(x1 - 4.0, y1 - 4.0), (x2 + 4.0, y1 - 4.0), (x2 + 4.0, y2 + 4.0), (x1 - 4.0, y2 + 4.0)]


def _clip_frames() -> list[Frame]:
    """20 frames of a 30 s clip: the bus photo with a sign and a moving ticker, a cut at 15 s, then the football
    photo with a caption that OCR misses once; readings carry the typos OCR makes."""
    bus, zidane = _scene_picture("bus.jpg"), _scene_picture("zidane.jpg")
    frames = []
    for n in range(20):
        t = n * INTERVAL
        picture, lines = (bus if t < 15 else zidane).copy(), []
        if t < 15:
            detections = BUS_SCENE[: 5 - n % 2]  # the half-hidden person comes and goes
            sign = _draw_text(picture, "EXIT ONLY", (60, 40), 56)
            reading = ["EXIT ONLY", "EX1T ONLY", "EXIT 0NLY", "exit only."][n % 4]
            lines.append(TextLine(sign, reading, 0.9 - 0.1 * (n % 4)))
            ticker = _draw_text(picture, "SALE 50% OFF", (900 - 60 * n, 600), 40)
            lines.append(TextLine(ticker, *(("SALE 50% OFF", 0.8) if n % 3 else ("SALE 5O% 0FF", 0.7))))
        else:
            detections = ZIDANE_SCENE
            caption = _draw_text(picture, "Triton serves three models", (360, 620), 44)
            if n != 15:  # OCR misses the caption once: two events
                lines.append(TextLine(caption, *(("Triton serves three models", 0.95 if n == 17 else 0.85) if n % 2
                                                 else ("Triton serves three mode1s", 0.75))))
            if n == 19:
                lines.append(TextLine([(40.0, 40.0), (600.0, 40.0), (600.0, 90.0), (40.0, 90.0)], HOSTILE, 0.6))
        jitter = (n % 3) * 2.0
        frames.append(Frame(index=round(t * 30), time=t, thumbnail=report.thumbnail(picture), text=lines,
                            detections=[Detection((x1 + jitter, y1, x2 - jitter, y2), score, class_id, label)
                                        for class_id, label, (x1, y1, x2, y2), score in detections]))
    return frames


def _file(path: str, kind: str, media: MediaInfo, frames: list[Frame], transcript: Transcription | None,
          models: dict[str, float], **extra) -> FileAnalysis:
    return FileAnalysis(path=path, kind=kind, media=media, transcript=transcript, frames=frames,
                        text_events=events.text_events(frames, INTERVAL), object_counts=events.object_counts(frames),
                        timings=Timings(decode=0.4 + 0.02 * len(frames), models=models, wall=6.5), **extra)


def build_analysis(media_dir: Path) -> Analysis:
    speech = [_timed_segment(start, text) for start, text in SENTENCES]
    clip = _file(str(media_dir / "clip.mp4"), "video",
                 MediaInfo(30.0, True, True, 1280, 720, 30.0, "h264", "aac"), _clip_frames(),
                 Transcription(text="".join(s.text for s in speech), language="en", segments=speech),
                 {"detect": 2.61, "easyocr": 4.92, "whisper": 3.37})
    greeting = [_timed_segment(0.3, "안녕하세요. 만나서 반갑습니다."), _timed_segment(2.9, "감사합니다.")]
    audio = _file(str(media_dir / "greeting.m4a"), "audio", MediaInfo(4.2, False, True, audio_codec="aac"), [],
                  Transcription(text="".join(s.text for s in greeting), language="ko", segments=greeting),
                  {"whisper": 0.84})
    silent_frames = [Frame(index=i * 45, time=i * INTERVAL, detections=[Detection(b, s, c, lab) for c, lab, b, s
                                                                          in ZIDANE_SCENE[: 2 + i % 2]])
                     for i in range(4)]
    silent = _file(str(media_dir / "silent.mp4"), "video", MediaInfo(6.0, True, False, 1280, 720, 30.0, "h264"),
                   silent_frames, None, {"detect": 0.5, "easyocr": 0.9},
                   notes=["no audio track: no transcript", f"a note from the media: {HOSTILE}"])
    broken = FileAnalysis(path=str(media_dir / "broken.mp4"),
                          error="broken.mp4: not a media file PyAV can decode (Invalid data found when processing "
                                "input)")
    return Analysis(server=Server("localhost:8001", "grpc", {"detect": "1", "easyocr": "1", "whisper": "1"}),
                    options=Options(fps=1 / INTERVAL), created="2026-12-06T04:00:00Z", trident_version="0.1.0",
                    wall_seconds=7.9, inputs=[clip, audio, silent, broken])


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Analysis:
    return build_analysis(tmp_path_factory.mktemp("media"))


# -- analysis.json ------------------------------------------------------------------------------------------------

def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_analysis_json_validates_and_round_trips(analysis):
    text = analysis.to_json()
    document = json.loads(text)
    _validator().validate(document)
    assert document["schema"] == SCHEMA == _validator().schema["properties"]["schema"]["const"]
    assert "thumbnail" not in text
    again = Analysis.from_json(text)
    assert again == analysis and again.to_json() == text
    assert again.inputs[0].transcript.segments[0].words[0] == analysis.inputs[0].transcript.segments[0].words[0]
    summary = document["summary"]
    assert (summary["files"], summary["failed"], summary["frames"]) == (4, 1, 24)
    assert summary["media_seconds"] == pytest.approx(40.2)
    assert summary["model_seconds"] == pytest.approx({"detect": 3.11, "easyocr": 5.82, "whisper": 4.21})
    assert summary["realtime_factor"] == pytest.approx(40.2 / 7.9)


@pytest.mark.parametrize("path, value", [
    (("inputs", 0, "frames", 0, "time"), -1.0),
    (("inputs", 0, "kind"), "movie"),
    (("inputs", 0, "frames", 0, "detections", 0, "box"), [1, 2, 3]),
    (("inputs", 0, "text_events", 0, "box"), [[0, 0], [1, 0], [1, 1]]),
    (("inputs", 0, "transcript", "segments", 0, "words", 0, "probability"), 1.5),
    (("options", "colour"), "blue"),
    (("schema",), "trident.analysis/2"),
])
def test_schema_rejects_a_wrong_document(analysis, path, value):
    document = json.loads(analysis.to_json())
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(document)


def test_from_json_names_a_foreign_document():
    with pytest.raises(ValueError, match="not a trident.analysis/1 document.*'other/3'"):
        Analysis.from_json('{"schema": "other/3"}')


def test_a_new_analysis_is_stamped_and_options_are_checked():
    begun = Analysis.begin(Server("localhost:8001", "grpc"), Options(fps=2))
    assert begun.trident_version == importlib.metadata.version("trident") and begun.options.interval == 0.5
    assert datetime.datetime.fromisoformat(begun.created.replace("Z", "+00:00")).tzinfo == datetime.timezone.utc
    _validator().validate(json.loads(begun.to_json()))
    with pytest.raises(ValueError, match="fps must be a positive"):
        Options(fps=0)
    with pytest.raises(ValueError, match="not both"):
        Options(fps=1, scenes=True)
    with pytest.raises(ValueError, match="kind must be one of video, audio, image, got 'movie'"):
        FileAnalysis("a.mp4", kind="movie")


def _schema_fields(schema: dict) -> set[str]:
    """Every field path of the schema ("inputs[].frames[].time"), following $refs."""
    found: set[str] = set()

    def resolve(node: dict) -> dict:
        while "$ref" in node or "oneOf" in node:
            node = (schema["$defs"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node
                    else next(n for n in node["oneOf"] if n.get("type") != "null"))
        return node

    def walk(node: dict, prefix: str) -> None:
        node = resolve(node)
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            item = resolve(node["items"])
            if "properties" in item:
                walk(item, prefix + "[]")
            return
        for name, child in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            found.add(path)
            walk(child, path)

    walk(schema, "")
    return found


def test_readme_documents_every_schema_field():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `trident analyze` output"):]
    section = section[:section.index("\n#")]
    documented = re.findall(r"^\| `([\w.\[\]]+)` \|", section, re.M)
    assert len(documented) == len(set(documented))
    documented = set(documented)
    assert documented == _schema_fields(json.loads(SCHEMA_FILE.read_text()))


# -- text events and object counts -------------------------------------------------------------------------------

def _box(x: float, y: float, w: float = 200, h: float = 40) -> list[tuple[float, float]]:
    return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


def _frames(*readings_per_frame, interval: float = 1.0, times=None) -> list[Frame]:
    return [Frame(index=n * 25, time=times[n] if times else n * interval,
                  text=[TextLine(box, text, score) for text, box, score in readings])
            for n, readings in enumerate(readings_per_frame)]


def test_ocr_typos_on_consecutive_frames_are_one_event_with_the_best_reading():
    frames = _frames([("EXIT ONLY", _box(10, 10), 0.7)], [("EX1T ONLY", _box(12, 10), 0.6)],
                     [("exit only.", _box(10, 11), 0.95)], [("EXIT  0NLY", _box(11, 10), 0.8)])
    (event,) = events.text_events(frames, 1.0)
    assert (event.start, event.end, event.text, event.score) == (0.0, 3.0, "exit only.", 0.95)
    assert event.box == _box(10, 11) and event.frames == [0, 25, 50, 75]


def test_flicker_and_time_gaps_end_an_event():
    sign = ("OPEN 24 HOURS", _box(10, 10), 0.9)
    flicker = events.text_events(_frames([sign], [sign], [], [sign], [sign]), 1.0)
    assert [(e.start, e.end) for e in flicker] == [(0.0, 1.0), (3.0, 4.0)]
    # adjacent in the list but 2 s apart at 1 frame/s: a frame the decoder did not deliver
    gap = events.text_events(_frames([sign], [sign], [sign], times=[0.0, 1.0, 3.0]), 1.0)
    assert [(e.start, e.end) for e in gap] == [(0.0, 1.0), (3.0, 3.0)]
    # 1.4 intervals apart is still consecutive; one frame per scene: any next frame is
    assert len(events.text_events(_frames([sign], [sign], times=[0.0, 1.4]), 1.0)) == 1
    assert len(events.text_events(_frames([sign], [sign], times=[0.0, 40.0]), None)) == 1


def test_moving_text_is_followed_and_text_elsewhere_or_different_is_not():
    moving = [[("BREAKING NEWS", _box(600 - 80 * n, 500), 0.9)] for n in range(6)]
    (event,) = events.text_events(_frames(*moving), 1.0)
    assert event.frames == [0, 25, 50, 75, 100, 125]
    jump = events.text_events(_frames([("BREAKING NEWS", _box(600, 500), 0.9)],
                                      [("BREAKING NEWS", _box(100, 100), 0.9)]), 1.0)
    assert len(jump) == 2
    different = events.text_events(_frames([("PARKING", _box(10, 10), 0.9)], [("EXIT", _box(10, 10), 0.9)]), 1.0)
    assert [e.text for e in different] == ["PARKING", "EXIT"]


def test_the_same_text_twice_in_a_frame_stays_two_events():
    twice = [("50% OFF", _box(10, 10, 150), 0.9), ("50% OFF", _box(400, 10, 150), 0.8)]
    result = events.text_events(_frames(twice, twice, twice), 1.0)
    assert sorted((e.box[0], len(e.frames)) for e in result) == [((10, 10), 3), ((400, 10), 3)]


def test_text_events_refuse_a_bad_interval():
    with pytest.raises(ValueError, match="sample interval must be positive"):
        events.text_events([], 0.0)


def test_the_clip_gives_the_expected_events(analysis):
    clip = analysis.inputs[0]
    assert [(e.text, e.start, e.end) for e in clip.text_events if e.text != HOSTILE] == [
        ("EXIT ONLY", 0.0, 13.5), ("SALE 50% OFF", 0.0, 13.5),
        ("Triton serves three models", 15.0, 21.0), ("Triton serves three models", 24.0, 28.5)]


def test_object_counts_per_class_over_time():
    person, bus = Detection((0, 0, 1, 1), 0.9, 0, "person"), Detection((0, 0, 1, 1), 0.9, 5, "bus")
    frames = [Frame(0, 0.0, [person, person, bus]), Frame(30, 1.0, []), Frame(60, 2.0, [bus, bus, bus, bus])]
    counts = events.object_counts(frames)
    assert counts.times == [0.0, 1.0, 2.0]
    assert [(c.label, c.counts) for c in counts.classes] == [("bus", [1, 0, 4]), ("person", [2, 0, 0])]
    assert events.object_counts([]) == ObjectCounts()


# -- subtitles ---------------------------------------------------------------------------------------------------

def _check_rules(cue_list: list[subtitles.Cue]) -> None:
    for n, cue in enumerate(cue_list):
        assert 1 <= len(cue.lines) <= subtitles.MAX_LINES and all(0 < len(x) <= subtitles.MAX_LINE for x in cue.lines)
        assert 0 < cue.end - cue.start <= subtitles.MAX_DURATION
        if n + 1 < len(cue_list):
            following = cue_list[n + 1].start
            assert following - cue.end >= subtitles.MIN_GAP - 1e-9
            # under a second only when the next cue leaves no room
            assert (cue.end - cue.start >= subtitles.MIN_DURATION - 1e-9
                    or cue.end == pytest.approx(following - subtitles.MIN_GAP))
        else:
            assert cue.end - cue.start >= subtitles.MIN_DURATION - 1e-9


def _words_of(cue_list) -> list[str]:
    return " ".join(" ".join(c.lines) for c in cue_list).split()


def test_subtitle_rules_on_the_transcript(analysis):
    transcript = analysis.inputs[0].transcript
    cue_list = subtitles.cues(transcript)
    _check_rules(cue_list)
    assert _words_of(cue_list) == transcript.text.split()
    # the first sentence (8.1 s) and the third (105 characters) take two balanced cues each, the third cut at its comma
    assert [c.lines for c in cue_list] == [
        ["Doctor Emily Carter will meet John Baker"], ["at four o'clock on Friday in room 27."],
        ["Please send 250 dollars to Michael", "Brown before the 15th of March."],
        ["The train to London leaves at 9", "with 12 passengers and 3 dogs,"],
        ["and the next one leaves at 10", "with nobody on board at all."]]
    words, first = [w for s in transcript.segments for w in s.words], 0
    for cue in cue_list:  # each cue starts on its first word's timestamp
        assert cue.start == words[first].start
        first += len(" ".join(cue.lines).split())


def test_subtitle_rules_on_awkward_transcripts():
    long_word = "https://example.com/" + "a" * 70
    no_words = Segment(0.0, 20.0, " " + " ".join(["subtitles"] * 40))  # 20 s, 399 characters, no word times
    crowded = Segment(20.5, 20.6, " quick", words=[Word(" quick", 20.5, 20.5, 0.9), Word(" burst", 20.5, 20.5, 0.9)])
    after = Segment(20.5, 21.0, " same start", words=[Word(" same", 20.5, 20.8, 0.9), Word(" start", 20.8, 21.0, 0.9)])
    huge = Segment(30.0, 45.0, " " + long_word, words=[Word(" " + long_word, 30.0, 45.0, 0.9)])
    cue_list = subtitles.cues(Transcription("", "en", [no_words, crowded, after, huge]))
    _check_rules(cue_list)
    assert "".join("".join(c.lines) for c in cue_list[-3:]) == long_word
    assert _words_of(cue_list)[:40] == ["subtitles"] * 40


def _ffmpeg_cues(path: Path) -> list[tuple[int, int, str]]:
    """The cues ffmpeg reads from a subtitle file, written back out as SubRip: (start ms, end ms, text)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "srt", "-"],
                         capture_output=True, text=True, check=True).stdout

    def ms(stamp: str) -> int:
        h, m, s = stamp.replace(",", ".").split(":")
        return round((int(h) * 3600 + int(m) * 60 + float(s)) * 1000)

    return [(ms(a), ms(b), text) for a, b, text in
            re.findall(r"^\d+\n(\S+) --> (\S+)\n(.*?)\n(?:\n|\Z)", out, re.M | re.S)]


def test_ffmpeg_reads_the_srt_and_vtt(analysis, tmp_path):
    written = write(analysis, tmp_path)
    assert sorted(p.name for p in written) == ["analysis.json", "clip.srt", "clip.vtt", "greeting.srt",
                                               "greeting.vtt", "report.html"]
    for stem in ("clip", "greeting"):
        f = next(f for f in analysis.inputs if Path(f.path).stem == stem)
        expected = [(round(c.start * 1000), round(c.end * 1000), "\n".join(c.lines))
                    for c in subtitles.cues(f.transcript)]
        assert len(expected) >= 2
        assert _ffmpeg_cues(tmp_path / f"{stem}.srt") == expected
        assert _ffmpeg_cues(tmp_path / f"{stem}.vtt") == expected


def test_vtt_escapes_markup(tmp_path):
    cue_list = subtitles.cues(Transcription("", "en", [Segment(0.0, 2.0, " a <b>bold</b> & --> claim")]))
    (tmp_path / "x.vtt").write_text(subtitles.to_vtt(cue_list))
    (tmp_path / "x.srt").write_text(subtitles.to_srt(cue_list))
    assert _ffmpeg_cues(tmp_path / "x.vtt") == [(0, 2000, "a <b>bold</b> & --> claim")]
    assert "-->" not in subtitles.to_srt(cue_list).splitlines()[2]


def test_subtitle_files_get_distinct_names():
    assert subtitles.file_stems(["a/clip.mp4", "b/clip.mov", "Clip.mkv", "talk", ".hidden"]) == [
        "clip", "clip-2", "Clip-3", "talk", ".hidden"]


# -- report.html -------------------------------------------------------------------------------------------------

def test_thumbnail_is_small_and_refuses_a_non_frame():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :, 2] = 255  # BGR: red
    image = Image.open(io.BytesIO(report.thumbnail(frame)))
    assert image.size == (320, 180) and image.getpixel((160, 90))[0] > 240
    with pytest.raises(ValueError, match="H x W x 3 uint8 BGR"):
        report.thumbnail(np.zeros((720, 1280), np.float32))


def test_report_is_self_contained_and_escaped(analysis, tmp_path):
    html = report.render(analysis, tmp_path)
    for attribute, value in re.findall(r"""\b(src|href|action|poster|srcset)\s*=\s*["']?([^"'\s>]*)""", html):
        assert value.startswith(("data:image/jpeg;base64,", "#")) or re.fullmatch(r"[\w%./-]+", value), value
        assert "://" not in value and not value.startswith("//"), value
    assert "url(" not in html and "@import" not in html and "http" not in html.lower().replace("http-equiv", "")
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt; &amp; &lt;/script&gt;" in html


CHROMIUM = shutil.which("chromium")

# Recorded into the DOM (Chromium's --dump-dom prints it): every error, CSP violation and console message, where
# the report's parts are laid out, and what a click on a transcript timestamp does to the video.
PROBE = """<script>
const probe = {messages: []};
addEventListener('error', e => probe.messages.push('error: ' + (e.message || (e.target && e.target.outerHTML))), true);
addEventListener('unhandledrejection', e => probe.messages.push('rejection: ' + e.reason));
document.addEventListener('securitypolicyviolation', e => probe.messages.push('csp: ' + e.blockedURI));
for (const level of ['error', 'warn', 'log', 'info', 'debug'])
  console[level] = (...args) => probe.messages.push(level + ': ' + args.join(' '));
const box = el => {
  const r = el.getBoundingClientRect();
  return [r.left + scrollX, r.top + scrollY, r.width, r.height];
};
addEventListener('load', async () => {
  const clip = document.getElementById('file-0'), audio = document.getElementById('file-1');
  const video = clip.querySelector('video');
  if (video.readyState < 1) await new Promise(done => video.addEventListener('loadedmetadata', done, {once: true}));
  const stamp = clip.querySelectorAll('.seg .stamp')[1];
  stamp.click();
  Object.assign(probe, {
    seek: [+stamp.dataset.t, video.currentTime], duration: video.duration,
    seekable: [...document.querySelectorAll('section.file')].map(s => s.classList.contains('seekable')),
    audio_missing_shown: !audio.querySelector('.player-missing').hidden,
    thumbnails_decoded: [...document.querySelectorAll('.thumb img')]
      .filter(i => i.complete && i.naturalWidth === 320).length,
    placeholders: [...document.querySelectorAll('.thumb')]
      .filter(t => !t.querySelector('img') && t.querySelector('rect')).length,
    injected: document.querySelectorAll('img[src="x"], img:not([src^="data:"])').length,
    thumbnail: box(clip.querySelector('.thumb img')), chart: box(clip.querySelector('.chart svg')),
    transcript: box(clip.querySelector('.transcript')), height: document.documentElement.scrollHeight,
    colours: [...clip.querySelectorAll('.chart polyline')].map(p => p.getAttribute('stroke')),
  });
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(probe);
  document.body.append(out);
});
</script>"""


def _chromium(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", "--virtual-time-budget=10000", *args, url],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(analysis, tmp_path_factory):
    """The report written beside a real video (the clip's path), probed, then screenshotted at its full height."""
    assert CHROMIUM, "Debian's chromium package is needed (apt-get install chromium)"
    media_dir = Path(analysis.inputs[0].path).parent
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=320x180:rate=10:duration=30", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(media_dir / "clip.mp4")], check=True)
    out_dir = tmp_path_factory.mktemp("out")
    write(analysis, out_dir)
    html = (out_dir / "report.html").read_text()
    (out_dir / "probe.html").write_text(html.replace("<head>", "<head>" + PROBE, 1))
    dom = _chromium("--dump-dom", "--window-size=1280,1000", url=(out_dir / "probe.html").as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the probe did not report: {dom.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    shot = out_dir / "report.png"
    run = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                    f"--window-size=1280,{probe['height']}", url=(out_dir / "report.html").as_uri())
    return probe, Image.open(shot).convert("RGB"), run.stderr, out_dir


def test_report_runs_without_errors_and_seeks_the_video(rendered):
    probe, _, stderr, _ = rendered
    assert probe["messages"] == []
    assert [line for line in stderr.splitlines() if "CONSOLE" in line] == []
    assert probe["duration"] == pytest.approx(30.0, abs=0.2)
    asked, now = probe["seek"]
    assert asked > 5 and now == pytest.approx(asked, abs=0.01)
    # the clip's video is beside the report; the audio file and the silent video are not
    assert probe["seekable"] == [True, False, False, False] and probe["audio_missing_shown"]
    # the silent video's frames have no thumbnails: their boxes are drawn on grey placeholders
    assert (probe["thumbnails_decoded"], probe["placeholders"], probe["injected"]) == (20, 4, 0)


def _crop(screenshot: Image.Image, rect: list[float]) -> np.ndarray:
    x, y, w, h = (round(v) for v in rect)
    return np.asarray(screenshot.crop((x, y, x + w, y + h)), dtype=np.float32)


def test_report_screenshot_shows_thumbnails_transcript_and_chart(rendered, analysis):
    probe, screenshot, _, _ = rendered
    assert screenshot.size == (1280, probe["height"])
    shown = _crop(screenshot, probe["thumbnail"]).mean(axis=2)

    def likeness(frame: Frame) -> float:  # correlation of the shown thumbnail with a frame's, boxes drawn over it
        expected = Image.open(io.BytesIO(frame.thumbnail)).convert("L").resize(shown.shape[::-1])
        return np.corrcoef(shown.ravel(), np.asarray(expected, dtype=np.float32).ravel())[0, 1]

    bus, football = likeness(analysis.inputs[0].frames[0]), likeness(analysis.inputs[0].frames[-1])
    assert bus > 0.6 and bus > football + 0.3, (bus, football)
    chart = _crop(screenshot, probe["chart"])
    for colour in probe["colours"]:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)
        assert (np.abs(chart - rgb).max(axis=2) < 12).sum() > 100, f"no {colour} line in the chart"
    transcript = _crop(screenshot, probe["transcript"])
    dark = (transcript.mean(axis=2) < 90).mean()
    stamps = (np.abs(transcript - np.array([0x1a, 0x56, 0xdb])).max(axis=2) < 20).sum()
    assert dark > 0.01 and stamps > 50  # black text and blue (seekable) timestamps


def test_report_moved_away_from_its_video_still_reads(rendered, tmp_path):
    """The video's relative path no longer leads anywhere: the player gives way to a note, timestamps stay text."""
    html = (rendered[3] / "report.html").read_text()
    probe = """<script>
const messages = [];
addEventListener('error', e => messages.push(e.target.tagName || e.message), true);
for (const level of ['error', 'warn', 'log', 'info', 'debug'])
  console[level] = (...args) => messages.push(level + ': ' + args.join(' '));
addEventListener('load', () => setTimeout(() => {
  const clip = document.getElementById('file-0');
  clip.querySelector('.seg .stamp').click();
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({messages, seekable: clip.classList.contains('seekable'),
    player_hidden: clip.querySelector('.player').hidden, note: !clip.querySelector('.player-missing').hidden,
    transcript_segments: clip.querySelectorAll('.seg').length});
  document.body.append(out);
}, 500));
</script>"""
    moved = tmp_path / "elsewhere" / "moved.html"  # one folder deeper than the report was
    moved.parent.mkdir()
    moved.write_text(html.replace("<head>", "<head>" + probe, 1))
    video = re.search(r'<video [^>]*src="([^"]+)"', html).group(1)
    assert (rendered[3] / video).is_file() and not (moved.parent / video).exists()
    run = _chromium("--dump-dom", "--enable-logging=stderr", "--v=0", "--window-size=1280,1000", url=moved.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    assert json.loads(found.group(1)) == {"messages": ["VIDEO"], "seekable": False, "player_hidden": True,
                                          "note": True, "transcript_segments": 3}
    assert [line for line in run.stderr.splitlines() if "CONSOLE" in line] == []
