"""Atomic file output: the one place that writes a file under a temporary name and renames it into place.

A reader (another process, a resumed job, an HTTP download) never sees a half-written file: data goes to a
unique temporary name in the target folder (same filesystem, so the rename is atomic) and is renamed over
the target only once complete. On any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_output(path: Path | str, *, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a unique temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    The temporary name keeps ``suffix`` last (``.npz``, ``.safetensors`` ... for writers that insist on one).
    The file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask), not mkstemp's 0600,
    so shared storage stays readable by the other hosts and users it is meant for.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, value: Any, **dumps_kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(value, **dumps_kwargs))
