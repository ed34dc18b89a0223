"""The web page: `frontend/` served at `/` and `/static`."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

# The repository root is the parent of serve_app/.
FRONTEND_DIR = Path(__file__).resolve().parent.parent.parent / "frontend"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def web_ui() -> FileResponse:
    return FileResponse(FRONTEND_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's CSS, JavaScript and icons, for mounting at /static."""
    return StaticFiles(directory=FRONTEND_DIR, check_dir=False)
