"""The ``strata`` command line: background removal for files and folders, layer
decomposition with live progress, the job list and the service's health.

It talks to a running Strata over HTTP through :mod:`serve_app.client`; the
server comes from ``--server`` or ``$STRATA_URL``, a key from ``--api-key`` or
``$STRATA_API_KEY``. Progress goes to stderr, results and summaries to stdout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import anyio
import typer
from typer.core import TyperCommand, TyperGroup
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from serve_app.client import (
    API_KEY_ENV,
    DEFAULT_URL,
    URL_ENV,
    AsyncStrataClient,
    Job,
    ModelHealth,
    StrataClient,
    StrataError,
)
from serve_app.client import Progress as JobProgress

T = TypeVar("T")

class _HelpWithoutType:
    """Typer's --help, showing no `<bool>` type either (see `_flag`)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_HelpWithoutType, TyperCommand):
    """A command of `strata`."""


class _Group(_HelpWithoutType, TyperGroup):
    """`strata` itself."""


app = typer.Typer(
    cls=_Group,
    name="strata",
    help="Remove backgrounds and decompose images into layers with a Strata server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Files a folder contributes: the formats the service reads, by their extension.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Server = Annotated[str, typer.Option("--server", "-s", envvar=URL_ENV, help="Strata's base URL.")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar=API_KEY_ENV, show_default=False, help="Sent as 'Authorization: Bearer <key>'.")]
Timeout = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for each answer.")]


def _flag(*names: str, help: str):  # noqa: A002 - typer's own name for it
    """An on/off option. (Typer's help shows the type of each option, `<bool>` for a flag
    that takes no value; an empty metavar leaves it out.)"""
    return typer.Option(*names, metavar="", help=help)


def _stdout() -> Console:
    return Console(highlight=False)


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _table(title: str) -> Table:
    """A table with light rules only, so it fits an 80-column terminal."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _stderr().print(f"[red]error:[/] {escape(message)}")
    return typer.Exit(code)


# -- remove-bg -------------------------------------------------------------------


@dataclass
class Plan:
    """What a remove-bg run does: (input, output) pairs, and inputs refused before any request."""

    todo: list[tuple[Path, Path]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    ignored: int = 0  # files in the folders that are not images by their extension


def plan_outputs(paths: list[Path], out: Path, suffix: str) -> Plan:
    """Pair each input image with its output under ``out``.

    A file argument becomes ``out/<stem><suffix>``; a folder contributes its images
    (recursively, hidden files and ``out`` itself left out) at the same relative
    place under ``out``. Two inputs that would write one output: the later is refused.
    """
    plan = Plan()
    out_dir = out.resolve()
    claimed: dict[Path, Path] = {}

    def add(source: Path, target: Path) -> None:
        key = target.resolve()
        if key in claimed:
            plan.refused.append((source, f"{claimed[key]} writes the same output {target}"))
            return
        claimed[key] = source
        plan.todo.append((source, target))

    for path in paths:
        if path.is_dir():
            for source in sorted(path.rglob("*")):
                relative = source.relative_to(path)
                if not source.is_file() or any(part.startswith(".") for part in relative.parts):
                    continue
                if source.resolve().is_relative_to(out_dir):
                    continue  # earlier outputs are not inputs
                if source.suffix.lower() not in IMAGE_SUFFIXES:
                    plan.ignored += 1
                    continue
                add(source, out / relative.with_suffix(suffix))
        else:
            add(path, out / (path.stem + suffix))
    return plan


@dataclass
class BatchOutcome:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


async def _remove_backgrounds(todo: list[tuple[Path, Path]], outcome: BatchOutcome, *, server: str,
                              api_key: str | None, timeout: float, concurrency: int, progress: Progress,
                              task, **options) -> None:
    """Send ``todo`` through ``concurrency`` workers, recording each file's outcome."""
    queue = deque(todo)

    async def worker(strata: AsyncStrataClient) -> None:
        while queue:
            source, target = queue.popleft()
            try:
                cutout = await strata.remove_background(source, **options)
                await anyio.to_thread.run_sync(cutout.save, target)
                outcome.written.append(target)
            except StrataError as exc:
                outcome.failed.append((source, str(exc)))
            except OSError as exc:
                outcome.failed.append((source, f"{exc.strerror or exc}: {exc.filename or source}"))
            progress.advance(task)

    async with AsyncStrataClient(server, api_key=api_key, timeout=timeout, max_connections=concurrency) as strata:
        await asyncio.gather(*(worker(strata) for _ in range(min(concurrency, len(todo)))))


@app.command("remove-bg", cls=_Command)
def remove_bg(
    paths: Annotated[list[Path], typer.Argument(exists=True, show_default=False,
                                                help="Images and folders of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the results.")],
    model: Annotated[str | None, typer.Option(help="Model (see 'strata health'); default: the server's.")] = None,
    mask: Annotated[bool, _flag("--mask", help="Write the 8-bit alpha mask instead of the cutout.")] = False,
    format: Annotated[Literal["png", "webp"], typer.Option("--format", "-f", help="WebP is lossless.")] = "png",
    bg_color: Annotated[str | None, typer.Option("--bg-color", help="Composite on #RRGGBB.")] = None,
    crop: Annotated[bool, _flag("--crop", help="Trim to the subject.")] = False,
    refine: Annotated[bool, _flag("--refine/--no-refine", help="Estimate edge colours (no halo).")] = True,
    concurrency: Annotated[int, typer.Option("--concurrency", "-j", min=1, max=64,
                                             help="Images in flight at once.")] = 4,
    overwrite: Annotated[bool, _flag("--overwrite", help="Redo images whose output exists.")] = False,
    server: Server = DEFAULT_URL,
    api_key: ApiKey = None,
    timeout: Timeout = 180.0,
) -> None:
    """Remove the background of images and folders of images.

    Each input becomes OUT/<name>.png (or .webp); a folder's images keep their
    place under OUT. Outputs that exist are skipped, so a second run finishes
    what the first left. Exits 1 when any image failed.
    """
    plan = plan_outputs(paths, out, "." + format)
    outcome = BatchOutcome(failed=list(plan.refused))
    todo = []
    for source, target in plan.todo:
        if target.exists() and not overwrite:
            outcome.skipped.append(target)
        else:
            todo.append((source, target))
    total = len(plan.todo) + len(plan.refused)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=_stderr(), transient=False) as progress:
        task = progress.add_task("removing backgrounds", total=total,
                                 completed=len(outcome.skipped) + len(outcome.failed))
        if todo:
            asyncio.run(_remove_backgrounds(
                todo, outcome, server=server, api_key=api_key, timeout=timeout, concurrency=concurrency,
                progress=progress, task=task, model=model, output="mask" if mask else "cutout",
                format=format, bg_color=bg_color, crop=crop, refine_foreground=refine))
    _print_batch_summary(total, outcome, out, plan.ignored)
    if outcome.failed:
        raise typer.Exit(1)


def _print_batch_summary(total: int, outcome: BatchOutcome, out: Path, ignored: int) -> None:
    console = _stdout()
    noun = "image" if total == 1 else "images"
    parts = [f"{len(outcome.written)} written", f"{len(outcome.skipped)} skipped (output exists)",
             f"{len(outcome.failed)} failed"]
    console.print(f"{total} {noun}: {', '.join(parts)}; results in {escape(str(out))}")
    if ignored:
        console.print(f"{ignored} files in the folders are not images by their extension and were left out")
    if outcome.failed:
        table = _table("Failures")
        table.add_column("image", overflow="fold")
        table.add_column("reason", overflow="fold")
        for source, reason in sorted(outcome.failed, key=lambda item: str(item[0])):
            table.add_row(escape(str(source)), escape(reason))
        console.print(table)


# -- layers --------------------------------------------------------------------


@app.command("layers", cls=_Command)
def layers(
    image: Annotated[Path, typer.Argument(exists=True, dir_okay=False, show_default=False,
                                          help="The image to decompose.")],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the results.")],
    count: Annotated[int, typer.Option("--layers", "-n", help="Number of layers (2-10).")] = 4,
    model: Annotated[str | None, typer.Option(help="Layer model (see 'strata health'); default: the server's.")] = None,
    steps: Annotated[int, typer.Option(help="Diffusion steps.")] = 50,
    resolution: Annotated[int, typer.Option(help="640 or 1024.")] = 640,
    seed: Annotated[int | None, typer.Option(help="Random seed, for the same layers again.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Describe the image; default: the model captions it.")] = None,
    cfg: Annotated[float, typer.Option("--cfg", help="true_cfg_scale (guidance).")] = 4.0,
    psd: Annotated[bool, _flag("--psd", help="Also write <image>.psd.")] = False,
    zip_: Annotated[bool, _flag("--zip", help="Also write <image>.zip.")] = False,
    pptx: Annotated[bool, _flag("--pptx", help="Also write <image>.pptx.")] = False,
    server: Server = DEFAULT_URL,
    api_key: ApiKey = None,
    timeout: Timeout = 180.0,
) -> None:
    """Decompose an image into RGBA layers with live progress.

    Writes OUT/layer_01.png (the bottom), layer_02.png, ... and, when asked, the
    whole stack as ZIP, PSD and PPTX. Ctrl-C cancels the job. Exits 1 when the
    job fails.
    """
    with StrataClient(server, api_key=api_key, timeout=timeout) as strata:
        try:
            job = strata.decompose(image, layers=count, model=model, steps=steps, resolution=resolution, seed=seed,
                                   prompt=prompt, true_cfg_scale=cfg, wait=False)
        except StrataError as exc:
            raise _fail(str(exc)) from exc
        _stderr().print(f"job {job.id} accepted ({job.params.get('model')}, {count} layers)")
        try:
            job = _follow(strata, job)
        except KeyboardInterrupt:
            try:
                strata.cancel(job)
            except StrataError as exc:
                raise _fail(f"interrupted; cancelling job {job.id} failed: {exc}", 130) from None
            raise _fail(f"interrupted: job {job.id} cancelled", 130) from None
        except StrataError as exc:
            raise _fail(str(exc)) from exc
        if job.status != "succeeded":
            raise _fail(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        try:
            written = _download_layers(strata, job, out, image.stem, psd=psd, zip_=zip_, pptx=pptx)
        except (StrataError, OSError) as exc:
            raise _fail(str(exc)) from exc
    console = _stdout()
    rows = [(str(layer.index), layer.name, ", ".join(map(str, layer.bbox)) if layer.bbox else "empty", str(path))
            for layer, path in zip(job.result.layers, written)]
    if console.is_terminal:
        table = _table(f"{len(job.result.layers)} layers of {escape(image.name)} "
                       f"({job.result.engine}, {job.result.width}x{job.result.height})")
        for column in ("#", "name", "content box (x, y, w, h)"):
            table.add_column(column, overflow="fold")
        table.add_column("file", overflow="fold", ratio=1)
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    else:  # piped: one tab-separated line per layer, paths whole for the next program
        for row in rows:
            typer.echo("\t".join(row))
    for path in written[len(job.result.layers):]:
        typer.echo(f"wrote {path}")
    if job.warning:
        _stderr().print(f"warning: {escape(job.warning)}")


def _follow(strata: StrataClient, job: Job) -> Job:
    """Wait for the job's end, drawing its steps as a progress bar."""
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_stderr()) as progress:
        task = progress.add_task(job.status, total=None)

        def show(update: JobProgress) -> None:
            if update.total_steps:
                progress.update(task, total=update.total_steps, completed=update.step or 0)
            progress.update(task, description=update.status)

        return strata.wait(job, on_progress=show)


def _download_layers(strata: StrataClient, job: Job, out: Path, stem: str, *, psd: bool, zip_: bool,
                     pptx: bool) -> list[Path]:
    written = [strata.download(job, layer.index, out / layer.file) for layer in job.result.layers]
    for wanted, kind in ((zip_, "zip"), (psd, "psd"), (pptx, "pptx")):
        if wanted:
            written.append(strata.download(job, kind, out / f"{stem}.{kind}"))
    return written


# -- jobs, health -------------------------------------------------------------


def _ask(server: str, api_key: str | None, timeout: float, question: Callable[[StrataClient], T]) -> T:
    """One question to the server; its failure ends the command with the reason."""
    try:
        with StrataClient(server, api_key=api_key, timeout=timeout) as strata:
            return question(strata)
    except StrataError as exc:
        raise _fail(str(exc)) from exc


@app.command("jobs", cls=_Command)
def jobs(
    status: Annotated[JobStatusName | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="How many (1-100), newest first.")] = 20,
    server: Server = DEFAULT_URL,
    api_key: ApiKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """List recent layer jobs, newest first."""
    page = _ask(server, api_key, timeout, lambda strata: strata.jobs(status=status, limit=limit))
    if not page.jobs:
        _stdout().print(f"no {status + ' ' if status else ''}jobs at {escape(server)}")
        return
    print_jobs(_stdout(), page.jobs, server)


def print_jobs(console: Console, jobs: list[Job], server: str) -> None:
    """The jobs as a table, then each job's error and warning on a line of its own.

    Every value stays whole in 80 columns: ids, statuses and times never wrap; the
    "model ×layers" cell wraps at its space ("qwen-image-layered" over "×10") before
    it folds a name; errors and warnings, the long ones, are text under the table.
    """
    table = _table(f"Jobs at {escape(server)}")
    # Two spaces between columns and none at the edges: the widest row (a 22-character
    # id, "running 40%", qwen-image-layered, the time) fits 80 columns.
    table.collapse_padding, table.show_edge = True, False
    table.add_column("id", no_wrap=True, min_width=max(len(job.id) for job in jobs))  # copied whole
    table.add_column("status", no_wrap=True)
    table.add_column("model × layers", overflow="fold")
    for column in ("created", "took"):
        table.add_column(column, no_wrap=True)
    for job in jobs:
        status = f"{job.status} {job.progress:.0%}" if job.status == "running" else job.status
        table.add_row(job.id, status, escape(f"{job.params.get('model', '')} ×{job.params.get('layers', '?')}"),
                      _short_time(job.created_at), _took(job.started_at, job.finished_at))
    console.print(table)
    for job in jobs:
        for kind, text in (("error", job.error), ("warning", job.warning)):
            if text:
                console.print(f"{job.id} {kind}: {escape(text)}")


def _short_time(iso: str) -> str:
    """``MM-DD HH:MM`` of an ISO 8601 time (the server's are UTC)."""
    return iso[5:16].replace("T", " ")


def _took(started: str | None, finished: str | None) -> str:
    if not (started and finished):
        return ""
    seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
    return f"{seconds:.1f} s"


@app.command("health", cls=_Command)
def health(
    server: Server = DEFAULT_URL,
    api_key: ApiKey = None,
    timeout: Timeout = 30.0,
) -> None:
    """Each model's engine, device and replicas. Exits 1 when the service is degraded."""
    report = _ask(server, api_key, timeout, StrataClient.health)
    console = _stdout()
    console.print(f"Strata at {escape(server)}: {report.status}")
    for title, models, default in (("Background removal", report.models, report.default_model),
                                   ("Layer decomposition", report.layer_models, report.default_layer_model)):
        table = _table(f"{title} (default: {default})" if default else title)
        for column in ("model", "engine"):
            table.add_column(column, overflow="fold")
        for column in ("device", "dtype", "loaded", "replicas"):
            table.add_column(column, no_wrap=True)
        for name, model in models.items():
            table.add_row(escape(name), model.engine or "", model.device or "", model.dtype or "",
                          "yes" if model.loaded else "no", _replicas(model))
        console.print(table)
        # Reasons are sentences: under the table, wrapped as text, not folded in a column.
        for name, model in models.items():
            if note := model.fallback_reason or model.last_error:
                console.print(f"{escape(name)}: {escape(note)}")
    if report.status != "ok":
        raise typer.Exit(1)


def _replicas(model: ModelHealth) -> str:
    return ", ".join(f"{count} {state.lower()}" for state, count in sorted(model.replicas.items()))


def main() -> None:
    """The ``strata`` console script."""
    app()


if __name__ == "__main__":
    main()
