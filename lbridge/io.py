"""Atomic file writes and JSON-lines records: a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lbridge.errors import LbridgeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new one.

    A failed write (read-only directory, disk full) is one line naming the path, never a traceback.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise LbridgeError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        # mkstemp makes the file 0600; give it the mode open() would (shared outputs on a cluster).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise LbridgeError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write cut short by a crash): appending after it would
    glue the next record onto the fragment and lose both."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)  # rfind is -1 when no line is whole: empty file


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One record per line; a line is only complete once flushed, partial last lines are ignored on read."""
    try:
        drop_torn_tail(path)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise LbridgeError(f"cannot write {path}: {err.strerror or err}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return records


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (truncated, corrupt, unreadable), or None.

    safe_open reads only the header, and refuses a header whose tensors reach past the end of the
    file: a truncated shard is caught without reading its data.
    """
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
