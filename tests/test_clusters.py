"""clusters/: every file parses, and the facts that drift (entrypoints, configs, paths, versions) still hold."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from lowlight.config import load_config
from lowlight.raycluster import FORWARDED_ENV

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
YAML_FILES = sorted(CLUSTERS.rglob("*.yaml"))
IMAGE_PREFIX = "/home/ray/lowlight/"  # where clusters/Dockerfile puts the checkout


def load(path: str) -> dict:
    return yaml.safe_load((CLUSTERS / path).read_text())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_minor() -> str:
    """'2.60' from the ``ray[...]==2.60.*`` pin."""
    pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray["))
    return re.search(r"==(\d+\.\d+)", pin).group(1)


def check_stage_command(command: str) -> None:
    """``python workflows/<stage>.py --config X [--set k=v ...]``: the file exists, the config loads."""
    args = shlex.split(command.replace("\\\n", " "))
    script = next(a for a in args if a.endswith(".py"))
    script = script.removeprefix(IMAGE_PREFIX)
    assert script.startswith("workflows/") and (ROOT / script).is_file(), script
    rest = args[args.index(next(a for a in args if a.endswith(".py"))) + 1:]
    config, overrides = None, []
    while rest:
        flag, value, *rest = rest
        if flag in ("--config", "-c"):
            config = value
        elif flag in ("--set", "-s"):
            overrides.append(value)
        else:
            raise AssertionError(f"unexpected argument {flag!r} in {command!r}")
    assert config, f"no --config in {command!r}"
    if "/" in config:
        assert (ROOT / config).is_file(), config
    load_config(config, overrides)  # a preset name or file; misspelt --set keys raise here


def check_env_vars(env_vars: dict, where: str) -> None:
    assert all(isinstance(v, str) for v in env_vars.values()), f"{where}: Ray needs string env values"
    if set(env_vars) & set(FORWARDED_ENV):
        assert env_vars.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1", (
            f"{where} sets variables a local ensure_ray also passes in its runtime env; a driver that "
            "does so under the job is refused without RAY_OVERRIDE_JOB_RUNTIME_ENV=1")


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTERS)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_runtime_env_paths_exist() -> None:
    env = load("runtime_env.yaml")
    working_dir = ROOT / env["working_dir"]  # relative to the repo root, where `ray job submit` runs
    assert (working_dir / "lowlight" / "__init__.py").is_file()
    assert (working_dir / "workflows").is_dir()
    for module in env.get("py_modules", []):
        assert (ROOT / module).exists(), module
    for req in env.get("pip", []):
        if req.startswith((".", "/")) or req.endswith((".txt", ".whl")):
            assert (ROOT / req).exists(), req
    check_env_vars(env.get("env_vars", {}), "runtime_env.yaml")


def test_rayjob_entrypoints_name_real_workflows_and_configs() -> None:
    jobs = [d for p in YAML_FILES for d in yaml.safe_load_all(p.read_text()) if d.get("kind") == "RayJob"]
    assert jobs
    for job in jobs:
        check_stage_command(job["spec"]["entrypoint"])
        check_env_vars(yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}")).get("env_vars", {}),
                       job["metadata"]["name"])


def test_readme_commands_name_real_workflows_and_configs() -> None:
    text = (CLUSTERS / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"python workflows/\w+\.py[^\n`]*", text)
    assert len(commands) >= 3
    for command in commands:
        check_stage_command(command)
    for path in re.findall(r"--runtime-env (\S+)", text):
        assert (ROOT / path).is_file(), path


def test_kuberay_versions_images_and_gpus() -> None:
    cluster, job = load("kuberay/raycluster.yaml"), load("kuberay/rayjob-preprocess.yaml")
    specs = {"raycluster": cluster["spec"], "rayjob": job["spec"]["rayClusterSpec"]}
    images = set()
    for name, spec in specs.items():
        assert spec["rayVersion"].startswith(ray_minor() + "."), name
        images |= {c["image"] for g in groups(spec) for c in pod_containers(g)}
        gpu = [g for g in spec["workerGroupSpecs"] if any(
            "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in pod_containers(g))]
        assert gpu, f"{name}: no worker group asks for nvidia.com/gpu"
        assert all(g["minReplicas"] >= 1 for g in gpu), f"{name}: preprocess needs a GPU up at start"
    assert len(images) == 1, images
    vae_actors = int(re.search(r"preprocess\.vae_actors=(\d+)", job["spec"]["entrypoint"]).group(1))
    gpus = sum(g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
               if "nvidia.com/gpu" in pod_containers(g)[0]["resources"]["limits"])
    assert vae_actors <= gpus


def test_dockerfile_installs_the_project() -> None:
    text = (CLUSTERS / "Dockerfile").read_text()
    base = re.search(r"RAY_IMAGE=rayproject/ray:(\d+\.\d+)\.\d+-py(\d)(\d+)-gpu", text)
    assert base and base.group(1) == ray_minor()
    assert f"{base.group(2)}.{base.group(3)}" in pyproject()["project"]["requires-python"]
    assert re.search(r"^RUN pip install [^\n]*\.", text, re.MULTILINE), "the project is not pip-installed"
    assert re.search(r"^USER ray$", text, re.MULTILINE)
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for source in line.split():
            assert (ROOT / source).exists(), source
    assert "workflows" in text and "lowlight" in text


def test_aws_cluster_launcher_config() -> None:
    cfg = load("aws/cluster.yaml")
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    util.validate_config(util.prepare_config(yaml.safe_load((CLUSTERS / "aws/cluster.yaml").read_text())))
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_minor()}.")
    for remote, local in cfg["file_mounts"].items():
        assert (ROOT / local).exists(), local
        assert any("pip install" in c and remote in c for c in cfg["setup_commands"]), remote
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["node_config"]["InstanceType"] == "m5.2xlarge"
    gpu = nodes["ray.worker.gpu"]
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
