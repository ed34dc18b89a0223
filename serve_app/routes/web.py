"""The web page: `frontend/` served at `/` and `/static`; `/setup`, the README's
section on serving the real models, which the page links to beside a fallback's result."""

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from serve_app.problems import ProblemError

# The repository root is the parent of serve_app/ (the Dockerfile copies README.md there too).
ROOT = Path(__file__).resolve().parent.parent.parent
FRONTEND_DIR = ROOT / "frontend"
README = ROOT / "README.md"
SETUP_HEADING = "## On a GPU box"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def web_ui() -> FileResponse:
    return FileResponse(FRONTEND_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's CSS, JavaScript and icons, for mounting at /static."""
    return StaticFiles(directory=FRONTEND_DIR, check_dir=False)


@router.get("/setup", include_in_schema=False)
async def setup() -> PlainTextResponse:
    """The README's "On a GPU box" section as plain text: how to serve the real models.

    Served from the README itself, so the page's link and the README never disagree.
    """
    section = readme_section(README, SETUP_HEADING)
    if section is None:
        raise ProblemError(404, "Not found", f"{README} has no section {SETUP_HEADING!r}", slug="not-found")
    return PlainTextResponse(section, headers={"Cache-Control": "no-cache"})


def readme_section(path: Path, heading: str) -> str | None:
    """The Markdown section of `path` under `heading` (up to the next heading of its
    level or above, outside code blocks), or None when the file or the heading is missing."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    if heading not in lines:
        return None
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end, fenced = len(lines), False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced  # a shell comment in a code block is no heading
        elif not fenced and (match := re.match(r"(#+) ", lines[i])) and len(match.group(1)) <= level:
            end = i
            break
    return "\n".join(lines[start:end]).rstrip() + "\n"
