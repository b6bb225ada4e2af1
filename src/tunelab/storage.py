"""A run folder mirrored to object storage (`storage: s3://bucket/prefix`, or any fsspec URL).

Training reads and writes a local folder (`output_dir`) as always: PyTorch, PEFT and DeepSpeed write files, not
objects. The mirror copies it to `<storage>/<output_dir's name>/`: each checkpoint as soon as it is saved (with
the step log), and the whole folder when the run ends or stops. A checkpoint pruned locally (`keep_last`) is
deleted remotely too. `--resume` on a machine whose folder lacks the checkpoints (a new pod, another node) first
fetches the latest one, with the step log and the cached before-training scores, so the run continues exactly.

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


class RunMirror:
    def __init__(self, storage: str, local: Path) -> None:
        import fsspec

        if storage.startswith(("s3://", "s3a://")):
            require("storage", f"storage {storage!r}")
        try:
            self.fs: Any
            self.fs, root = fsspec.core.url_to_fs(storage.rstrip("/"))
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its package not installed
            raise TunelabError(f"storage {storage!r}: {exc}") from exc
        self.local, self.root = local, f"{root}/{local.name}"
        self.url = f"{storage.rstrip('/')}/{local.name}"

    def push_checkpoint(self, checkpoint: Path) -> None:
        """One checkpoint and the step log; remote checkpoints no longer kept locally are deleted."""
        self._put_tree(checkpoint)
        for name in _RESUME_FILES:
            if (self.local / name).is_file():
                self._put(self.local / name)
        kept = {p.name for p in RunLayout(self.local).checkpoints.iterdir()}
        for remote in self._remote_checkpoints():
            if remote.rsplit("/", 1)[-1] not in kept:
                self.fs.rm(remote, recursive=True)

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
            self._get(path, target / path.removeprefix(remote + "/"))
        for name in _RESUME_FILES:
            if self.fs.exists(f"{self.root}/{name}"):
                self._get(f"{self.root}/{name}", self.local / name)
        return target

    def _remote_checkpoints(self) -> list[str]:
        folder = f"{self.root}/{RunLayout(self.local).checkpoints.name}"
        if not self.fs.exists(folder):
            return []
        return [p for p in self.fs.ls(folder, detail=False) if checkpoint_step(Path(p)) is not None]

    def _put_tree(self, folder: Path) -> None:
        checkpoints = RunLayout(self.local).checkpoints
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            remote = self._remote(path)
            # A checkpoint never changes once saved: skip what is there. Anything else (an adapter trained again
            # into the same folder has the same size) may have been rewritten, so it always goes up.
            if path.is_relative_to(checkpoints) and self.fs.exists(remote):
                continue
            self._put(path)

    def _put(self, path: Path) -> None:
        remote = self._remote(path)
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)  # a local or shared path needs its folders
        self.fs.put_file(str(path), remote)

    def _get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(remote, str(local))

    def _remote(self, path: Path) -> str:
        return f"{self.root}/{path.relative_to(self.local).as_posix()}"
