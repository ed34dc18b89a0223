"""OpenAPI pieces several route modules declare."""

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
