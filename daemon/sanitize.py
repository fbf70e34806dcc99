"""One sanitizer for every string that came from another process (argv, comm, file names, export
fields) before it reaches a terminal: a server's argv is chosen by whoever started it, and raw ESC
sequences in it could retitle, clear or reprogram root's terminal.

Control characters (C0 including ESC, BEL, newline; DEL; C1) and the Unicode direction overrides that
make text display in a different order than it reads are replaced by visible escapes (\\x1b, \\u202e).
"""

from __future__ import annotations

import re
from typing import Any

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
MAX_DEPTH = 64


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: object) -> str:
    """`text` as a string with nothing a terminal would interpret."""
    return _UNSAFE.sub(_escape, str(text))


def clean_doc(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON-like document with every string (keys too) passed through clean()."""
    if depth > MAX_DEPTH:
        return "..."
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: clean_doc(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_doc(v, depth + 1) for v in value]
    return value
