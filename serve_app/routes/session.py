"""The web page's sign-in: `/v1/session` puts an API key in a cookie and takes it out.

A browser sends no header of the page's on what it fetches by itself (the job's
event stream, layer images, download links); the cookie carries the key there.
Scripts and other clients send the key with each request instead and need none of
this (serve_app/access.py has the rules for both, the cookie's name included).
"""

from fastapi import APIRouter, Request, Response

from serve_app.access import presented_key, request_owner, set_key_cookie
from serve_app.schemas import Session
from serve_app.service import CurrentService

router = APIRouter()


@router.get("/v1/session", summary="Whether keys are required, and the caller's key id",
            response_model=Session)
async def session(request: Request, service: CurrentService) -> Session:
    return Session(keys_required=service.access.keys_required, key_id=await request_owner(request))


@router.post("/v1/session", summary="Sign the web page in: keep the request's key in a cookie",
             response_model=Session)
async def sign_in(request: Request, response: Response, service: CurrentService) -> Session:
    # The access middleware has checked the key already: a request here carries a valid
    # one, or keys are off (then there is nothing to keep).
    if service.access.keys_required:
        set_key_cookie(response, request.scope, presented_key(request.scope))
    return await session(request, service)


@router.delete("/v1/session", summary="Sign the web page out: remove the key's cookie (no key needed)",
               status_code=204)
async def sign_out(request: Request) -> Response:
    # Open (serve_app/access.py): a revoked or rate-limited key must still be forgettable.
    response = Response(status_code=204)
    set_key_cookie(response, request.scope, None)
    return response
