"""JSON lines files (task items, eval results): one reader, errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Tuple, Type


def iter_jsonl(path: Path, error: Type[Exception]) -> Iterator[Tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of ``path``.

    Args:
        path (`Path`): a UTF-8 JSON lines file.
        error (`type`): the exception raised, as ``error("path:line: not JSON (...)")``,
            for a line that does not parse (the caller's own input-error type).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is fine
    except UnicodeDecodeError as decode_error:
        raise error(f"{path}: not UTF-8 text ({decode_error.reason} at byte "
                    f"{decode_error.start}); save it as UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as decode_error:
            raise error(f"{path}:{number}: not JSON ({decode_error})") from None
