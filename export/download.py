"""Downloads with a progress bar, a local cache and checksum verification."""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

CACHE_DIR = Path(os.environ.get("TRIDENT_CACHE", Path.home() / ".cache" / "trident"))


class DownloadError(RuntimeError):
    """A weight file could not be fetched or failed its checksum."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise DownloadError unless `path` matches the given checksums."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected and file_digest(path, algorithm) != expected.lower():
            raise DownloadError(f"{path} fails its {algorithm} check (expected {expected}); delete it and retry")


def fetch(url: str, filename: str | None = None, sha256: str | None = None, md5: str | None = None,
          cache_dir: Path = CACHE_DIR) -> Path:
    """Return the cached, verified copy of `url`, downloading it with a progress bar if needed."""
    target = Path(cache_dir) / (filename or url.rsplit("/", 1)[-1])
    if target.exists():
        verify(target, sha256, md5)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {exc}. On an offline machine pass a local file "
            "(--weights /path/to/file) or use random weights of the same architecture (--weights synthetic)."
        ) from exc
    verify(partial, sha256, md5)
    shutil.move(partial, target)
    return target
