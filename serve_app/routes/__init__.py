"""HTTP routes by family: Strata's own API and the web page.

Each module is an `APIRouter` the ingress includes; routes reach the replica's
`StrataService` through `serve_app.service.current_service`.
"""
