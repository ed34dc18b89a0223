"""OpenAPI pieces several route modules declare."""

# A multipart upload with one `image` file field. The routes read it themselves,
# streaming and size-limited (serve_app/uploads.py), so FastAPI cannot infer it.
IMAGE_BODY = {
    "requestBody": {
        "required": True,
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
