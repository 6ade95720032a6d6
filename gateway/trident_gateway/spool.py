"""An upload streamed into a file (multipart field `file`, or the raw body): videos are too large to hold in
memory, so the bytes go to disk as they arrive, with the endpoint's size limit checked all along."""
from __future__ import annotations

import asyncio
import mimetypes
import re
from pathlib import Path
from typing import AsyncIterator

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from trident import media

from .errors import ApiError
from .uploads import Fields, check_length, form_fields, limited

UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def media_name(name: str | None, content_type: str = "") -> str:
    """A safe file name for an upload named `name` (or, unnamed, of `content_type`), refused with 415 unless its
    extension is one the media pipeline reads (it tells videos, audio and images apart by extension)."""
    if not name:
        extension = mimetypes.guess_extension(content_type.split(";")[0].strip().lower()) or ""
        name = f"upload{extension}"
    safe = UNSAFE.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")[-120:] or "upload"
    if media.media_kind(safe) is None:
        raise ApiError(415, "unsupported_media_type",
                       f"{name!r} is no media file the pipeline reads: name it with one of the extensions "
                       f"{', '.join(sorted(media.VIDEO_EXTENSIONS | media.AUDIO_EXTENSIONS | media.IMAGE_EXTENSIONS))} "
                       "(multipart filename, or ?filename= with a raw body)")
    return safe


async def save_upload(request: Request, directory: Path, limit: int, filename: str | None,
                      idle: float) -> tuple[Path, Fields]:
    """The uploaded file, written into `directory`, and the form's other fields (none for a raw body, named by
    `filename` or its Content-Type). 413 as soon as the body passes `limit`, 408 when it stalls for `idle`
    seconds; the caller removes `directory` on any error."""
    check_length(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):
        path, fields = await _save_multipart(request, directory, limit, idle)
    else:
        path, fields = directory / media_name(filename, content_type), {}
        with path.open("wb") as file:
            async for chunk in limited(request, limit, idle):
                await asyncio.to_thread(file.write, chunk)
    if path.stat().st_size == 0:
        raise ApiError(400, "empty_body", "the upload is empty: send the file as the body or as multipart field "
                                          "'file'")
    return path, fields


async def _save_multipart(request: Request, directory: Path, limit: int, idle: float) -> tuple[Path, Fields]:
    parser = _ToDisk(request.headers, limited(request, limit, idle), directory)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_request", f"invalid multipart body: {exc.message}") from None
    try:
        if parser.saved is None:
            raise ApiError(400, "bad_request", "the multipart body has no file field 'file'")
        return parser.saved, form_fields(form)
    finally:
        await form.close()


class _ToDisk(MultiPartParser):
    """Starlette's multipart parser, writing the file part straight into `directory` under its own (safe) name:
    Starlette's own spools it to the system's temporary directory."""

    def __init__(self, headers, stream: AsyncIterator[bytes], directory: Path):
        super().__init__(headers, stream, max_files=1, max_fields=32)
        self.directory = directory
        self.saved: Path | None = None

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.file is None:
            return
        if part.field_name != "file":
            raise MultiPartException(f"the file is in field {part.field_name!r}: send it as field 'file'")
        self.saved = self.directory / media_name(part.file.filename)
        part.file.file.close()  # the (still empty) spooled file Starlette made
        part.file.file = self.saved.open("wb")
        self._files_to_close_on_error.append(part.file.file)
