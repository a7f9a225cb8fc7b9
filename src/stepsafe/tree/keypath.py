"""Key paths as strings: ``params/layers/mlp_0/kernel``.

Strings are what people type (``select="params"``), what the CLI prints and what the manifest
indexes by. A ``/`` or ``%`` inside a key is percent-escaped so that joining never collides.
"""

from __future__ import annotations

SEP = "/"


def escape(segment: str) -> str:
    return segment.replace("%", "%25").replace(SEP, "%2F")


def unescape(segment: str) -> str:
    return segment.replace("%2F", SEP).replace("%25", "%")


def join(prefix: str, segment: str) -> str:
    segment = escape(segment)
    return f"{prefix}{SEP}{segment}" if prefix else segment


def split(path: str) -> list[str]:
    return [unescape(s) for s in path.split(SEP)] if path else []


def concat(prefix: str, rest: str) -> str:
    """Join two already-escaped paths."""
    return f"{prefix}{SEP}{rest}" if prefix and rest else prefix or rest
