"""JSON task and corpus files: one JSON document, or JSON lines (one value per line, what `datasets`'
`to_json` writes); how a JSON-lines dump is recognised where plain text is expected; and the fix named
for a task file that is not UTF-8."""
from __future__ import annotations

import json
from pathlib import Path

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


def encoding_fix(path: str | Path) -> str:
    """The command that converts a task file that is not UTF-8: UTF-16 where it starts with a UTF-16 byte
    order mark (Excel's "Unicode text"), else cp949 (the usual Korean legacy encoding) as an example."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    except OSError:
        utf16 = False
    if utf16:
        return f"it is UTF-16 (it starts with a UTF-16 byte order mark): convert it with {iconv_command(path, 'utf-16')}"
    return f"a binary file or another encoding? convert it with e.g. {iconv_command(path, 'cp949')}"


def iconv_command(path: str | Path, encoding: str) -> str:
    """`iconv` from `encoding` to UTF-8, writing a new file beside `path` (never onto it)."""
    path = Path(path)
    return f"`iconv -f {encoding} -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
