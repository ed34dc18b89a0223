"""Every replica a config can start fits the box it is written for, all at once.

A config whose replicas at their max ask more than the box has leaves some pending:
a model's upscale then takes the CPU a restarting ingress needs (the ingress stays
down until the model scales back), or a layer model waits for a GPU share that the
segmentation replicas hold. What each replica asks comes from the config's own
parsing (serve_app.config.AppConfig), so the defaults count as Serve will apply them.
"""

from __future__ import annotations

import pytest

from serve_app.config import AppConfig
from tests.conftest import load_config

# config -> the box it claims to fit (configs/local.yaml: one machine, 2 cores, one GPU;
# configs/test.yaml and bench.yaml: the test session's Ray, tests/conftest.py's num_cpus=8).
BOXES = {
    "local": {"CPU": 2.0, "GPU": 1.0},
    "test": {"CPU": 8.0, "GPU": 0.0},
    "bench": {"CPU": 8.0, "GPU": 0.0},
}


def most_replicas(deployment: dict) -> int:
    """The most replicas Serve may run of one deployment entry."""
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("max_replicas", 1))
    return int(deployment.get("num_replicas", 1))


def asked_at_most(config: dict) -> dict[str, float]:
    """CPU and GPU the config's replicas ask for at their max replica counts."""
    total = {"CPU": 0.0, "GPU": 0.0}
    for app in config["applications"]:
        args = AppConfig.model_validate(app["args"])
        per_replica = {"Ingress": (args.ingress_num_cpus, 0.0)}
        per_replica.update({name: (m.num_cpus, m.num_gpus) for name, m in args.segmentation.items()})
        per_replica.update({f"layers-{name}": (m.num_cpus, m.num_gpus) for name, m in args.layered.items()})
        listed = {d["name"]: d for d in app.get("deployments") or []}
        for name, (cpus, gpus) in per_replica.items():
            replicas = most_replicas(listed.get(name, {}))
            total["CPU"] += cpus * replicas
            total["GPU"] += gpus * replicas
    return total


@pytest.mark.parametrize("name", sorted(BOXES))
def test_every_replica_at_its_max_fits_the_box_the_config_is_for(name):
    asked = asked_at_most(load_config(f"{name}.yaml"))
    box = BOXES[name]
    assert asked["CPU"] <= box["CPU"] + 1e-9, f"{name}.yaml asks {asked['CPU']:.2f} CPUs of {box['CPU']}"
    assert asked["GPU"] <= box["GPU"] + 1e-9, f"{name}.yaml asks {asked['GPU']:.3f} GPUs of {box['GPU']}"


def test_the_sum_counts_what_a_config_asks(tmp_path):
    # The check above can fail: the local config with its birefnet allowed 8 replicas
    # of 0.25 GPU asks for more than one GPU.
    config = load_config("local.yaml")
    (app,) = config["applications"]
    app["args"]["segmentation"]["birefnet"]["num_gpus"] = 0.25
    next(d for d in app["deployments"] if d["name"] == "birefnet")["autoscaling_config"]["max_replicas"] = 8
    assert asked_at_most(config)["GPU"] > BOXES["local"]["GPU"]

