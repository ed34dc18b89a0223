"""A Python client of the Strata HTTP API, sync (:class:`StrataClient`) and async
(:class:`AsyncStrataClient`), on httpx.

    from serve_app.client import StrataClient

    with StrataClient("http://127.0.0.1:8000") as strata:
        strata.remove_background("photo.jpg").save("cutout.png")
        job = strata.decompose("poster.png", layers=4, model="classic",
                               on_progress=lambda p: print(p.status, p.step, p.total_steps))
        strata.download(job, "psd", "poster.psd")

Both clients build every request and read every response with the same code
(:class:`_Api`); they differ only in how they send. Errors of any kind (an HTTP
error answer, an unreachable server, a broken event stream) raise
:class:`StrataError` with the API's problem details. A 503 with ``Retry-After``
(a full queue) is retried after the time the server asks for, ``retries`` times.

The server and key come from the arguments or the environment (``STRATA_URL``,
default ``http://127.0.0.1:8000``; ``STRATA_API_KEY``, sent as
``Authorization: Bearer <key>``). This module imports neither torch nor ray.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from pydantic import BaseModel, ValidationError

from serve_app.schemas import Health, JobView, ModelHealth

__all__ = [
    "AsyncStrataClient",
    "Cutout",
    "DownloadKind",
    "Health",
    "Job",
    "JobPage",
    "ModelHealth",
    "Progress",
    "StrataClient",
    "StrataError",
]

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "STRATA_URL"
API_KEY_ENV = "STRATA_API_KEY"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# How many times an event stream may end (or break) in a row, with the job still
# running and no event received, before waiting gives up.
_MAX_STREAM_RESTARTS = 5

ImageInput = str | os.PathLike | bytes
DownloadKind = Literal["zip", "psd", "pptx", "manifest"] | int
ProgressCallback = Callable[["Progress"], Any]
T = TypeVar("T")


def _user_agent() -> str:
    try:
        return f"strata-client/{version('strata')}"
    except PackageNotFoundError:
        return "strata-client"


class StrataError(Exception):
    """Any failure of a Strata call.

    ``status`` is the HTTP status (None when no answer came: connection refused,
    timeout, broken stream); ``title`` and ``detail`` are the problem details of
    the answer (``detail`` says what to change); ``problem`` is the whole
    ``application/problem+json`` body; ``retry_after`` the seconds a 503 asked
    to wait.
    """

    def __init__(self, status: int | None, title: str, detail: str, *, problem: dict[str, Any] | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem or {}
        self.type = self.problem.get("type")
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status is not None else self.title
        return f"{head}: {self.detail}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> StrataError:
        """The error an HTTP error answer (status >= 400) stands for."""
        retry_after = _retry_after(response)
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"]
            return cls(response.status_code, str(body.get("title") or response.reason_phrase),
                       detail if isinstance(detail, str) else str(detail), problem=body,
                       request_id=body.get("request_id") or request_id, retry_after=retry_after)
        # Not a Strata answer (a proxy's error page, say): keep the start of its text.
        text = response.text.strip()[:300] or response.reason_phrase
        return cls(response.status_code, response.reason_phrase or "HTTP error", text,
                   request_id=request_id, retry_after=retry_after)

    @classmethod
    def from_transport(cls, exc: httpx.HTTPError, url: str) -> StrataError:
        """The error a failed exchange (no usable answer) stands for."""
        kind = "Timed out" if isinstance(exc, httpx.TimeoutException) else "Connection failed"
        return cls(None, kind, f"{url}: {exc or type(exc).__name__}")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class Cutout:
    """The answer of ``POST /v1/remove-background``: the image and its headers."""

    data: bytes
    media_type: str
    model: str
    engine: str
    batch_size: int
    processing_ms: float
    width: int
    height: int
    request_id: str | None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the image to ``path`` (its folder is created; the file appears
        only once complete) and return the path."""
        path = Path(path)
        with _atomic_file(path) as out:
            out.write(self.data)
        return path


@dataclass(frozen=True)
class Progress:
    """Where a job stands, as its event stream tells (every status change and model step)."""

    job_id: str
    status: str
    progress: float
    step: int | None
    total_steps: int | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Job(JobView):
    """A layer-decomposition job (``GET /v1/jobs/{id}``)."""

    @property
    def terminal(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.status in TERMINAL_STATUSES


class JobPage(BaseModel):
    """One page of ``GET /v1/jobs``, newest first."""

    jobs: list[Job]
    next_cursor: str | None


@dataclass
class _Call(Generic[T]):
    """One API request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


def _parse_model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise StrataError(response.status_code, "Unexpected answer",
                              f"{response.request.url.path} did not answer a {model.__name__}: {exc}") from exc
    return parse


def _parse_cutout(response: httpx.Response) -> Cutout:
    headers = response.headers
    try:
        return Cutout(
            data=response.content,
            media_type=headers.get("content-type", ""),
            model=headers["x-model"],
            engine=headers["x-engine"],
            batch_size=int(headers["x-batch-size"]),
            processing_ms=float(headers["x-processing-ms"]),
            width=int(headers["x-width"]),
            height=int(headers["x-height"]),
            request_id=headers.get("x-request-id"),
        )
    except (KeyError, ValueError) as exc:
        raise StrataError(response.status_code, "Unexpected answer",
                          f"the cutout's headers are incomplete: {exc}") from exc


def _params(**values: Any) -> dict[str, Any]:
    """Query parameters without the unset ones; booleans as the API spells them."""
    return {key: (str(value).lower() if isinstance(value, bool) else value)
            for key, value in values.items() if value is not None}


def _image_part(image: ImageInput, data: bytes) -> tuple[str, bytes, str]:
    # The service recognises images by their bytes, not by the declared type.
    name = Path(os.fspath(image)).name if not isinstance(image, bytes) else "image"
    return name, data, "application/octet-stream"


def _job_id(job: Job | str) -> str:
    return job.id if isinstance(job, Job) else job


class _Api:
    """Request building and answer reading shared by the sync and async clients."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, retries: int):
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retries = retries

    def client_options(self) -> dict[str, Any]:
        headers = {"User-Agent": _user_agent()}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout}

    # -- requests ------------------------------------------------------------

    def remove_background(self, part: tuple[str, bytes, str], **options: Any) -> _Call[Cutout]:
        return _Call("POST", "/v1/remove-background", _parse_cutout, params=_params(**options),
                     files={"image": part})

    def submit_layers(self, part: tuple[str, bytes, str], **options: Any) -> _Call[Job]:
        return _Call("POST", "/v1/layers", _parse_model(Job), params=_params(**options), files={"image": part})

    def job(self, job_id: str) -> _Call[Job]:
        return _Call("GET", f"/v1/jobs/{job_id}", _parse_model(Job))

    def jobs(self, status: str | None, limit: int, cursor: str | None) -> _Call[JobPage]:
        return _Call("GET", "/v1/jobs", _parse_model(JobPage),
                     params=_params(status=status, limit=limit, cursor=cursor))

    def cancel(self, job_id: str) -> _Call[Job | None]:
        # 202 with the job (a cancel was requested), 204 (a finished job was deleted).
        return _Call("DELETE", f"/v1/jobs/{job_id}",
                     lambda response: None if response.status_code == 204 else _parse_model(Job)(response))

    def health(self) -> _Call[Health]:
        return _Call("GET", "/v1/health", _parse_model(Health))

    @staticmethod
    def events_path(job_id: str) -> str:
        return f"/v1/jobs/{job_id}/events"

    @staticmethod
    def download_path(job_id: str, kind: DownloadKind) -> str:
        if isinstance(kind, int) and not isinstance(kind, bool):
            if kind < 1:
                raise ValueError("layers are numbered from 1 (the bottom)")
            return f"/v1/jobs/{job_id}/layers/{kind}.png"
        names = {"zip": "result.zip", "psd": "result.psd", "pptx": "result.pptx", "manifest": "manifest.json"}
        if kind not in names:
            raise ValueError(f"download kind {kind!r}: choose zip, psd, pptx, manifest or a layer number")
        return f"/v1/jobs/{job_id}/{names[kind]}"

    # -- answers -------------------------------------------------------------

    def retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending again, or None to give the answer back."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        return _retry_after(response)

    @staticmethod
    def check(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise StrataError.from_response(response)


class _Follower:
    """Reads a job's event stream: tells each step and status, notices the end."""

    def __init__(self, job_id: str, on_progress: ProgressCallback | None):
        self.job_id = job_id
        self.on_progress = on_progress
        self.received = False

    def feed(self, sse: ServerSentEvent) -> Job | None:
        """The finished job when ``sse`` says the job ended, else None."""
        self.received = True
        if sse.event == "status":
            try:
                job = Job.model_validate_json(sse.data)
            except ValidationError as exc:
                raise StrataError(None, "Unexpected answer", f"a status event of job {self.job_id}: {exc}") from exc
            self.tell(Progress(job.id, job.status, job.progress, job.step, job.total_steps))
            return job if job.terminal else None
        if sse.event == "progress":
            data = sse.json()
            self.tell(Progress(self.job_id, data.get("status", "running"), float(data["progress"]),
                               data.get("step"), data.get("total_steps")))
        return None

    def tell(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)

    def restart(self, job: Job, restarts: int) -> int:
        """The stream ended with the job still running: the restarts so far, or raise when there were too many."""
        restarts = 0 if self.received else restarts + 1
        self.received = False
        if restarts > _MAX_STREAM_RESTARTS:
            raise StrataError(None, "Event stream failed",
                              f"the events of job {job.id} ended {restarts} times in a row with the job {job.status}")
        return restarts


class StrataClient:
    """A synchronous Strata client; use it as a context manager or ``close()`` it.

    :param base_url: e.g. ``http://127.0.0.1:8000``; default ``$STRATA_URL`` or that.
    :param api_key: sent as ``Authorization: Bearer``; default ``$STRATA_API_KEY``.
    :param timeout: seconds for connecting and for each read (a model call may take
        up to the server's ``model_timeout_s``).
    :param retries: how often a 503 (full queue) is sent again after its ``Retry-After``.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 180.0,
                 retries: int = 3, transport: httpx.BaseTransport | None = None):
        self._api = _Api(base_url, api_key, timeout, retries)
        self._http = httpx.Client(transport=transport, **self._api.client_options())

    @property
    def base_url(self) -> str:
        return self._api.base_url

    def __enter__(self) -> StrataClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def remove_background(self, image: ImageInput, *, model: str | None = None,
                          output: Literal["cutout", "mask"] = "cutout", format: Literal["png", "webp"] = "png",
                          bg_color: str | None = None, crop: bool = False,
                          refine_foreground: bool = True) -> Cutout:
        """Remove the background of ``image`` (a path or the file's bytes).

        ``output="mask"`` gives the 8-bit alpha mask; ``bg_color="#RRGGBB"``
        composites on that colour; ``crop`` trims to the subject.
        """
        part = _image_part(image, _read_image(image))
        return self._call(self._api.remove_background(part, model=model, output=output, format=format,
                                                      bg_color=bg_color, crop=crop,
                                                      refine_foreground=refine_foreground))

    def decompose(self, image: ImageInput, *, layers: int = 4, model: str | None = None, resolution: int = 640,
                  steps: int = 50, seed: int | None = None, prompt: str | None = None, true_cfg_scale: float = 4.0,
                  wait: bool = True, on_progress: ProgressCallback | None = None) -> Job:
        """Submit a layer-decomposition job for ``image``.

        With ``wait`` (the default), follow the job's event stream and return it
        once it ended (succeeded, failed or cancelled: check ``job.status``),
        calling ``on_progress`` with each status change and model step; without,
        return the job as accepted.
        """
        part = _image_part(image, _read_image(image))
        job = self._call(self._api.submit_layers(part, model=model, layers=layers, resolution=resolution,
                                                 steps=steps, seed=seed, prompt=prompt,
                                                 true_cfg_scale=true_cfg_scale))
        return self.wait(job, on_progress=on_progress) if wait else job

    def wait(self, job: Job | str, *, on_progress: ProgressCallback | None = None) -> Job:
        """Follow the job's event stream until it ends; the ended job."""
        follower = _Follower(_job_id(job), on_progress)
        restarts = 0
        while True:
            try:
                with connect_sse(self._http, "GET", self._api.events_path(follower.job_id)) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise StrataError.from_response(source.response)
                    for sse in source.iter_sse():
                        ended = follower.feed(sse)
                        if ended is not None:
                            return ended
            except httpx.HTTPError:
                pass  # a broken stream: the job says below whether to listen again
            current = self.job(follower.job_id)
            if current.terminal:
                follower.tell(Progress(current.id, current.status, current.progress, current.step,
                                       current.total_steps))
                return current
            restarts = follower.restart(current, restarts)

    def job(self, job_id: str) -> Job:
        """The job ``job_id`` as it is now."""
        return self._call(self._api.job(job_id))

    def jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next."""
        return self._call(self._api.jobs(status, limit, cursor))

    def cancel(self, job: Job | str) -> Job | None:
        """Cancel a queued or running job (its state is returned); delete a finished one (None)."""
        return self._call(self._api.cancel(_job_id(job)))

    def download(self, job: Job | str, kind: DownloadKind, path: str | os.PathLike | None = None) -> bytes | Path:
        """A result of a succeeded job: ``"zip"``, ``"psd"``, ``"pptx"``,
        ``"manifest"`` or layer ``n`` (1 = bottom). With ``path``, streamed into
        that file (written whole or not at all) and the path returned; else the bytes."""
        url = self._api.download_path(_job_id(job), kind)
        if path is None:
            return self._call(_Call("GET", url, lambda response: response.content))
        with self._guard(), self._http.stream("GET", url) as response:
            if response.status_code >= 400:
                response.read()
                raise StrataError.from_response(response)
            with _atomic_file(Path(path)) as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        return Path(path)

    def health(self) -> Health:
        """Each model's engine, device, replicas (``GET /v1/health``)."""
        return self._call(self._api.health())

    def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            with self._guard():
                response = self._http.request(call.method, call.path, params=call.params, files=call.files)
            delay = self._api.retry_delay(response, attempt)
            if delay is None:
                self._api.check(response)
                return call.parse(response)
            attempt += 1
            time.sleep(delay)  # the wait the server asked for (Retry-After)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise StrataError.from_transport(exc, self._api.base_url) from exc


class AsyncStrataClient:
    """The asynchronous twin of :class:`StrataClient` (same arguments, same
    methods, awaited); use it as an async context manager or ``await aclose()``."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 180.0,
                 retries: int = 3, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int | None = None):
        self._api = _Api(base_url, api_key, timeout, retries)
        limits = httpx.Limits(max_connections=max_connections) if max_connections else httpx.Limits()
        self._http = httpx.AsyncClient(transport=transport, limits=limits, **self._api.client_options())

    @property
    def base_url(self) -> str:
        return self._api.base_url

    async def __aenter__(self) -> AsyncStrataClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def remove_background(self, image: ImageInput, *, model: str | None = None,
                                output: Literal["cutout", "mask"] = "cutout",
                                format: Literal["png", "webp"] = "png", bg_color: str | None = None,
                                crop: bool = False, refine_foreground: bool = True) -> Cutout:
        """See :meth:`StrataClient.remove_background`."""
        part = _image_part(image, await _aread_image(image))
        return await self._call(self._api.remove_background(part, model=model, output=output, format=format,
                                                            bg_color=bg_color, crop=crop,
                                                            refine_foreground=refine_foreground))

    async def decompose(self, image: ImageInput, *, layers: int = 4, model: str | None = None,
                        resolution: int = 640, steps: int = 50, seed: int | None = None, prompt: str | None = None,
                        true_cfg_scale: float = 4.0, wait: bool = True,
                        on_progress: ProgressCallback | None = None) -> Job:
        """See :meth:`StrataClient.decompose`."""
        part = _image_part(image, await _aread_image(image))
        job = await self._call(self._api.submit_layers(part, model=model, layers=layers, resolution=resolution,
                                                       steps=steps, seed=seed, prompt=prompt,
                                                       true_cfg_scale=true_cfg_scale))
        return await self.wait(job, on_progress=on_progress) if wait else job

    async def wait(self, job: Job | str, *, on_progress: ProgressCallback | None = None) -> Job:
        """See :meth:`StrataClient.wait`."""
        follower = _Follower(_job_id(job), on_progress)
        restarts = 0
        while True:
            try:
                async with aconnect_sse(self._http, "GET", self._api.events_path(follower.job_id)) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise StrataError.from_response(source.response)
                    async for sse in source.aiter_sse():
                        ended = follower.feed(sse)
                        if ended is not None:
                            return ended
            except httpx.HTTPError:
                pass  # a broken stream: the job says below whether to listen again
            current = await self.job(follower.job_id)
            if current.terminal:
                follower.tell(Progress(current.id, current.status, current.progress, current.step,
                                       current.total_steps))
                return current
            restarts = follower.restart(current, restarts)

    async def job(self, job_id: str) -> Job:
        """See :meth:`StrataClient.job`."""
        return await self._call(self._api.job(job_id))

    async def jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """See :meth:`StrataClient.jobs`."""
        return await self._call(self._api.jobs(status, limit, cursor))

    async def cancel(self, job: Job | str) -> Job | None:
        """See :meth:`StrataClient.cancel`."""
        return await self._call(self._api.cancel(_job_id(job)))

    async def download(self, job: Job | str, kind: DownloadKind,
                       path: str | os.PathLike | None = None) -> bytes | Path:
        """See :meth:`StrataClient.download`."""
        url = self._api.download_path(_job_id(job), kind)
        if path is None:
            return await self._call(_Call("GET", url, lambda response: response.content))
        try:
            async with self._http.stream("GET", url) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise StrataError.from_response(response)
                async with _async_atomic_file(Path(path)) as out:
                    async for chunk in response.aiter_bytes():
                        await out.write(chunk)
        except httpx.HTTPError as exc:
            raise StrataError.from_transport(exc, self._api.base_url) from exc
        return Path(path)

    async def health(self) -> Health:
        """See :meth:`StrataClient.health`."""
        return await self._call(self._api.health())

    async def _call(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, params=call.params, files=call.files)
            except httpx.HTTPError as exc:
                raise StrataError.from_transport(exc, self._api.base_url) from exc
            delay = self._api.retry_delay(response, attempt)
            if delay is None:
                self._api.check(response)
                return call.parse(response)
            attempt += 1
            await asyncio.sleep(delay)  # the wait the server asked for (Retry-After)


def _read_image(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


async def _aread_image(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    return await anyio.Path(image).read_bytes()


def _part_path(path: Path) -> Path:
    """Where a download into ``path`` is written until it is complete (a hidden sibling)."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.part"


@contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A file object whose content appears at ``path`` only once it is complete,
    so an interrupted download never leaves a partial file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(path)
    try:
        with open(part, "wb") as handle:
            yield handle
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


@asynccontextmanager
async def _async_atomic_file(path: Path) -> AsyncIterator[Any]:
    """:func:`_atomic_file` for the async client: the writes do not block the event loop."""
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
    part = _part_path(path)
    try:
        async with await anyio.open_file(part, "wb") as handle:
            yield handle
        await anyio.Path(part).replace(path)
    except BaseException:
        await anyio.Path(part).unlink(missing_ok=True)
        raise
