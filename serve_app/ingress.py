"""The ingress deployment: the FastAPI app every HTTP request enters.

It owns HTTP and the CPU-side image work (decode, resize, composite, encode), so
model replicas receive model-sized uint8 arrays. It never imports torch. The
routes live in `serve_app/routes/` by family; the work they share lives in
`serve_app/service.py`, one `StrataService` per replica.
"""

from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from serve_app import access
from serve_app.config import AppConfig
from serve_app.openapi import install_openapi
from serve_app.problems import install_problem_handlers
from serve_app.routes import (
    background,
    detail_errors,
    health,
    jobs,
    layer_saas_compat,
    rembg_compat,
    removebg_compat,
    session,
    web,
)
from serve_app.service import StrataService, current_service

# The compatible APIs refuse access (401, 429) in their own error shapes:
# remove.bg's under /v1.0/, FastAPI's {"detail"} for rembg's and image-layer-saas's /api/.
COMPAT_REFUSALS = {"/v1.0/": removebg_compat.refusal, "/api/": detail_errors.refusal}


def _replica_access() -> access.AccessControl | None:
    """This replica's access control; None outside a replica (the document built offline)."""
    try:
        return current_service().access
    except RayServeException:
        return None


app = FastAPI(
    title="Strata",
    version="1",
    summary="Background removal and layer decomposition, self-hosted on Ray Serve.",
)
install_problem_handlers(app)
install_openapi(app)
# Strata's own API, then the other projects' APIs answered on the same service.
for family in (health, session, background, jobs, rembg_compat, removebg_compat, layer_saas_compat, web):
    app.include_router(family.router)
app.mount("/static", web.static_files(), name="static")
# Around every route and mount, routes added later included: keys and rate limits
# (serve_app/access.py), and outermost CORS, so preflights and 401/429 answers
# carry its headers too.
app.add_middleware(access.AccessMiddleware, access=lambda: current_service().access, refusals=COMPAT_REFUSALS)
app.add_middleware(access.ConfiguredCORSMiddleware, cors=lambda: current_service().config.cors)
access.declare_in_openapi(app, access=_replica_access)


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(app)
class Ingress:
    """HTTP front of Strata: one instance per ingress replica."""

    async def __init__(self, config: AppConfig, segmenters: dict[str, DeploymentHandle],
                       decomposers: dict[str, DeploymentHandle]):
        self.service = await StrataService.create(config, segmenters, decomposers)
