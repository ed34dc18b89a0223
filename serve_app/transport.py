"""How a call to a model deployment carries its image: gRPC or Ray's object store.

Under Serve's fast request path (`serve_app.run.FAST_PATH_ENV`) deployments call each
other over gRPC: the quicker way for small payloads and the slower for large ones,
whose transfer HTTP/2's flow control paces. Measured by
`python scripts/bench.py --bench transport` on the 2-core bench machine (median ms of
one call, gRPC vs the object store): 262 kB 2.6 vs 8.0, 786 kB 7.4 vs 5.5, 1.5 MB
14.8 vs 7.7, 3 MB (a 1024x1024 model input) 25.8 vs 9.1. A 512x512 photo's model
input (786 kB) still went faster over gRPC in the whole request (serving overhead
15.5-22.7 ms in three bench runs; 22.8 and 26.4 ms in two runs with it by reference:
docs/PERFORMANCE.md), so the line is drawn above it: a call whose payload passes
`BY_REFERENCE_ABOVE_BYTES` goes through the object store, as Serve's default path
sends everything.
"""

from __future__ import annotations

from ray.serve.handle import DeploymentHandle

BY_REFERENCE_ABOVE_BYTES = 1 << 20


def for_payload(handle: DeploymentHandle, nbytes: int) -> DeploymentHandle:
    """`handle`, sending by reference (through Ray's object store) when `nbytes` is large."""
    return handle.options(_by_reference=True) if nbytes > BY_REFERENCE_ABOVE_BYTES else handle
