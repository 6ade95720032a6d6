"""`trident analyze`: what the pipeline writes (results model, analysis.json schema, subtitles, report.html)."""
