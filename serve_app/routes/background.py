"""`POST /v1/remove-background`: an image in, its cutout or alpha mask out."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from serve_app.openapi import IMAGE_BODY
from serve_app.schemas import PROBLEM_RESPONSES, RemoveBackgroundParams
from serve_app.service import CurrentService, engine_headers
from serve_app.uploads import read_image_input

router = APIRouter()


@router.post(
    "/v1/remove-background",
    summary="Remove the background of an image",
    response_class=Response,
    responses={
        200: {"description": "The cutout or mask", "content": {"image/png": {}, "image/webp": {}}},
        **PROBLEM_RESPONSES,
    },
    openapi_extra=IMAGE_BODY,
)
async def remove_background(request: Request, params: Annotated[RemoveBackgroundParams, Query()],
                            service: CurrentService) -> Response:
    # The model name is checked before the upload is read: a bad name costs no transfer or fetch.
    service.model_name(params.model)
    data = await read_image_input(request, "image", service.config.limits, params.image_url,
                                  service.fetch_image_url)
    cutout = await service.remove_background(data, params)
    rendered = cutout.rendered
    service.request_metrics.observe("/v1/remove-background", cutout.model, cutout.processing_ms / 1000)
    return Response(
        rendered.data,
        media_type=rendered.media_type,
        headers={
            **engine_headers(cutout),
            "X-Batch-Size": str(cutout.batch_size),
            "X-Processing-Ms": f"{cutout.processing_ms:.1f}",
            "Server-Timing": cutout.timing.header(),
            "X-Width": str(rendered.width),
            "X-Height": str(rendered.height),
        },
    )
