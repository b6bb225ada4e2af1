"""`tunelab service`: start the API and its workers; `tunelab service keys create|list|revoke`.

Mounted by the main CLI as a sub-app; also runnable alone as `python -m tunelab.job_service.cli`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.errors import TunelabError
from tunelab.job_service.settings import ServiceSettings

if TYPE_CHECKING:
    from tunelab.job_service.store import Store

app = typer.Typer(
    help="tunelab as a service: an OpenAI-compatible fine-tuning job API with worker processes.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys: each belongs to a project, and sees only that project's objects.")
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)
# soft_wrap: result lines stay one line whatever the terminal width, so scripts can grep them.
out = Console(soft_wrap=True)


class Executor(StrEnum):
    local = "local"
    ray = "ray"


DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="Files, job folders, logs and the SQLite database.")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database", help="SQLAlchemy URL, e.g. postgresql://user:pw@host/db (default: SQLite).")
]


def _parse_models(items: list[str]) -> dict[str, str]:
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{item!r}: use NAME=PATH", param_hint="--model")
        models[name] = str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path
    return models


def _settings(data_dir: Path, database: str | None, **fields: object) -> ServiceSettings:
    try:
        return ServiceSettings(data_dir=data_dir.resolve(), database=database, **fields)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.callback()
def service(
    ctx: typer.Context,
    data_dir: DataDirOpt = Path("tunelab-service"),
    database: DatabaseOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=0, help="Jobs trained at once (worker processes, or Ray tasks).")] = 1,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="A base model jobs may use besides 'embedded': NAME=PATH.")
    ] = None,
    max_file_mb: Annotated[float, typer.Option(help="Largest upload, in MiB.")] = 100.0,
    lease_s: Annotated[float, typer.Option(help="Seconds before a silent worker's job is re-queued.")] = 30.0,
    heartbeat_s: Annotated[float, typer.Option(help="Seconds between a worker's progress reports.")] = 1.0,
    poll_s: Annotated[float, typer.Option(help="Seconds between an idle worker's looks at the queue.")] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(help="Default checkpoints.every_steps of a job.")] = 10,
    worker_nice: Annotated[int, typer.Option(min=0, max=19, help="CPU niceness of the workers.")] = 10,
    torch_threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads per worker and for chat (default: cores / (workers + 1)).")
    ] = None,
    stop_timeout: Annotated[float, typer.Option(help="Seconds a stopping worker gets to checkpoint.")] = 120.0,
    executor: Annotated[
        Executor, typer.Option(help="Where jobs run: local worker processes, or tasks on a Ray cluster.")
    ] = Executor.local,
    ray_address: Annotated[
        str | None, typer.Option(help="--executor ray: the cluster's address (default: a local cluster).")
    ] = None,
    ray_cpus_per_job: Annotated[float, typer.Option(help="--executor ray: CPUs each job reserves.")] = 1.0,
    ray_gpus_per_job: Annotated[float, typer.Option(help="--executor ray: GPUs each job reserves.")] = 0.0,
    ray_memory_mb_per_job: Annotated[
        int | None, typer.Option(help="--executor ray: memory (MiB) each job reserves (default: none).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Keep uploads, result files and job folders in object storage too, e.g. s3://bucket/prefix."),
    ] = None,
) -> None:
    """Start the API and N workers (Ctrl-C stops them; running jobs are checkpointed and resume on restart)."""
    if ctx.invoked_subcommand is not None:
        return
    _require_extras(database, executor.value, storage)
    if executor is Executor.local and ray_address is not None:
        raise typer.BadParameter("--ray-address needs --executor ray", param_hint="--ray-address")
    from tunelab.job_service.supervisor import serve

    settings = _settings(
        data_dir,
        database,
        host=host,
        port=port,
        workers=workers,
        models=_parse_models(model or []),
        max_file_bytes=int(max_file_mb * 2**20),
        lease_s=lease_s,
        heartbeat_s=heartbeat_s,
        poll_s=poll_s,
        checkpoint_every=checkpoint_every,
        worker_nice=worker_nice,
        torch_threads=torch_threads,
        executor=executor.value,
        ray_address=ray_address,
        ray_cpus_per_job=ray_cpus_per_job,
        ray_gpus_per_job=ray_gpus_per_job,
        ray_memory_mb_per_job=ray_memory_mb_per_job,
        storage=storage,
    )
    try:
        serve(settings, console, stop_timeout)
    except TunelabError as exc:
        _fail(exc)


def _require_extras(database: str | None, executor: str = "local", storage: str | None = None) -> None:
    """The service's packages (an extra: the base install trains and serves without them) before anything imports
    them, psycopg for a PostgreSQL database, Ray for --executor ray, and s3fs for --storage s3://..."""
    from tunelab.extras import require

    try:
        require("service", "tunelab service")
        if database is not None and database.lower().startswith("postgres"):
            require("postgres", "a PostgreSQL database (--database postgresql://...)")
        if executor == "ray":
            require("ray", "tunelab service --executor ray")
        if storage is not None and storage.startswith(("s3://", "s3a://")):
            require("storage", f"tunelab service --storage {storage}")
    except TunelabError as exc:
        _fail(exc)


def _store(data_dir: Path, database: str | None) -> Store:
    _require_extras(database)
    from tunelab.job_service.store import Store

    settings = _settings(data_dir, database)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_url, pool_size=1)
    try:
        store.upgrade()
    except TunelabError as exc:
        _fail(exc)
    return store


def _fail(error: TunelabError) -> NoReturn:
    """A database this release cannot upgrade, or a missing extra: one clear message rather than a traceback."""
    console.print(f"[bold red]error:[/] {escape(str(error))}")  # escaped: "tunelab[service]" is not markup
    raise typer.Exit(2)


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option("--project", "-p", help="Project name (created if new).")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    data_dir: DataDirOpt = Path("tunelab-service"),
    database: DatabaseOpt = None,
) -> None:
    """Create an API key; it is printed once (only its hash is stored)."""
    store = _store(data_dir, database)
    proj, key = store.keys.create(project, name)
    console.print(f"project {proj.name} ({proj.id}): new key below; it is shown only once")
    out.print(key, soft_wrap=True)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = Path("tunelab-service"), database: DatabaseOpt = None) -> None:
    """List keys (id, project, first characters, revoked or not)."""
    store = _store(data_dir, database)
    table = Table("key id", "project", "starts with", "name", "revoked")
    for key, proj in store.keys.all():
        table.add_row(key.id, proj.name, key.hint + "…", key.name, "yes" if key.revoked_at else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id from `keys list`.")],
    data_dir: DataDirOpt = Path("tunelab-service"),
    database: DatabaseOpt = None,
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    store = _store(data_dir, database)
    if not store.keys.revoke(key_id):
        console.print(f"[red]error:[/] no active key {key_id}")
        raise typer.Exit(1)
    console.print(f"revoked {key_id}")


if __name__ == "__main__":
    app()
