"""The SD conditioning baselines: each learns on a repeated batch, trains through the Ray Train loop
from Parquet latents with the tiny bundle, enhances PNG and DNG files from its checkpoint (also
tiled), and the boundary-condition search finds a noise at least as good as the default seed's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowlight import checkpoint
from lowlight.cli import app
from lowlight.config import ConfigError, MethodConfig, ModelConfig, load_config
from lowlight.data.images import read_image
from lowlight.data.parquet import read_split
from lowlight.enhance import PAD, pad_images
from lowlight.methods import EnhanceOptions, build_method
from lowlight.methods.latent import INITIAL_NOISE_FILE
from lowlight.noise_search import search_checkpoint_noise
from lowlight.sampling import tile_regions, tiled_denoiser
from lowlight.train import train

BASELINES = {"sd_concat": "unet", "sd_controlnet": "controlnet", "lacontrolnet": "controlnet"}
COLUMNS = ["z_in", "z_gt", "srgb_in", "srgb_gt"]


@pytest.fixture(scope="module")
def trained(srgb_data, fitted_vae, tmp_path_factory) -> dict[str, Path]:
    """Each baseline trained 4 steps on 2 Ray Train workers."""
    runs = tmp_path_factory.mktemp("sd-runs")
    out = {}
    for name in BASELINES:
        cfg = load_config("sample_srgb", [
            f"method.name={name}", f"model.vae={fitted_vae}", f"train.data={srgb_data}", f"train.storage_path={runs}",
            f"train.name={name}", "train.steps=4", "train.batch_size=2", "train.checkpoint_every=4",
            "train.val_every=4", "train.val_batches=1", "train.val_images=2", "method.options.steps=4"])
        out[name] = Path(train(cfg).checkpoint)
    return out


def _rows(srgb_data: Path, split: str, n: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in read_split(str(srgb_data), split, COLUMNS, limit=n).items()}


@pytest.mark.parametrize("name", list(BASELINES))
def test_loss_goes_down_on_a_repeated_batch(srgb_data, fitted_vae, name):
    torch.manual_seed(0)
    method = build_method(MethodConfig(name=name, domain="srgb"), 3, ModelConfig(vae=str(fitted_vae)))
    batch = _rows(srgb_data, "train", 4)
    params = list(method.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(50):
        loss, _ = method(batch, torch.Generator().manual_seed(0))  # same noise and t every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vae.") for n in frozen)
    assert (BASELINES[name] == "unet") != any(n.startswith("unet.") for n in frozen)


@pytest.mark.parametrize("name", list(BASELINES))
def test_trains_through_ray_and_checkpoint_round_trips(trained, name):
    ckpt = trained[name]
    module_file = f"{BASELINES[name]}.safetensors"
    assert {"config.yaml", "metrics.json", "samples.png", module_file} <= {p.name for p in ckpt.iterdir()}
    _, method = checkpoint.load_method(ckpt)
    saved = load_file(str(ckpt / module_file))
    for key, tensor in getattr(method, BASELINES[name]).state_dict().items():
        assert torch.equal(tensor, saved[key]), key


def test_unknown_trainable_module_is_refused():
    with pytest.raises(ConfigError, match="method.options.trainable"):
        build_method(MethodConfig(name="lacontrolnet", domain="srgb", options={"trainable": ["text_encoder"]}), 3)


@pytest.mark.parametrize(("tile", "overlap", "grid", "bound"), [(16, 8, 2, 0.3), (12, 6, 3, 0.45)])
def test_tiled_denoising_stays_close_to_untiled(trained, srgb_data, tile, overlap, grid, bound):
    """On a 24 x 24 latent that also fits whole: 2 x 2 and 3 x 3 overlapping tiles, each with its crop of
    the condition, against one call on everything. The tiny UNet's self-attention spans whatever it is
    given, so tiles cannot match exactly; measured when written: RMS error 0.22 (2 x 2) and 0.36 (3 x 3)
    of the output's spread, against 0.52 for abutting tiles without the blend."""
    _, method = checkpoint.load_method(trained["lacontrolnet"])
    z = _rows(srgb_data, "test", 1)["z_in"].repeat(1, 1, 3, 3)
    height, width = z.shape[-2:]
    assert len(tile_regions(height, width, tile, overlap)) == grid * grid
    for_region = method.denoiser_for(method.hint({"z_in": z}))
    x_t, t = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        whole = for_region((0, 0, height, width))(x_t, t, True)
        error = lambda tiles, shared: float(
            (tiled_denoiser(for_region, (height, width), tiles, shared)(x_t, t, True) - whole).pow(2).mean().sqrt())
        blended, abutting = error(tile, overlap), error(12, 0)
    assert blended < bound * float(whole.std()), (blended, float(whole.std()))
    assert blended < 0.8 * abutting, (blended, abutting)
    small_tiles = method.predict(_rows(srgb_data, "test", 1), EnhanceOptions(steps=3, tile=4))
    assert torch.isfinite(small_tiles).all()


def test_guidance_changes_what_a_model_trained_with_dropout_returns(trained, srgb_data):
    _, method = checkpoint.load_method(trained["sd_concat"])  # InstructPix2Pix's 5 % condition dropout
    batch = _rows(srgb_data, "test", 1)
    plain = method.predict(batch, EnhanceOptions(steps=3, guidance_scale=1.0))
    guided = method.predict(batch, EnhanceOptions(steps=3, guidance_scale=4.0))
    assert float((guided - plain).abs().mean()) > 1e-4


@pytest.mark.parametrize("name", list(BASELINES))
def test_enhance_cli_on_png_and_dng(trained, sample_root, tmp_path, name):
    png = min((sample_root / "lol").rglob("low/*.png"))
    dng = min((sample_root / "raw").rglob("*.dng"))
    runner = CliRunner()
    for source in (png, dng):
        out = tmp_path / f"{source.stem}-{name}.png"
        result = runner.invoke(app, ["enhance", "--checkpoint", str(trained[name]), "--input", str(source),
                                     "--output", str(out), "--steps", "3", "--ratio", "100"])
        assert result.exit_code == 0, result.output
        image = read_image(str(out))
        assert image.ndim == 3 and image.shape[2] == 3
    # The PNG's file is what the method returns on the padded image, cropped back and stored in 8 bits.
    _, method = checkpoint.load_method(trained[name])
    source = read_image(str(png))
    batch = {"srgb_in": torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1)))[None]}
    expected = method.enhance(pad_images(batch, PAD), EnhanceOptions(steps=3))[0, :, :source.shape[0], :source.shape[1]]
    written = read_image(str(tmp_path / f"{png.stem}-{name}.png"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written, expected.permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-4)


def test_enhance_cli_names_a_bad_file(trained, tmp_path):
    bad = tmp_path / "broken.dng"
    bad.write_bytes(b"not a raw file")
    result = CliRunner().invoke(app, ["enhance", "--checkpoint", str(trained["sd_concat"]), "--input", str(bad),
                                      "--output", str(tmp_path / "out.png")])
    assert result.exit_code == 2
    assert "broken.dng" in result.output
    assert not (tmp_path / "out.png").exists()


def test_noise_search_keeps_a_noise_only_when_it_helps_held_out_rows(trained, tmp_path):
    ckpt = trained["sd_concat"]
    none = search_checkpoint_noise(str(ckpt), candidates=1, reference=4, val=4, steps=3)  # only the default
    assert none.val_gain == 0 and not none.saved and not (ckpt / INITIAL_NOISE_FILE).exists()
    report = search_checkpoint_noise(str(ckpt), candidates=4, reference=4, val=8, steps=3)
    assert report.reference_default == report.scores[0] and len(report.scores) == 4
    assert np.isfinite([report.val_large_tiled, report.val_large_fresh]).all()
    assert report.saved == (report.val_gain > 0) == (ckpt / INITIAL_NOISE_FILE).exists()
    _, method = checkpoint.load_method(ckpt)
    assert (method.initial_noise is not None) == report.saved
    (ckpt / INITIAL_NOISE_FILE).unlink(missing_ok=True)
