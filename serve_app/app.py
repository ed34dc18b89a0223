"""Application assembly: what the Serve config files' `import_path` names."""

from __future__ import annotations

from typing import Any

import ray
from ray.serve import Application

from deployments.decomposition import LayerDecompositionDeployment, layer_deployment_name
from deployments.segmentation import SegmentationDeployment, SegmentationModelConfig
from serve_app.config import AppConfig
from serve_app.ingress import Ingress
from serve_app.run import CPU_MODEL_MEMORY_ENV


def _cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _actor_options(num_cpus: float, num_gpus: float, resources: dict[str, float],
                   has_gpus: bool) -> dict[str, Any]:
    # A GPU share on a GPU-less cluster would never schedule: the same config
    # then serves on CPU. Custom resources are kept: they pin replicas to the
    # nodes that offer them.
    return {"num_cpus": num_cpus, "num_gpus": num_gpus if has_gpus else 0, "resources": dict(resources)}


def _segmentation_actor_options(model: SegmentationModelConfig, has_gpus: bool) -> dict[str, Any]:
    options = _actor_options(model.num_cpus, model.num_gpus, model.resources, has_gpus)
    if not options["num_gpus"]:
        # Its engine runs on CPU: spare each call the kernel's fresh pages (glibc reads
        # these when the replica's process starts, hence a runtime_env).
        options["runtime_env"] = {"env_vars": dict(CPU_MODEL_MEMORY_ENV)}
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The ingress bound to one deployment per configured model."""
    config = AppConfig.model_validate(args)
    has_gpus = _cluster_has_gpus()
    segmenters = {
        name: SegmentationDeployment.options(
            name=name, ray_actor_options=_segmentation_actor_options(model, has_gpus),
        ).bind(name, model)
        for name, model in config.segmentation.items()
    }
    decomposers = {
        name: LayerDecompositionDeployment.options(
            name=layer_deployment_name(name),
            ray_actor_options=_actor_options(model.num_cpus, model.num_gpus, model.resources, has_gpus),
        ).bind(name, model)
        for name, model in config.layered.items()
    }
    ingress = Ingress.options(ray_actor_options={"num_cpus": config.ingress_num_cpus,
                                                 "resources": dict(config.ingress_resources)})
    return ingress.bind(config, segmenters, decomposers)
