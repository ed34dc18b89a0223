"""The OpenAPI document the ingress serves at /openapi.json, and the pieces
several route modules declare in it.

Ray Serve runs a pickled copy of the FastAPI app in each ingress replica. In
that copy FastAPI no longer recognises its own "unset" marker on parameters,
so its document would carry `"example": {}` on every parameter, and the
interactive docs at /docs would fill every field with `{}`. This builds
FastAPI's document and drops those.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import FastAPI

_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app` (built once, then kept), without the copied app's empty examples."""
    document = FastAPI.openapi(app)
    for path in document.get("paths", {}).values():
        for method, operation in path.items():
            if method not in _HTTP_METHODS:
                continue
            for parameter in operation.get("parameters", []):
                # No parameter declares an example; {} is only the lost marker.
                if parameter.get("example") == {}:
                    del parameter["example"]
    return document


def install_openapi(app: FastAPI) -> None:
    """Make `app` serve :func:`openapi_document` (it survives pickling: a partial of a module function)."""
    app.openapi = partial(openapi_document, app)


# A multipart upload with one `image` file field. The routes read it themselves,
# streaming and size-limited (serve_app/uploads.py), so FastAPI cannot infer it.
# Optional: a request that names its image with `image_url` sends no body.
IMAGE_BODY = {
    "requestBody": {
        "required": False,
        "description": "The image as the file field `image`; omit the body when `image_url` names the image.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary",
                                             "description": "JPEG, PNG, WebP, BMP or TIFF"}},
                }
            }
        },
    }
}
