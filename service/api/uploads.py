"""Reading a request's images under byte limits (multipart ``file`` parts or a raw body)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.api.body_limits import UploadCharge
from service.pipeline.decode import BadUpload, ImageTooLarge, RequestTooLarge, TooManyFiles, UnsupportedImageType
from service.schemas import Upload

FILE_FIELDS = ("file", "files")  # "files" too: a common client habit for several parts


async def read_uploads(request: Request, max_files: int, max_upload_bytes: int,
                       max_request_bytes: int) -> list[Upload]:
    """The images of a request: multipart ``file`` parts in order, or a raw ``image/*`` body.

    Limits are enforced while streaming (Content-Length can be absent or lie), so an
    oversized upload is cut off at the limit instead of being buffered first.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_request_bytes:
        raise RequestTooLarge(f"request body of {declared} bytes exceeds the limit of {max_request_bytes}")
    if content_type == "multipart/form-data":
        _take_declared(request, declared)
        return await _read_multipart(request, max_files, max_upload_bytes, max_request_bytes)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        limit = min(max_upload_bytes, max_request_bytes)
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"image of {declared} bytes exceeds the limit of {limit}")
        _take_declared(request, declared)
        data = b"".join([chunk async for chunk in _limited(request, limit, "image")])
        name = request.headers.get("x-filename")
        return [Upload(filename=name[:255] if name else None, data=data)]
    raise UnsupportedImageType(
        f"send multipart/form-data with 'files' or 'file' parts or a raw image body (Content-Type image/*), "
        f"not {content_type or 'no Content-Type'}")


def _charge(request: Request) -> UploadCharge | None:
    return request.scope.get("state", {}).get("upload_charge")


def _take_declared(request: Request, declared: str | None) -> None:
    """The process's budget for uploads (body_limits.py), for a body within the request's own
    limits: 503 before a byte of it is read."""
    if declared and declared.isdigit() and (charge := _charge(request)) is not None:
        charge.grow_to(int(declared))


async def _limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    total, charge = 0, _charge(request)
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            cls = ImageTooLarge if what == "image" else RequestTooLarge
            raise cls(f"{what} exceeds the limit of {limit} bytes")
        if charge is not None:
            charge.grow_to(total)  # past a declared length, or a chunked body: as it comes
        yield chunk


async def _read_multipart(request: Request, max_files: int, max_upload_bytes: int,
                          max_request_bytes: int) -> list[Upload]:
    # Starlette's parser spools parts over 1 MB to disk; the stream limit bounds the total.
    # max_files + 1 lets "one too many" be reported as 413 too_many_files, not a parse error.
    parser = MultiPartParser(request.headers, _limited(request, max_request_bytes, "request body"),
                             max_files=max_files + 1, max_fields=64)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in str(exc).lower():
            raise TooManyFiles(f"more than {max_files} files in one request") from exc
        raise BadUpload(f"malformed multipart body: {exc}") from exc
    try:
        parts = [(key, value) for key, value in form.multi_items()
                 if isinstance(value, StarletteUploadFile) and key in FILE_FIELDS]
        if not parts:
            unnamed = [key for key, value in form.multi_items() if key in FILE_FIELDS and isinstance(value, str)]
            if unnamed:  # a file part without a filename is a text field to the multipart format
                raise BadUpload(f"the part {unnamed[0]!r} has no filename, so it is a text field, not a file: send "
                                "the image as a file part (a filename in its Content-Disposition; curl -F "
                                "file=@part.png, not -F file=<part.png)")
            raise BadUpload("no image in the request: send one or more multipart parts named 'files' or 'file'")
        if len(parts) > max_files:
            raise TooManyFiles(f"{len(parts)} files in one request; the limit is {max_files}")
        uploads = []
        for index, (_, part) in enumerate(parts):
            if part.size is not None and part.size > max_upload_bytes:
                raise ImageTooLarge(f"{part.filename!r} has {part.size} bytes; the limit is {max_upload_bytes}",
                                    details={"index": index, "filename": part.filename})
            uploads.append(Upload(filename=part.filename, data=await part.read()))
        return uploads
    finally:
        await form.close()
