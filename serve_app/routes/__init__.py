"""HTTP routes by family: Strata's own API, the web page, and other projects'
APIs answered on top of the same service (`*_compat` modules: rembg's server,
remove.bg API v1.0, image-layer-saas; see docs/COMPATIBILITY.md).

Each module is an `APIRouter` the ingress includes; routes reach the replica's
`StrataService` through the dependency `serve_app.service.CurrentService`.
"""
