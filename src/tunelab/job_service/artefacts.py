"""The service's files beyond one machine: with `--storage s3://bucket/prefix` (or any fsspec URL) every uploaded
file, result file and job folder is also kept in a bucket that every node reads, and `--data-dir` becomes each
node's local copy of it.

The database keeps local paths under data_dir, the same on every node; a path's twin in the bucket is the same path
relative to data_dir under the storage root (`files/file-….jsonl`, `jobs/ftjob-…/adapter/…`). A node that lacks one
(a Ray worker on another machine, a node that replaced a dead one, an API on a fresh volume) fetches it on first
use. Job folders go up while the job trains, through the run's own mirror (`tunelab.storage.RunMirror`): each
checkpoint as it is saved, the whole folder at the end. Without storage every method here is a local no-op.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from tunelab.job_service.settings import ServiceSettings
from tunelab.storage import open_storage

log = logging.getLogger("tunelab.job_service.artefacts")


class Artefacts:
    def __init__(self, data_dir: Path, storage: str | None) -> None:
        self.data_dir = data_dir.resolve()
        self.storage = storage.rstrip("/") if storage else None
        self.fs: Any = None
        self.root = ""
        if self.storage:
            self.fs, self.root = open_storage(self.storage)

    @classmethod
    def of(cls, settings: ServiceSettings) -> Artefacts:
        return cls(settings.data_dir, settings.storage)

    @property
    def jobs_url(self) -> str | None:
        """Where job folders are mirrored: a job's spec gets it as `storage`."""
        return f"{self.storage}/jobs" if self.storage else None

    def push(self, path: Path) -> None:
        """A file just written under data_dir goes up to the bucket."""
        remote = self._remote(path)
        if remote is None:
            return
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)  # a local or shared path needs its folders
        self.fs.put_file(str(path), remote)

    def local(self, path: Path) -> Path:
        """`path` (a file or a folder) on this node, fetched from the bucket if it is not here; as given when it
        is in neither place (the caller's own check reports it)."""
        remote = self._remote(path)
        if remote is None or path.exists() or not self.fs.exists(remote):
            return path
        log.info("fetching %s from %s", path, self.storage)
        if self.fs.isdir(remote):
            for item in self.fs.find(remote):
                self._get(item, path / item.removeprefix(remote + "/"))
        else:
            self._get(remote, path)
        return path

    def remove(self, path: Path) -> None:
        """A file or folder deleted here and in the bucket."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        remote = self._remote(path)
        if remote is not None and self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)

    def _get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".part")  # a reader never sees half a file
        self.fs.get_file(remote, str(partial))
        partial.replace(local)

    def _remote(self, path: Path) -> str | None:
        """The bucket twin of a path under data_dir; None without storage or for a path outside data_dir (a base
        model's folder, a file a test passed by path)."""
        if self.fs is None:
            return None
        resolved = path.resolve()
        if not resolved.is_relative_to(self.data_dir):
            return None
        return f"{self.root}/{resolved.relative_to(self.data_dir).as_posix()}"
