"""Writes that a reader (or a crash) never sees half done: the new file or folder appears whole, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path`, replacing it whole.

    The temporary file is in the same folder, so the final rename stays on one filesystem and is atomic; it is
    flushed to disk before the rename, or a crash could leave the new name pointing at empty blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = data.encode("utf-8") if isinstance(data, str) else data
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def publish_folder(staged: Path, target: Path) -> None:
    """Move the fully written folder `staged` (a sibling of `target`) to `target`, replacing what was there.

    A folder cannot be renamed over a non-empty one, so the old one is removed first: a crash in between leaves
    no `target`, never a mix of old and new files."""
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)
    _fsync_folder(target.parent)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary sibling folder of `target` to write into: published as `target` when the block succeeds,
    removed when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield staged
        publish_folder(staged, target)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def _fsync_folder(folder: Path) -> None:
    # The rename itself lives in the folder's entries; without this a crash may forget it on some filesystems.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
