"""How a call to a model deployment carries its image: gRPC or Ray's object store.

Under Serve's fast request path (`serve_app.run.FAST_PATH_ENV`) deployments call each
other over gRPC: the quicker way up to a few megabytes, the slower beyond, where
HTTP/2's flow control paces the transfer. Measured by
`python scripts/bench.py --quick --bench transport` on the 2-core bench machine under
`serve_app.run.MEMORY_ENV` (median ms of one call, gRPC vs the object store):
786 kB 2.7 vs 5.7, 3 MB (a 1024x1024 model input) 6.3 vs 9.3, 6 MB 10.8 vs 12.8,
12 MB 25.9 vs 8.3, 48 MB 245 vs 43. So a call whose payload passes
`BY_REFERENCE_ABOVE_BYTES` goes through the object store, as Serve's default path
sends everything: a large image's model input, a layer job's input and layers.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

BY_REFERENCE_ABOVE_BYTES = 8 << 20


def for_payload(handle: DeploymentHandle, nbytes: int) -> DeploymentHandle:
    """`handle`, sending by reference (through Ray's object store) when `nbytes` is large."""
    return handle.options(_by_reference=True) if nbytes > BY_REFERENCE_ABOVE_BYTES else handle
