"""Reading request bodies: a size limit (413) before anything is parsed, then JSON (422)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request

from app.errors import InputError, PayloadTooLarge


async def read_limited(request: Request) -> bytes:
    """The request body, refused past the configured size (413)."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is over the limit of {limit} bytes", field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> Any:
    """The request body as JSON; 413 past the configured size, 422 when malformed."""
    body = await read_limited(request)
    try:
        return json.loads(body)
    except RecursionError:
        raise InputError("body is nested too deeply", field="body") from None
    except ValueError as error:
        raise InputError(f"body is not valid JSON: {error}", field="body") from None


JsonBody = Annotated[Any, Depends(json_body)]


async def raw_body(request: Request) -> tuple[str, bytes]:
    """(content type, body bytes), refused past the configured size."""
    return request.headers.get("content-type", ""), await read_limited(request)


RawBody = Annotated[tuple[str, bytes], Depends(raw_body)]
