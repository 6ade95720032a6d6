"""report.html: one self-contained page (inline CSS, JS, SVG and data: URI thumbnails) over an `Analysis`.

It makes no request of its own (a Content-Security-Policy forbids every source but data: images and the local
media file): it reads the same with no server and no network. A video or audio input that exists where the
report is written is played from its relative path, and the transcript's timestamps seek it; when the file is
missing (or the report moved away from it) the timestamps stay plain text. Every text from the media or the
file system is HTML-escaped.
"""
from __future__ import annotations

import base64
import io
import math
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from .results import Analysis, FileAnalysis, Frame, ObjectCounts, Timings
from .subtitles import file_stems

THUMBNAIL_WIDTH = 320
GALLERY_LIMIT = 48  # thumbnails shown per input, evenly spaced over the analysed frames
CHART_CLASSES = 10  # series drawn in the counts chart (the most frequent classes)
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990",
           "#800000", "#808000", "#000075")
TEXT_COLOUR = "#ffd500"
LOW_PROBABILITY = 0.5  # words whisper was less sure of are underlined


def thumbnail(image: np.ndarray | Image.Image, width: int = THUMBNAIL_WIDTH, quality: int = 75) -> bytes:
    """A small JPEG of a frame (BGR uint8 array, as decoded for the server, or a PIL image) for `Frame.thumbnail`."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a thumbnail needs an H x W x 3 uint8 BGR frame, got {image.shape} {image.dtype}")
        image = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    image = image.convert("RGB")
    height = max(1, round(image.height * width / image.width))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def render(analysis: Analysis, out_dir: str | Path) -> str:
    """The report's HTML; `out_dir` is where it will be written (media links are relative to it)."""
    out_dir = Path(out_dir)
    stems = file_stems([f.path for f in analysis.inputs])
    body = [_header(analysis), _summary(analysis)]
    body += [_file_section(n, f, stem, out_dir) for n, (f, stem) in enumerate(zip(analysis.inputs, stems))]
    return _PAGE.format(title=escape(f"Trident analysis: {', '.join(Path(f.path).name for f in analysis.inputs)}"),
                        css=_CSS, body="\n".join(body), script=_SCRIPT)


# -- page parts ---------------------------------------------------------------------------------------------------

def _header(analysis: Analysis) -> str:
    options = analysis.options
    if options.scenes:
        sampling = "one frame per scene"
    elif options.fps:
        sampling = f"{options.fps:g} frames/s" if options.fps >= 1 else f"a frame every {1 / options.fps:g} s"
    else:
        sampling = "-"
    models = ", ".join(f"{escape(name)} v{escape(version)}" for name, version in analysis.server.models.items())
    return (f"<header><h1>Trident analysis</h1><p class=meta>{escape(analysis.created)} · trident "
            f"{escape(analysis.trident_version)} · server {escape(analysis.server.url)} "
            f"({escape(analysis.server.protocol)}){' · ' + models if models else ''} · sampling {sampling} · "
            f"language {escape(options.language or 'detected')}</p></header>")


def _summary(analysis: Analysis) -> str:
    s = analysis.summary
    rows = [("Files", f"{s.files}" + (f" ({s.failed} failed)" if s.failed else "")),
            ("Media length", _duration(s.media_seconds)), ("Frames analysed", f"{s.frames}"),
            ("Decoding", f"{s.decode_seconds:.2f} s")]
    rows += [(f"{model} (served)", f"{seconds:.2f} s") for model, seconds in s.model_seconds.items()]
    rows += [("Wall time", f"{s.wall_seconds:.2f} s"),
             ("Realtime factor", f"{s.realtime_factor:.1f}×" if s.realtime_factor else "-")]
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<section class=summary><h2>Summary</h2><table>{cells}</table></section>"


def _file_section(n: int, f: FileAnalysis, stem: str, out_dir: Path) -> str:
    name = escape(Path(f.path).name)
    parts = [f"<section class=file id=file-{n}><h2>{name} <span class=kind>{escape(f.kind or 'unknown')}</span>"
             f"</h2><p class=path>{escape(f.path)}</p>", _media_line(f)]
    if f.error:
        parts.append(f"<p class=error><b>Error:</b> {escape(f.error)}</p>")
    parts += [f"<p class=note>{escape(note)}</p>" for note in f.notes]
    player, transcript = _player(f, out_dir), _transcript(f, stem)
    if player or transcript:
        parts.append(f"<div class=watch>{player}{transcript}</div>")
    if f.text_events:
        parts.append(_text_events(f))
    if len(f.frames) > 1 and f.object_counts.classes:
        parts.append(_chart(f))
    if f.frames:
        parts.append(_gallery(f))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _media_line(f: FileAnalysis) -> str:
    m = f.media
    spent = [("decoding", f.timings.decode), *f.timings.models.items(), ("wall", f.timings.wall)]
    timing = "" if f.timings == Timings() else " · ".join(f"{escape(what)} {seconds:.2f} s" for what, seconds in spent)
    if m is None:
        return f"<p class=meta>{timing}</p>" if timing else ""
    facts = [_duration(m.duration) if m.duration is not None else None,
             f"{m.width}×{m.height}" if m.width and m.height else None, f"{m.fps:g} fps" if m.fps else None,
             f"video {escape(m.video_codec)}" if m.video_codec else ("no video" if not m.has_video else None),
             f"audio {escape(m.audio_codec)}" if m.audio_codec else ("no audio" if not m.has_audio else None)]
    return f"<p class=meta>{' · '.join(x for x in facts if x)}{'<br>' + timing if timing else ''}</p>"


def _player(f: FileAnalysis, out_dir: Path) -> str:
    if f.kind not in ("video", "audio"):
        return ""
    relative = os.path.relpath(Path(f.path).resolve(), out_dir.resolve())
    if not (out_dir / relative).is_file():
        return (f"<p class=player-missing>{escape(relative)} is not beside this report: "
                "the timestamps do not play it.</p>")
    tag = "video" if f.kind == "video" else "audio"
    first = f.frames[0].thumbnail if f.frames and tag == "video" else None
    poster = f" poster=\"{_data_uri(first)}\"" if first else ""
    return (f"<div class=player><{tag} controls preload=metadata{poster} "
            f"src=\"{escape(quote(Path(relative).as_posix()))}\"></{tag}></div>"
            f"<p class=player-missing hidden>{escape(relative)} could not be played here: "
            "the timestamps do not seek.</p>")


def _transcript(f: FileAnalysis, stem: str) -> str:
    t = f.transcript
    if t is None:
        return ""
    links = f"<a href=\"{escape(quote(stem))}.srt\">SRT</a> · <a href=\"{escape(quote(stem))}.vtt\">WebVTT</a>"
    rows = []
    for segment in t.segments:
        if segment.words:
            text = "".join(  # the word's leading space outside its span: underlines stay under the word
                f"{escape(w.word[:len(w.word) - len(w.word.lstrip())])}<span data-t=\"{w.start:.2f}\" "
                f"title=\"{w.start:.2f}–{w.end:.2f} s, p={w.probability:.2f}\""
                f"{' class=unsure' if w.probability < LOW_PROBABILITY else ''}>{escape(w.word.lstrip())}</span>"
                for w in segment.words)
        else:
            text = escape(segment.text)
        rows.append(f"<p class=seg data-start=\"{segment.start:.2f}\" data-end=\"{segment.end:.2f}\">"
                    f"<button class=stamp data-t=\"{segment.start:.2f}\">{_clock(segment.start)}</button> "
                    f"{text}</p>")
    return (f"<div class=speech><h3>Transcript <span class=meta>language {escape(t.language)} · "
            f"{len(t.segments)} segments · {links}</span></h3>"
            f"<div class=transcript>{''.join(rows) or '<p class=meta>(no speech)</p>'}</div></div>")


def _text_events(f: FileAnalysis) -> str:
    rows = "".join(f"<tr><td><button class=stamp data-t=\"{e.start:.2f}\">{_clock(e.start)}</button>–"
                   f"{_clock(e.end)}</td><td class=ocr>{escape(e.text)}</td><td>{e.score:.2f}</td>"
                   f"<td>{len(e.frames)}</td></tr>" for e in f.text_events)
    return (f"<h3>On-screen text <span class=meta>{len(f.text_events)} events</span></h3><table class=events>"
            f"<tr><th>Seen</th><th>Text</th><th>Score</th><th>Frames</th></tr>{rows}</table>")


def _class_colours(counts: ObjectCounts) -> dict[int, str]:
    return {c.class_id: PALETTE[rank % len(PALETTE)] for rank, c in enumerate(counts.classes)}


def _chart(f: FileAnalysis) -> str:
    counts, colours = f.object_counts, _class_colours(f.object_counts)
    shown = counts.classes[:CHART_CLASSES]
    width, height, left, right, top, bottom = 760, 220, 36, 24, 10, 26
    duration = f.media.duration if f.media and f.media.duration else 0.0
    end_time = max(counts.times[-1], duration) or 1.0
    peak = max(max(c.counts) for c in shown) or 1

    def x(t: float) -> float:
        return left + (width - left - right) * t / end_time

    def y(count: float) -> float:
        return height - bottom - (height - top - bottom) * count / peak

    grid = []
    for value in range(0, peak + 1, max(1, math.ceil(peak / 5))):
        grid.append(f"<line x1={left} x2={width - right} y1={y(value):.1f} y2={y(value):.1f} class=grid />"
                    f"<text x={left - 6} y={y(value) + 4:.1f} text-anchor=end>{value}</text>")
    step = next(s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, math.inf)
                if end_time / s <= 8)
    tick = 0.0
    while step != math.inf and tick <= end_time:
        grid.append(f"<text x={x(tick):.1f} y={height - 8} text-anchor=middle>{_clock(tick)}</text>")
        tick += step
    lines = []
    for c in reversed(shown):  # the most frequent class drawn last, on top
        points = []
        for i, (t, count) in enumerate(zip(counts.times, c.counts)):
            points.append(f"{x(t):.1f},{y(count):.1f}")
            following = counts.times[i + 1] if i + 1 < len(counts.times) else None
            if following is not None:
                points.append(f"{x(following):.1f},{y(count):.1f}")
        lines.append(f"<polyline points=\"{' '.join(points)}\" stroke=\"{colours[c.class_id]}\" class=series>"
                     f"<title>{escape(c.label)}</title></polyline>")
    legend = "".join(f"<li><i style=\"background:{colours[c.class_id]}\"></i>{escape(c.label)} "
                     f"<span class=meta>max {max(c.counts)}</span></li>" for c in shown)
    hidden = len(counts.classes) - len(shown)
    more = f"<li class=meta>+ {hidden} less frequent classes</li>" if hidden > 0 else ""
    return (f"<h3>Objects over time</h3><figure class=chart><svg viewBox=\"0 0 {width} {height}\" role=img "
            f"aria-label=\"objects per frame over time\"><line x1={left} x2={left} y1={top} y2={height - bottom} "
            f"class=axis />{''.join(grid)}{''.join(lines)}</svg><ul class=legend>{legend}{more}</ul></figure>")


def _gallery(f: FileAnalysis) -> str:
    frames = f.frames
    if len(frames) > GALLERY_LIMIT:
        frames = [frames[round(i * (len(frames) - 1) / (GALLERY_LIMIT - 1))] for i in range(GALLERY_LIMIT)]
    colours = _class_colours(f.object_counts)
    width = (f.media.width if f.media else None) or 1
    height = (f.media.height if f.media else None) or 1
    figures = "".join(_frame_figure(frame, width, height, colours) for frame in frames)
    shown = f"{len(frames)} of {len(f.frames)} frames" if len(frames) < len(f.frames) else f"{len(frames)} frames"
    return f"<h3>Frames <span class=meta>{shown}</span></h3><div class=gallery>{figures}</div>"


def _frame_figure(frame: Frame, width: int, height: int, colours: dict[int, str]) -> str:
    image = f"<img alt=\"frame at {frame.time:.2f} s\" src=\"{_data_uri(frame.thumbnail)}\">" if frame.thumbnail else ""
    font = height / 18  # about 8 px on a 240 px wide thumbnail
    marks = []
    for d in frame.detections:
        x1, y1, x2, y2 = d.box
        colour = colours.get(d.class_id, PALETTE[0])
        marks.append(f"<rect x={x1:.1f} y={y1:.1f} width={x2 - x1:.1f} height={y2 - y1:.1f} stroke=\"{colour}\">"
                     f"<title>{escape(d.label)} {d.score:.2f}</title></rect>"
                     f"<text x={x1:.1f} y={max(y1 - font * 0.2, font):.1f} fill=\"{colour}\" "
                     f"font-size={font:.1f}>{escape(d.label)} {d.score:.2f}</text>")
    for line in frame.text:
        points = " ".join(f"{px:.1f},{py:.1f}" for px, py in line.box)
        marks.append(f"<polygon points=\"{points}\" class=ocr><title>{escape(line.text)} {line.score:.2f}"
                     f"</title></polygon>")
    caption = [f"{len(frame.detections)} objects"] + [escape(line.text) for line in frame.text[:3]]
    return (f"<figure><div class=thumb style=\"aspect-ratio:{width}/{height}\">{image}"
            f"<svg viewBox=\"0 0 {width} {height}\" preserveAspectRatio=none>{''.join(marks)}</svg></div>"
            f"<figcaption><button class=stamp data-t=\"{frame.time:.2f}\">{_clock(frame.time)}</button> "
            f"{' · '.join(caption)}</figcaption></figure>")


def _data_uri(jpeg: bytes) -> str:
    return f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}"


def _clock(seconds: float) -> str:
    whole = int(seconds)
    hours, minutes, secs = whole // 3600, whole // 60 % 60, whole % 60
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else f"{_clock(seconds)} ({seconds:.1f} s)"


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; media-src 'self';\
 style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d1d1f}
h1{margin:0 0 4px}h2{margin:28px 0 2px;border-bottom:2px solid #ddd}h3{margin:18px 0 6px}
.meta,.path{color:#666;font-weight:normal;font-size:13px;margin:2px 0}
.kind{font-size:12px;background:#eee;border-radius:4px;padding:1px 6px;vertical-align:middle}
table{border-collapse:collapse}th,td{text-align:left;padding:3px 12px 3px 0;vertical-align:top}
.summary th{font-weight:600}.events td.ocr{font-family:ui-monospace,monospace}
.error{background:#fde8e8;border-left:4px solid #c81e1e;padding:6px 10px}
.note,.player-missing{background:#fff6db;border-left:4px solid #e3a008;padding:6px 10px}
.watch{display:flex;flex-wrap:wrap;gap:0 20px;align-items:flex-start}
.watch .player,.watch .player-missing{flex:0 1 560px;margin-top:18px}.watch .speech{flex:1 1 400px;min-width:0}
.player video{width:100%;background:#000;display:block}.player audio{width:100%}
.transcript{max-height:340px;overflow:auto;border:1px solid #e5e5e5;padding:4px 10px}
.seg{margin:4px 0}.seg.now{background:#e8f0fe}.unsure{text-decoration:underline dotted #c00}
.stamp{font:12px ui-monospace,monospace;border:0;background:#f0f0f0;border-radius:3px;padding:1px 4px;
color:#444;cursor:default}
.seekable .stamp{color:#1a56db;cursor:pointer}.seekable [data-t]{cursor:pointer}
.chart svg{width:100%;max-width:760px;height:auto;font:11px system-ui,sans-serif;fill:#555}
.chart .axis{stroke:#999}.chart .grid{stroke:#eee}
.chart .series{fill:none;stroke-width:2.5;stroke-linejoin:round}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 16px;margin:4px 0}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:10px}
.gallery figure{margin:0}.thumb{position:relative;background:#d0d0d0}
.thumb img,.thumb svg{position:absolute;inset:0;width:100%;height:100%;display:block}
.thumb rect{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}
.thumb polygon.ocr{fill:rgba(255,213,0,.12);stroke:""" + TEXT_COLOUR + """;stroke-width:2;
vector-effect:non-scaling-stroke;stroke-dasharray:4 2}
.thumb text{font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px;vector-effect:non-scaling-stroke}
figcaption{font-size:12px;color:#444;margin-top:3px;overflow-wrap:anywhere}
"""

# Seeks the section's player from any element with data-t; highlights the segment being played.
_SCRIPT = """
for (const section of document.querySelectorAll('section.file')) {
  const player = section.querySelector('video, audio');
  if (!player) continue;
  const unplayable = () => {
    section.classList.remove('seekable');
    player.parentElement.hidden = true;
    section.querySelector('.player-missing').hidden = false;
  };
  if (player.error) unplayable(); else section.classList.add('seekable');
  player.addEventListener('error', unplayable);
  const segments = [...section.querySelectorAll('.seg')];
  player.addEventListener('timeupdate', () => {
    const t = player.currentTime;
    for (const s of segments) s.classList.toggle('now', t >= +s.dataset.start && t < +s.dataset.end);
  });
  section.addEventListener('click', event => {
    const target = event.target.closest('[data-t]');
    if (!target || !section.classList.contains('seekable')) return;
    player.currentTime = +target.dataset.t;
    player.play().catch(() => {});
  });
}
"""
