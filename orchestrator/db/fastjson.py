"""JSON for the ingest / query hot paths: orjson when installed (3-5x faster), else the stdlib.

orjson rejects NaN/Infinity, which Python's json writes for a diverged metric: such text
falls back to the stdlib parser, so both read the same files.
"""
from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None


def loads(data: bytes | str) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN / Infinity, or really invalid: the stdlib decides (and explains)
    return json.loads(data)


def dumps(obj: Any) -> str:
    """Compact JSON text (the database's JSON columns)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj).decode()
        except TypeError:
            pass
    return json.dumps(obj, separators=(",", ":"))
