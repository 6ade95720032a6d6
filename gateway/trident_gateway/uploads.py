"""Request bodies: a multipart upload (field `file`) or the raw body, read with a size limit and an idle timeout."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import ApiError


Fields = dict[str, "str | list[str]"]


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is over this endpoint's limit of {limit} bytes")


def check_length(request: Request, limit: int) -> None:
    """Refuse a body whose Content-Length is over `limit` (413) before any of it is read."""
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "bad_request", f"invalid Content-Length {length!r}")
    if length is not None and int(length) > limit:
        raise _too_large(limit)


async def limited(request: Request, limit: int, idle: float) -> AsyncIterator[bytes]:
    """The body's chunks, refused (413) once more than `limit` bytes came (chunked uploads carry no length), and
    (408) when the client sends nothing for `idle` seconds: a stalled upload must not hold its connection, memory
    or spool file for ever (uvicorn itself waits on a body without limit)."""
    read = 0
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body stalled: nothing came for {idle:g} s "
                                                    f"after {read} bytes") from None
            read += len(chunk)
            if read > limit:
                raise _too_large(limit)
            yield chunk
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client closed the connection before the end of the body") from None


def form_fields(form: FormData) -> Fields:
    """A multipart form's text fields (a name given several times: a list), its files left out."""
    fields: Fields = {}
    for name in form.keys():
        values = [v for v in form.getlist(name) if isinstance(v, str)]
        if values:
            fields[name] = values[0] if len(values) == 1 else values
    return fields


async def read_body(request: Request, limit: int, idle: float) -> bytes:
    """The whole body, refused with 413 from its Content-Length before reading, or as soon as the bytes read
    pass `limit`; 408 when it stalls for `idle` seconds."""
    check_length(request, limit)
    body = bytearray()
    async for chunk in limited(request, limit, idle):
        body += chunk
    return bytes(body)


async def read_upload(request: Request, limit: int, idle: float) -> tuple[bytes, Fields]:
    """The uploaded file's bytes and the form's other fields (a multipart body), or the raw body and no fields."""
    body = await read_body(request, limit, idle)
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send the file as the body or as multipart "
                                          "field 'file'")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, {}

    async def replay() -> dict:  # the body already read, for Starlette's multipart parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
    except StarletteHTTPException as exc:
        raise ApiError(400, "bad_request", f"invalid multipart body: {exc.detail}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "bad_request", "the multipart body has no file field 'file'")
        data = await upload.read()
        if not data:
            raise ApiError(400, "empty_body", "the uploaded file 'file' is empty")
        return data, form_fields(form)
    finally:
        await form.close()
