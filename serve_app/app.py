"""Application assembly: what the Serve config files' `import_path` names."""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from deployments.decomposition import LayerDecompositionDeployment, layer_deployment_name
from deployments.segmentation import SegmentationDeployment
from serve_app.config import AppConfig
from serve_app.ingress import Ingress


def _cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict[str, Any]) -> Application:
    """The ingress bound to one deployment per configured model."""
    config = AppConfig.model_validate(args)
    has_gpus = _cluster_has_gpus()
    segmenters = {
        name: SegmentationDeployment.options(
            name=name,
            # A GPU share on a GPU-less cluster would never schedule: the same
            # config then serves on CPU.
            ray_actor_options={"num_gpus": model.num_gpus if has_gpus else 0},
        ).bind(name, model)
        for name, model in config.segmentation.items()
    }
    decomposers = {
        name: LayerDecompositionDeployment.options(
            name=layer_deployment_name(name), ray_actor_options={"num_gpus": model.num_gpus if has_gpus else 0},
        ).bind(name, model)
        for name, model in config.layered.items()
    }
    return Ingress.bind(config, segmenters, decomposers)
