"""The ingress owns HTTP and CPU image work; it never imports a model framework."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_building_the_app_imports_no_torch_transformers_or_diffusers():
    code = ("import sys, serve_app.app, serve_app.ingress; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
