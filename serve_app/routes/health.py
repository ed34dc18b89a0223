"""Liveness (`/healthz`) and the models' state (`/v1/health`)."""

from fastapi import APIRouter

from serve_app.schemas import Health
from serve_app.service import CurrentService

router = APIRouter()


@router.get("/healthz", summary="Liveness: the ingress answers (no model calls)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/health", summary="Each model's engine, device and replicas", response_model=Health)
async def health(service: CurrentService) -> Health:
    return await service.health()
