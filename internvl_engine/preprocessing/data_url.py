"""`data:<mime>;base64,<payload>` URLs -> bytes, bounded before the base64 is decoded (images and videos)."""
from __future__ import annotations

import base64
import binascii
from typing import Callable


def data_url_bytes(url: str, kind: str, example: str, max_bytes: int | None, invalid: Callable[[str], Exception],
                   too_large: Callable[[str], Exception]) -> bytes:
    """The payload of `url` ("image" or "video" `kind`, `example` the form to show). `too_large(message)` is
    raised past `max_bytes` (estimated from the base64 length first, so a huge payload is never decoded),
    `invalid(message)` for anything malformed."""
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid(f"an {kind} data URL must look like {example}" if kind[0] in "aeiou"
                      else f"a {kind} data URL must look like {example}")
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes + 2:
        raise too_large(f"the {kind} is about {len(payload) * 3 // 4} bytes, over the limit of {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"invalid base64 in the {kind} data URL ({err})") from None
    if not data:
        raise invalid(f"the {kind} data URL is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise too_large(f"the {kind} is {len(data)} bytes, over the limit of {max_bytes}")
    return data
