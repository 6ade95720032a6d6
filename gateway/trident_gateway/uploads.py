"""Request bodies: a multipart upload (field `file`) or the raw body, read with a size limit."""
from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import ApiError


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the request body is over this endpoint's limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 from its Content-Length before reading, or as soon as the bytes read
    pass `limit` (chunked uploads carry no length)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise _too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client closed the connection before the end of the body") from None
    return bytes(body)


async def read_upload(request: Request, limit: int) -> tuple[bytes, dict[str, str | list[str]]]:
    """The uploaded file's bytes and the form's other fields (a multipart body), or the raw body and no fields."""
    body = await read_body(request, limit)
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
        fields: dict[str, str | list[str]] = {}
        for name in form.keys():
            values = [v for v in form.getlist(name) if isinstance(v, str)]
            if values:
                fields[name] = values[0] if len(values) == 1 else values
        return data, fields
    finally:
        await form.close()
