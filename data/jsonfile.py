"""JSON task and corpus files: one JSON document, or JSON lines (one value per line, what `datasets`'
`to_json` writes); and how a JSON-lines dump is recognised where plain text is expected."""
from __future__ import annotations

import json

# the keys a JSON-lines dump keeps its text under, the likeliest first (the hint's `jq` command names one)
TEXT_KEYS = ("text", "document", "passage", "content", "sentence")


def json_or_lines(text: str):
    """`text` as one JSON document, else the list of its non-blank lines' values (JSON lines); ValueError
    naming both failures when it is neither."""
    try:
        return json.loads(text)
    except ValueError as whole:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as lines:
            raise ValueError(f"{whole}; as JSON lines: {lines}") from None


def json_lines_keys(head: bytes) -> list[str] | None:
    """The keys of the first line of a JSON-lines file (an object with a string value; e.g. a `datasets`
    dump) given the file's first bytes, else None."""
    first = next((line for line in head.split(b"\n")[:-1] if line.strip()), b"").strip().lstrip(b"\xef\xbb\xbf")
    if not first.startswith(b"{"):
        return None
    try:
        record = json.loads(first)
    except ValueError:
        return None
    if isinstance(record, dict) and any(isinstance(v, str) for v in record.values()):
        return list(record)
    return None


def text_key(keys: list[str]) -> str:
    """The key of `keys` (a JSON-lines record's) most likely to hold the text: the first of TEXT_KEYS
    present, else the last key."""
    return next((k for k in TEXT_KEYS if k in keys), keys[-1])
