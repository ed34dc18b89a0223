"""The ingress owns HTTP and CPU image work; it never imports a model framework,
and no request waits for a thread before its handler runs."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

from fastapi import APIRouter
from fastapi.routing import APIRoute

from tests.conftest import ROOT


def test_building_the_app_imports_no_torch_transformers_or_diffusers():
    code = ("import sys, serve_app.app, serve_app.ingress; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_route_dependency_is_called_through_the_thread_pool():
    # FastAPI calls a dependency that is not a coroutine function through its thread
    # pool: a thread hop before the handler of every request that uses it.
    import serve_app.routes

    def dependencies(dependant):
        for sub in dependant.dependencies:
            yield sub.call
            yield from dependencies(sub)

    families = [importlib.import_module(f"serve_app.routes.{module.name}")
                for module in pkgutil.iter_modules(serve_app.routes.__path__)]
    routes = [route for family in families for route in getattr(family, "router", APIRouter()).routes
              if isinstance(route, APIRoute)]
    calls = {call for route in routes for call in dependencies(route.dependant)}
    assert len(routes) > 20 and calls, "no routes or no dependencies found: this test would check nothing"
    assert [call for call in calls if not inspect.iscoroutinefunction(call)] == []
