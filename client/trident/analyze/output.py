"""`write(analysis, out_dir)`: everything `trident analyze` leaves in its output folder."""
from __future__ import annotations

from pathlib import Path

from . import report, subtitles
from .results import Analysis


def write(analysis: Analysis, out_dir: str | Path) -> list[Path]:
    """Write analysis.json, <stem>.srt and <stem>.vtt for every input with a transcript, and report.html.

    Thumbnails are not files of their own: they are inlined in report.html only. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(out_dir / "analysis.json", analysis.to_json() + "\n")]
    for f, stem in zip(analysis.inputs, subtitles.file_stems([f.path for f in analysis.inputs])):
        if f.transcript is not None:
            cues = subtitles.cues(f.transcript)
            written.append(_write(out_dir / f"{stem}.srt", subtitles.to_srt(cues)))
            written.append(_write(out_dir / f"{stem}.vtt", subtitles.to_vtt(cues)))
    written.append(_write(out_dir / "report.html", report.render(analysis, out_dir)))
    return written


def _write(path: Path, text: str) -> Path:
    """Written whole or not at all (a run interrupted while writing leaves the previous file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path
