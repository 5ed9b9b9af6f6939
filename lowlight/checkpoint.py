"""The checkpoint format: a directory with config.yaml, one safetensors file per module,
optimizer.pt (resume only), metrics.json and method.json. Loading never unpickles objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from lowlight.config import Config, dump_config
from lowlight.methods import Method, build_method

TRAINING_STATE = "optimizer.pt"


def save(directory: Path, cfg: Config, method: Method, channels: int, metrics: dict,
         training_state: dict | None = None, ema: dict[str, torch.nn.Module] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(dump_config(cfg))
    (directory / "method.json").write_text(json.dumps({"name": cfg.method.name, "channels": channels}))
    for name, module in method.checkpoint_modules().items():
        save_model(module, str(directory / f"{name}.safetensors"))
    for name, module in (ema or {}).items():
        save_model(module, str(directory / f"{name}.ema.safetensors"))
    method.save_artifacts(directory)
    if training_state is not None:
        torch.save(training_state, directory / TRAINING_STATE)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))


def read_metrics(directory: Path) -> dict:
    """The metrics a checkpoint was saved with ({} when it has none)."""
    path = Path(directory) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_name(checkpoint: str) -> str:
    """The run a checkpoint path belongs to: ``runs/<name>/checkpoint_N`` or the run directory ``runs/<name>``."""
    path = Path(checkpoint.rstrip("/"))
    return path.parent.name if path.name.startswith("checkpoint_") else path.name


def load_weights(directory: Path, method: Method, ema: bool = False) -> None:
    suffix = ".ema.safetensors" if ema else ".safetensors"
    for name, module in method.checkpoint_modules().items():
        load_model(module, str(directory / f"{name}{suffix}"), strict=True)


def load_training_state(directory: Path) -> dict | None:
    path = directory / TRAINING_STATE
    return torch.load(path, weights_only=True) if path.exists() else None


def load_method(directory: str | Path, ema: bool = False) -> tuple[Config, Method]:
    """Rebuild a trained method from its checkpoint alone (the saved config, not caller flags)."""
    directory = Path(directory)
    cfg = Config.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    channels = json.loads((directory / "method.json").read_text())["channels"]
    method = build_method(cfg.method, channels, cfg.model)
    has_ema = any(directory.glob("*.ema.safetensors"))
    load_weights(directory, method, ema=ema and has_ema)
    method.load_artifacts(directory)
    return cfg, method.eval()


def initialise_from(directory: str, modules: dict[str, torch.nn.Module], endpoint_url: str | None = None
                    ) -> list[str]:
    """Load into ``modules`` (module path -> module) the weights an earlier stage's checkpoint holds for
    them (``<path>.safetensors``), after those of the checkpoint it was itself initialised from (a stage
    saves only what it trained, so a module frozen in it lives in an earlier one). Returns the names
    loaded, in order."""
    from lowlight.enhance import local_checkpoint  # enhance imports this module

    local = local_checkpoint(directory, endpoint_url)
    earlier = Config.model_validate(yaml.safe_load((local / "config.yaml").read_text())).model.init_from
    loaded = initialise_from(earlier, modules, endpoint_url) if earlier else []
    for path in sorted(local.glob("*.safetensors")):
        name = path.name.removesuffix(".safetensors")
        if name in modules:  # *.ema.safetensors and artifacts (initial noise) name no module
            load_model(modules[name], str(path), strict=True)
            loaded.append(name)
    return loaded

