"""A run folder mirrored to object storage (`storage: s3://bucket/prefix`, or any fsspec URL).

Training reads and writes a local folder (`output_dir`) as always: PyTorch, PEFT and DeepSpeed write files, not
objects. The mirror copies it to `<storage>/<output_dir's name>/`: each checkpoint as soon as it is saved (with
the step log), and the whole folder when the run ends or stops. The bucket keeps the newest `keep_last`
checkpoints, as the local folder does. `--resume` on a machine whose folder lacks the latest checkpoint (a new pod,
another node) first fetches it, with the step log and the cached before-training scores, so the run continues
exactly. The job service keeps its files and job folders in a bucket the same way (`job_service/artefacts.py`).

Credentials and endpoint come from the usual environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for MinIO and other S3-compatible stores), read by s3fs/botocore. Only the main process mirrors:
a run on several machines needs `output_dir` on a shared filesystem as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.extras import require
from tunelab.layout import RunLayout, checkpoint_step

# Besides the checkpoint itself, what a resumed run reads from its folder.
_RESUME_FILES = ("metrics.jsonl", "eval_before.json")
# Written into a remote checkpoint after all its files: a process killed while uploading leaves a checkpoint without
# it, which a resume must not pick (an object store has no atomic rename of a folder).
COMPLETE = ".complete"


def open_storage(storage: str) -> tuple[Any, str]:
    """The fsspec filesystem of a storage URL and the URL's path in it (for S3: bucket/prefix)."""
    import fsspec

    if storage.startswith(("s3://", "s3a://")):
        require("storage", f"storage {storage!r}")
    try:
        # No listing cache: other processes and machines write to the same store, and a stale listing would hide
        # their checkpoints and files (s3fs keeps listings forever by default).
        fs, root = fsspec.core.url_to_fs(storage.rstrip("/"), use_listings_cache=False)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package not installed
        raise TunelabError(f"storage {storage!r}: {exc}") from exc
    return fs, root


class RunMirror:
    def __init__(self, storage: str, local: Path, keep_last: int | None = None) -> None:
        self.fs, root = open_storage(storage)
        self.local, self.root = local, f"{root}/{local.name}"
        self.url = f"{storage.rstrip('/')}/{local.name}"
        self.keep_last = keep_last  # None: keep every checkpoint remotely

    def push_checkpoint(self, checkpoint: Path) -> None:
        """One checkpoint and the step log; remote checkpoints beyond the newest `keep_last` are deleted."""
        self._put_tree(checkpoint)
        for name in _RESUME_FILES:
            if (self.local / name).is_file():
                self._put(self.local / name)
        self.fs.pipe_file(f"{self._remote(checkpoint)}/{COMPLETE}", b"")  # last: the step log is up to it too
        if self.keep_last is None:
            return
        # By step, not by what is local: a resumed run's folder holds only the checkpoint it fetched.
        remote = sorted(self._remote_checkpoints(), key=lambda p: checkpoint_step(Path(p)) or 0)
        for old in remote[: -self.keep_last]:
            self.fs.rm(old, recursive=True)

    def latest_remote_step(self) -> int | None:
        return max((checkpoint_step(Path(p)) or 0 for p in self._remote_checkpoints()), default=None)

    def push_run(self) -> None:
        """Everything in the run folder (adapter, merged model, report, logs); checkpoints already there are skipped."""
        self._put_tree(self.local)

    def pull_latest_checkpoint(self) -> Path | None:
        """The remote's latest checkpoint into the local folder (with the files a resume reads); None if none."""
        remote = max(self._remote_checkpoints(), key=lambda p: checkpoint_step(Path(p)) or 0, default=None)
        if remote is None:
            return None
        target = RunLayout(self.local).checkpoints / remote.rsplit("/", 1)[-1]
        for path in self.fs.find(remote):
            if not path.endswith(f"/{COMPLETE}"):
                self._get(path, target / path.removeprefix(remote + "/"))
        for name in _RESUME_FILES:
            if self.fs.exists(f"{self.root}/{name}"):
                self._get(f"{self.root}/{name}", self.local / name)
        return target

    def _remote_checkpoints(self) -> list[str]:
        folder = f"{self.root}/{RunLayout(self.local).checkpoints.name}"
        if not self.fs.exists(folder):
            return []
        found = [p for p in self.fs.ls(folder, detail=False) if checkpoint_step(Path(p)) is not None]
        return [p for p in found if self.fs.exists(f"{p}/{COMPLETE}")]

    def _put_tree(self, folder: Path) -> None:
        checkpoints = RunLayout(self.local).checkpoints
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            remote = self._remote(path)
            # A checkpoint never changes once saved: skip what is there. Anything else (an adapter trained again
            # into the same folder has the same size) may have been rewritten, so it always goes up.
            if path.is_relative_to(checkpoints) and self.fs.exists(remote):
                continue
            try:
                self._put(path)
            except FileNotFoundError:  # a checkpoint the job service pruned since the listing
                continue

    def _put(self, path: Path) -> None:
        remote = self._remote(path)
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)  # a local or shared path needs its folders
        self.fs.put_file(str(path), remote)

    def _get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(remote, str(local))

    def _remote(self, path: Path) -> str:
        return f"{self.root}/{path.relative_to(self.local).as_posix()}"
