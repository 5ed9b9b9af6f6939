"""Stage-1 restoration: preprocessing writes a regression checkpoint's output on srgb_in (srgb_pre) and
its latent (z_pre); lacontrolnet trains on z_pre and `enhance` runs the same checkpoint on a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lowlight import checkpoint
from lowlight.ablations import load_ablations
from lowlight.cli import app
from lowlight.config import ConfigError, load_config
from lowlight.data.images import read_image
from lowlight.data.parquet import read_split
from lowlight.methods import EnhanceOptions, build_method
from lowlight.models import sd
from lowlight.pre_restore import PreRestorer, with_stage1
from lowlight.train import preflight
from tests.cli_helpers import assert_enhances_a_sample_png


def _stage1_checkpoint(directory: Path, overrides: list[str]) -> Path:
    """An sRGB regression checkpoint (seeded random weights: its output differs from its input, which is
    all the wiring needs)."""
    cfg = load_config("sample_srgb", ["method.name=regression", "method.backbone=nafnet-1", "model.vae=null",
                                      *overrides])
    method = build_method(cfg.method, 3, cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off its initialisation (an ending conv may start at zero: the identity)
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    checkpoint.save(directory, cfg, method, 3, {})
    return directory


def _stage1_parquet(out: Path, sample_root: Path, fitted_vae: Path, stage1: Path) -> Path:
    from lowlight.data.preprocess import preprocess

    preprocess(load_config("sample_srgb", [f"dataset.root={sample_root / 'lol'}", f"model.vae={fitted_vae}",
                                           f"preprocess.output={out}", "preprocess.crop_size=64",
                                           "preprocess.crops_per_image=1", f"preprocess.pre_restore={stage1}"]))
    return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    return _stage1_checkpoint(tmp_path_factory.mktemp("stage1") / "regression", [])


@pytest.fixture(scope="module")
def stage1_data(ray_local, sample_root, fitted_vae, stage1, tmp_path_factory) -> Path:
    return _stage1_parquet(tmp_path_factory.mktemp("stage1-data") / "srgb", sample_root, fitted_vae, stage1)


def test_parquet_holds_the_stage1_output_and_its_latent(stage1_data, stage1, fitted_vae):
    rows = read_split(str(stage1_data), "train", ["srgb_in", "srgb_pre", "z_pre"], limit=4)
    _, regression = checkpoint.load_method(stage1)
    with torch.no_grad():
        srgb_in = torch.from_numpy(rows["srgb_in"].astype(np.float32))
        expected = regression.backbone(srgb_in) + srgb_in  # the residual regression, computed here
    np.testing.assert_allclose(rows["srgb_pre"].astype(np.float32), expected.clamp(0, 1).numpy(), atol=2e-3)
    assert np.abs(rows["srgb_pre"].astype(np.float32) - rows["srgb_in"].astype(np.float32)).mean() > 1e-3
    vae = sd.load_vae(vae=str(fitted_vae))
    with torch.no_grad():
        latent = vae.encode(torch.from_numpy(rows["srgb_pre"].astype(np.float32)) * 2 - 1).latent_dist.mode()
    np.testing.assert_allclose(rows["z_pre"].astype(np.float32), (latent * vae.config.scaling_factor).numpy(),
                               atol=2e-2, rtol=1e-2)


def test_lacontrolnet_trains_on_z_pre_only_when_the_checkpoint_is_named(stage1_data, stage1, fitted_vae):
    sets = ["method.name=lacontrolnet", f"model.vae={fitted_vae}", f"train.data={stage1_data}"]
    info = preflight(load_config("sample_srgb", [*sets, f"preprocess.pre_restore={stage1}"]))
    assert {"z_pre", "srgb_pre"} <= set(info["columns"])
    with pytest.raises(ConfigError, match="preprocess.pre_restore is unset"):
        preflight(load_config("sample_srgb", sets))


def test_a_diffusion_checkpoint_is_not_a_stage1(tmp_path):
    cfg = load_config("sample_srgb", ["method.name=lacontrolnet", "model.vae=null"])
    checkpoint.save(tmp_path / "latent", cfg, build_method(cfg.method, 3, cfg.model), 3, {})
    with pytest.raises(ConfigError, match="preprocess.pre_restore.*non-diffusion sRGB method"):
        PreRestorer(str(tmp_path / "latent"))


def test_stage1_columns_without_a_checkpoint_are_refused():
    with pytest.raises(ConfigError, match="set preprocess.pre_restore"):
        load_config("sample_srgb", ["preprocess.columns=[srgb_in,z_pre]"])


def test_enhance_runs_the_named_stage1_and_starts_from_its_latent(stage1, tmp_path, sample_root, monkeypatch):
    cfg = load_config("sample_srgb", ["method.name=lacontrolnet", "model.vae=null", f"preprocess.pre_restore={stage1}",
                                      "method.options.steps=2"])
    method = build_method(cfg.method, 3, cfg.model)
    checkpoint.save(tmp_path / "latent", cfg, method, 3, {})
    png = min((sample_root / "lol").rglob("low/*.png"))
    image = read_image(str(png))[:64, :64]
    batch = {"srgb_in": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()}
    staged = with_stage1(batch, str(stage1), method.bundle.encode)
    # Partial diffusion at a small strength stays near where it starts: the stage-1 latent's decoding.
    near_start = method.predict(staged, EnhanceOptions(steps=20, strength=0.05))
    from_input = method.predict(batch, EnhanceOptions(steps=20, strength=0.05))
    decoded_pre = method.bundle.decode(staged["z_pre"])
    assert (near_start - decoded_pre).abs().mean() < (from_input - decoded_pre).abs().mean()

    restored = []
    real_call = PreRestorer.__call__
    monkeypatch.setattr(PreRestorer, "__call__", lambda self, x: restored.append(x.shape) or real_call(self, x))
    done = CliRunner().invoke(app, ["enhance", "--checkpoint", str(tmp_path / "latent"), "--input", str(png),
                                    "--output", str(tmp_path / "out.png")])
    assert done.exit_code == 0, done.output
    assert len(restored) == 1 and (tmp_path / "out.png").exists()


def test_condrefine_trains_through_ray_on_the_stage1_columns_and_enhances_a_file(
        stage1_data, stage1, fitted_vae, tmp_path, sample_root):
    """Condition refinement reads z_in, z_gt, z_pre, srgb_in, srgb_gt and srgb_pre: 2 steps on 2 Ray Train
    workers, then `enhance` runs the named stage 1 on a PNG before refining its latent."""
    from lowlight.train import train

    cfg = load_config("sample_srgb", [
        "method.name=condrefine", "method.options.steps=2", "method.options.simple=true", f"model.vae={fitted_vae}",
        f"train.data={stage1_data}", f"preprocess.pre_restore={stage1}", f"train.storage_path={tmp_path / 'runs'}",
        "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.val_every=2",
        "train.val_batches=1", "train.val_images=1"])
    ckpt = Path(train(cfg).checkpoint)
    assert {"controlnet.safetensors", "prior.safetensors", "predictor.safetensors", "interaction.safetensors",
            "visual_encoder.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert_enhances_a_sample_png(ckpt, sample_root, tmp_path / "refined.png")


@pytest.mark.parametrize("row", [name for name in load_ablations("condrefine") if name != "full"])
def test_each_condrefine_ablation_trains_a_step_through_ray_from_parquet(
        row, stage1_data, stage1, fitted_vae, sample_root, tmp_path):
    """Every Table 13 preset but the full model (the test above trains it), as the benchmark runs it: one
    step on one Ray Train worker from the stage-1 Parquet (a row with its own restoration network gets
    Parquet made by that network)."""
    from lowlight.train import train

    ablation = load_ablations("condrefine")[row]
    restorer, data = stage1, stage1_data
    if ablation.restorer:
        restorer = _stage1_checkpoint(tmp_path / "restorer", ablation.restorer)
        data = _stage1_parquet(tmp_path / "parquet", sample_root, fitted_vae, restorer)
    cfg = load_config("sample_srgb", [
        "method.name=condrefine", "method.options.steps=2", *ablation.diffusion, f"model.vae={fitted_vae}",
        f"train.data={data}", f"preprocess.pre_restore={restorer}", f"train.storage_path={tmp_path / 'runs'}",
        "train.steps=1", "train.batch_size=1", "train.num_workers=1", "train.checkpoint_every=1",
        "train.val_every=1", "train.val_batches=1", "train.val_images=0"])
    result = train(cfg)
    assert np.isfinite(result.metrics["loss"])
    saved = {p.name.removesuffix(".safetensors") for p in Path(result.checkpoint).glob("*.safetensors")
             if ".ema." not in p.name}
    _, method = checkpoint.load_method(result.checkpoint)
    assert saved == set(method.trainable_names)
