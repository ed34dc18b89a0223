"""The lines `make run` prints once the service is ready (serve_app.run.ready_lines),
from `/v1/health`-shaped answers: no server needed."""

from __future__ import annotations

from serve_app.run import ready_lines

BASE = "http://127.0.0.1:8000"
CUTOUT_ABOUT = "weights-free: made for product shots on plain or gradient backdrops, not for photos with busy backgrounds"
LAYERS_ABOUT = "weights-free: made for flat graphics (posters, logos, UI), not for photos"


def fallen(reason: str, about: str) -> dict:
    return {"engine": "classic", "fallback_reason": reason, "engine_about": about}


def test_a_service_with_no_fallback_prints_only_the_ready_line():
    health = {"models": {"birefnet": {"engine": "birefnet", "fallback_reason": None, "engine_about": None},
                         "classic": {"engine": "classic", "fallback_reason": None, "engine_about": CUTOUT_ABOUT}}}
    assert ready_lines(BASE, health) == [f"Strata is ready at {BASE} (models: birefnet, classic)"]


def test_each_fallback_is_named_then_what_its_engine_is_for_then_how_to_serve_the_real_models():
    health = {"models": {"birefnet": fallen("no weights here", CUTOUT_ABOUT),
                         "rmbg": fallen("briaai/RMBG-2.0 is gated", CUTOUT_ABOUT)},
              "layer_models": {"qwen-image-layered": fallen("no GPU", LAYERS_ABOUT)}}
    assert ready_lines(BASE, health)[1:] == [
        "  birefnet serves the classic engine instead: no weights here",
        "  rmbg serves the classic engine instead: briaai/RMBG-2.0 is gated",
        "  qwen-image-layered serves the classic engine instead: no GPU",
        f"  (birefnet, rmbg: the classic engine is {CUTOUT_ABOUT})",
        f"  (qwen-image-layered: the classic engine is {LAYERS_ABOUT})",
        "  (to serve the real models: scripts/fetch_models.py fetches their weights, HF_TOKEN for gated ones; "
        f"README, \"On a GPU box\", also at {BASE}/setup)",
    ]
