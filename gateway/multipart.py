"""Find and replace the `model` field of a multipart/form-data body without re-encoding files."""

from __future__ import annotations

import re

_NAME_MODEL = re.compile(rb'content-disposition:[^\r\n]*;\s*name="?model"?(?:[;\s\r\n]|$)', re.I)


def boundary_of(content_type: str) -> bytes | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode()
    return None


def replace_model_field(
    body: bytes, boundary: bytes, new_value: str | None
) -> tuple[str | None, bytes]:
    """Return the form's `model` value and the body with it replaced by `new_value`.

    Only the bytes of that one part change, so uploaded files pass through byte for byte.
    With `new_value=None` the body is returned unchanged.
    """
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    while position != -1:
        part_start = position + len(delimiter)
        if body[part_start : part_start + 2] == b"--":  # the closing delimiter
            return None, body
        next_delimiter = body.find(b"\r\n" + delimiter, part_start)
        if next_delimiter == -1:
            return None, body
        headers_end = body.find(b"\r\n\r\n", part_start)
        if headers_end != -1 and headers_end < next_delimiter:
            headers = body[part_start:headers_end]
            if _NAME_MODEL.search(headers):
                value_start = headers_end + 4
                value = body[value_start:next_delimiter].decode("utf-8", "replace")
                if new_value is None:
                    return value, body
                replaced = body[:value_start] + new_value.encode() + body[next_delimiter:]
                return value, replaced
        position = next_delimiter + 2
    return None, body
