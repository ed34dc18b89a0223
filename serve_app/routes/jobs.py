"""Layer decomposition jobs: `POST /v1/layers`, `/v1/jobs...` and their result files."""

import json
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from serve_app.access import request_owner
from serve_app.layer_jobs import job_json
from serve_app.openapi import IMAGE_BODY
from serve_app.schemas import PROBLEM_RESPONSES, JobList, JobView, LayersParams
from serve_app.service import CurrentService
from serve_app.uploads import read_image_input

JobId = Annotated[str, Path(description="The job's id, as `POST /v1/layers` answered it")]
# The caller's key id (None: no keys configured); every job operation is scoped to it.
Owner = Annotated[str | None, Depends(request_owner)]

router = APIRouter()


def _prefer_wait(prefer: str | None) -> float:
    """N of an RFC 7240 `Prefer: wait=N` header; 0 without one."""
    match = re.search(r"(?:^|[;,\s])wait\s*=\s*(\d+(?:\.\d+)?)", prefer or "")
    return float(match.group(1)) if match else 0.0


@router.post(
    "/v1/layers",
    summary="Decompose an image into RGBA layers (a job)",
    status_code=202,
    response_model=JobView,
    responses={200: {"description": "The finished job (with `Prefer: wait=N`)", "model": JobView},
               **PROBLEM_RESPONSES},
    openapi_extra=IMAGE_BODY,
)
async def create_layers_job(request: Request, params: Annotated[LayersParams, Query()], service: CurrentService,
                            owner: Owner,
                            prefer: Annotated[str | None, Header(
                                description="`wait=N`: answer 200 with the finished job if it ends within N s")] = None,
                            ) -> Response:
    # The model is checked before the upload is read: a bad name costs no transfer or fetch.
    service.layer_model_name(params.model)
    data = await read_image_input(request, "image", service.config.limits, params.image_url,
                                  service.fetch_image_url)
    job = await service.submit_layer_job(data, params, owner=owner)
    wait_s = min(_prefer_wait(prefer), service.config.jobs.max_wait_s)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if wait_s > 0:
        job = await service.wait_for_end(job, wait_s)
        headers["Preference-Applied"] = f"wait={wait_s:g}"
    return JSONResponse(job_json(job), status_code=200 if job.terminal else 202, headers=headers)


@router.get("/v1/jobs", summary="List jobs, newest first", response_model=JobList, responses=PROBLEM_RESPONSES)
async def list_jobs(service: CurrentService, owner: Owner,
                    status: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                                      Query(description="Only jobs in this state")] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[str | None, Query(max_length=200)] = None) -> JobList:
    jobs, next_cursor = await service.list_jobs(status=status, limit=limit, cursor=cursor, owner=owner)
    return JobList(jobs=[JobView(**job_json(job)) for job in jobs], next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", summary="A job's state, progress and result", response_model=JobView,
            responses=PROBLEM_RESPONSES)
async def get_job(job_id: JobId, service: CurrentService, owner: Owner) -> JobView:
    return JobView(**job_json(await service.job(job_id, owner=owner)))


@router.get("/v1/jobs/{job_id}/events", summary="Server-Sent Events: progress until the job ends",
            response_class=EventSourceResponse,
            responses={200: {"description": "`status` events (the job) and `progress` events (per step)",
                             "content": {"text/event-stream": {}}}, **PROBLEM_RESPONSES})
async def job_events(job_id: JobId, service: CurrentService, owner: Owner):
    await service.job(job_id, owner=owner)

    async def events():
        async for event, data in service.jobs.watch(job_id):
            yield {"event": event, "data": json.dumps(data)}

    return EventSourceResponse(events(), ping=15)


@router.delete("/v1/jobs/{job_id}", summary="Cancel a queued/running job; delete a finished one",
               status_code=204,
               responses={202: {"description": "Cancellation requested (the job)", "model": JobView},
                          204: {"description": "Deleted with its files"}, **PROBLEM_RESPONSES})
async def delete_job(job_id: JobId, service: CurrentService, owner: Owner) -> Response:
    job = await service.cancel_or_delete(job_id, owner=owner)
    if job is None:
        return Response(status_code=204)
    return JSONResponse(job_json(job), status_code=202)


@router.get("/v1/jobs/{job_id}/layers/{index}.png", summary="One layer (1 = bottom), full canvas RGBA PNG",
            response_class=Response, responses={200: {"content": {"image/png": {}}}, **PROBLEM_RESPONSES})
async def get_layer(job_id: JobId, index: Annotated[int, Path(ge=1, le=100)], service: CurrentService,
                    owner: Owner) -> Response:
    return Response(await service.layer_png(job_id, index, owner=owner), media_type="image/png")


def _attachment(data: bytes, media_type: str, filename: str) -> Response:
    return Response(data, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/v1/jobs/{job_id}/result.zip", summary="All layers as layer_01.png, ... plus manifest.json",
            response_class=Response, responses={200: {"content": {"application/zip": {}}}, **PROBLEM_RESPONSES})
async def get_zip(job_id: JobId, service: CurrentService, owner: Owner) -> Response:
    return _attachment(await service.layers_zip(job_id, owner=owner), "application/zip", f"{job_id}.zip")


@router.get("/v1/jobs/{job_id}/result.psd", summary="All layers as one PSD (named pixel layers, bottom first)",
            response_class=Response,
            responses={200: {"content": {"image/vnd.adobe.photoshop": {}}}, **PROBLEM_RESPONSES})
async def get_psd(job_id: JobId, service: CurrentService, owner: Owner) -> Response:
    return _attachment(await service.layers_psd(job_id, owner=owner), "image/vnd.adobe.photoshop", f"{job_id}.psd")


PPTX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.presentationml.presentation"


@router.get("/v1/jobs/{job_id}/result.pptx",
            summary="All layers as one PowerPoint slide (full-canvas pictures, bottom first)",
            response_class=Response, responses={200: {"content": {PPTX_MEDIA_TYPE: {}}}, **PROBLEM_RESPONSES})
async def get_pptx(job_id: JobId, service: CurrentService, owner: Owner) -> Response:
    return _attachment(await service.layers_pptx(job_id, owner=owner), PPTX_MEDIA_TYPE, f"{job_id}.pptx")


@router.get("/v1/jobs/{job_id}/manifest.json", summary="Layer order, names, sizes, boxes, params, timings",
            responses=PROBLEM_RESPONSES)
async def get_manifest(job_id: JobId, service: CurrentService, owner: Owner) -> Response:
    return Response(await service.manifest(job_id, owner=owner), media_type="application/json")
