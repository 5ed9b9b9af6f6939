"""DarkDiff: region attention against attention computed region by region and against diffusers' global
cross-attention; the residual VAE against the plain one and tiled against untiled; the Gaussian null
condition; the learning-rate groups; both stages through the Ray Train loop from Parquet (the second on
latents its own stage-1 VAE made); a DNG enhanced from the checkpoint; the ablation rows as configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file
from typer.testing import CliRunner

from lowlight import checkpoint
from lowlight.ablations import load_ablations
from lowlight.cli import app
from lowlight.config import ConfigError, MethodConfig, ModelConfig, TrainConfig, load_config
from lowlight.data.images import read_image
from lowlight.data.parquet import read_split
from lowlight.data.preprocess import preprocess
from lowlight.data.raw import linear_rgb, read_raw
from lowlight.methods import build_method
from lowlight.models import isp
from lowlight.models.region_attention import RegionCrossAttention, region_cross_attention
from lowlight.models.residual_vae import ResidualVAE
from lowlight.models.sd import load_vae
from lowlight.models.vae_tiling import decode_sample
from lowlight.optim import build_optimizer
from lowlight.train import train

TINY = ModelConfig(pretrained="tiny")


def _darkdiff(**options) -> torch.nn.Module:
    return build_method(MethodConfig(name="darkdiff", domain="raw", options=options), 4, TINY)


def _attention_by_hand(q, k, v, rows, cols, heads, scale):
    """Attention inside one region, from the formula (Eq. 5-7), tokens given by their (row, col) ranges."""
    b, _, d = q.shape
    height, width = rows[-1][1], cols[-1][1]
    out = torch.zeros_like(q)
    for top, bottom in rows:
        for left, right in cols:
            idx = torch.tensor([y * width + x for y in range(top, bottom) for x in range(left, right)])
            qh, kh, vh = (t[:, idx].view(b, len(idx), heads, d // heads).transpose(1, 2) for t in (q, k, v))
            weights = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
            out[:, idx] = (weights @ vh).transpose(1, 2).reshape(b, len(idx), d)
    assert height * width == q.shape[1]
    return out


@pytest.mark.parametrize("height,width,grid,rows,cols", [
    (6, 8, 2, [(0, 3), (3, 6)], [(0, 4), (4, 8)]),
    (7, 5, 3, [(0, 2), (2, 5), (5, 7)], [(0, 2), (2, 3), (3, 5)]),  # round(i * side / g) boundaries
])
def test_region_attention_is_independent_attention_per_region(height, width, grid, rows, cols):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, height * width, 16) for _ in range(3))
    got = region_cross_attention(q, k, v, (height, width), grid, heads=2, scale=0.25)
    expected = _attention_by_hand(q, k, v, rows, cols, heads=2, scale=0.25)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # And it is not global attention (the regions matter).
    everything = _attention_by_hand(q, k, v, [(0, height)], [(0, width)], heads=2, scale=0.25)
    assert (got - everything).abs().max() > 1e-2


def test_one_region_is_diffusers_global_cross_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=16, heads=2, dim_head=8)
    layer = RegionCrossAttention(attn, context_channels=16, grid=1)
    layer.to_k.weight.data.copy_(attn.to_k.weight)
    layer.to_v.weight.data.copy_(attn.to_v.weight)
    hidden, context = torch.randn(2, 5 * 6, 16), torch.randn(2, 16, 5, 6)
    tokens = context.flatten(2).transpose(1, 2)
    expected = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=tokens)
    torch.testing.assert_close(layer(attn, hidden, context), expected, atol=1e-5, rtol=1e-5)


def test_zero_residual_convolutions_give_the_plain_vae_exactly(fitted_vae):
    vae = load_vae(vae=str(fitted_vae))
    residual = ResidualVAE(vae)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior, features = residual.encode(x)
        plain = vae.encode(x).latent_dist
        assert torch.equal(posterior.mean, plain.mean)
        z = posterior.mean
        assert torch.equal(residual.decode(z, features), vae.decode(z).sample)
        # The hooks do act: non-zero convolutions change the decode.
        for conv in residual.convs:
            conv.weight.normal_(0, 0.02)
        assert (residual.decode(z, features) - vae.decode(z).sample).abs().mean() > 1e-3
    # Table A1's shapes on SD's VAE widths: encoder block b -> decoder block at its resolution.
    assert [(c.in_channels, c.out_channels) for c in residual.convs] == [(16, 32), (32, 32), (32, 32), (32, 32)]


def test_tiled_residual_decoding_agrees_with_untiled(fitted_vae, sample_root):
    """On a 128 px photo whose whole-image GroupNorm statistics fit one pass, 3x3 tiles of 64 px: the residual
    decode's tiling error is no larger than the plain VAE's own tiling error (measured 0.033 vs 0.045 mean abs
    on [-1, 1]) and small beside what the encoder features contribute (0.44)."""
    vae = load_vae(vae=str(fitted_vae))
    residual = ResidualVAE(vae, stats_size=None)
    torch.manual_seed(0)
    with torch.no_grad():
        for conv in residual.convs:
            conv.weight.normal_(0, 0.05)
        image = read_image(str(min((sample_root / "lol").rglob("high/*.png"))))[:128, :128]
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None] * 2 - 1
        posterior, features = residual.encode(x)
        z = posterior.mean
        untiled, without = residual.decode(z, features), residual.decode(z, None)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8  # a 16x16 latent -> 3x3 tiles of 8
        tiled = residual.decode(z, features)
        plain_tiled = decode_sample(vae, z, None)
    assert tiled.shape == untiled.shape
    error = (tiled - untiled).abs().mean()
    plain_error = (plain_tiled - without).abs().mean()
    effect = (untiled - without).abs().mean()
    assert error < 1.2 * plain_error and error < 0.1 * effect, (float(error), float(plain_error), float(effect))


def test_null_condition_is_gaussian_noise_at_the_configured_rate():
    method = _darkdiff(cond_dropout=0.05)
    n = 4000
    hint = torch.full((n, 4, 2, 2), 3.0)
    dropped_hint, keep = method.drop_condition(hint, torch.Generator().manual_seed(0))
    rate = 1 - keep.float().mean().item()
    assert abs(rate - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n), rate
    assert torch.equal(dropped_hint[keep], hint[keep])
    noise = dropped_hint[~keep]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1  # N(0, 1), not zeros
    # At inference the unconditional branch gets one fixed Gaussian draw.
    a, b = method.null_hint(hint[:2]), method.null_hint(hint[:2])
    assert torch.equal(a, b) and abs(a.std().item() - 1) < 0.5 and not torch.equal(a, torch.zeros_like(a))


def test_learning_rate_groups_are_as_configured():
    method = _darkdiff()
    optimizer = build_optimizer(method, TrainConfig(lr=5e-5))
    fast = {id(p) for name in ("context", "region_attention") for p in getattr(method, name).parameters()}
    unet = {id(p) for p in method.unet.parameters() if p.requires_grad}
    (rest, conditioning) = optimizer.param_groups
    assert rest["lr"] == 5e-5 and {id(p) for p in rest["params"]} == unet
    assert conditioning["lr"] == pytest.approx(2.5e-4) and {id(p) for p in conditioning["params"]} == fast
    assert {id(p) for p in method.trainable_parameters()} == unet | fast
    stage1 = _darkdiff(stage="vae")
    (group,) = build_optimizer(stage1, TrainConfig(lr=4e-5)).param_groups
    assert group["lr"] == 4e-5 and group["betas"] == (0.5, 0.9)
    assert {id(p) for p in group["params"]} == ({id(p) for p in stage1.vae.parameters()}
                                                | {id(p) for p in stage1.residual.parameters()})


def test_torch_linear_rgb_matches_the_preprocessing():
    rng = np.random.default_rng(0)
    packed, wb = rng.random((4, 6, 8)).astype(np.float32) * 0.02, np.array([2.1, 1.0, 1.6], np.float32)
    expected = linear_rgb(packed, wb, 60.0)
    got = isp.linear_rgb(torch.from_numpy(packed)[None], torch.from_numpy(wb)[None], torch.tensor([60.0]))
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)


def test_raw_input_vae_sees_equal_greens_as_its_rgb_twin():
    rgb = _darkdiff(stage="vae", residual_vae=False)
    raw = _darkdiff(stage="vae", residual_vae=False, data_format="raw_raw")
    image = torch.rand(1, 3, 32, 32)
    bayer = image[:, [0, 1, 2, 1]]
    with torch.no_grad():
        a = rgb.vae.encode(image * 2 - 1).latent_dist.mean
        b = raw.vae.encode(bayer * 2 - 1).latent_dist.mean
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        out = raw.vae.decode(a).sample
    assert out.shape[1] == 4 and torch.equal(out[:, 1], out[:, 3])


@pytest.mark.parametrize("name", list(load_ablations("darkdiff")))
def test_each_ablation_row_is_a_valid_config(name):
    row = load_ablations("darkdiff")[name]
    stage1 = load_config("darkdiff_vae", row.vae)
    stage2 = load_config("darkdiff", [*row.latents, *row.diffusion])
    metadata = {"ratio", "wb", "ccm"}
    for cfg in (stage1, stage2):
        method = build_method(cfg.method, 4, TINY)
        assert set(method.columns_for(cfg.method)) - metadata <= set(cfg.preprocess.columns), name


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="color_fix"):
        _darkdiff(color_fix="adain")
    with pytest.raises(ConfigError, match="region_grid"):
        _darkdiff(region_grid=[2, 2, 2])  # the tiny UNet has one cross-attention layer in its down blocks


@pytest.fixture(scope="module")
def stages(ray_local, sample_root, fitted_vae, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 on the raw sample Parquet, stage-2 latents made with its VAE, then stage 2: 2 steps each on 2
    Ray Train workers."""
    root = tmp_path_factory.mktemp("darkdiff")
    common = [f"dataset.root={sample_root / 'raw'}", "preprocess.crop_size=64", "preprocess.crops_per_image=1",
              f"train.storage_path={root / 'runs'}", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
              "train.val_every=2", "train.val_batches=1", "train.val_images=1", "method.options.steps=2"]
    stage1_data = root / "stage1"
    cfg1 = load_config("darkdiff_vae", [*common, f"model.vae={fitted_vae}", f"preprocess.output={stage1_data}",
                                        f"train.data={stage1_data}", "preprocess.columns=[raw_in, lrgb_in, srgb_gt]"])
    preprocess(cfg1)
    stage1 = Path(train(cfg1).checkpoint)
    stage2_data = root / "stage2"
    cfg2 = load_config("darkdiff", [*common, f"model.vae={root / 'runs' / cfg1.train.name}", f"model.init_from={stage1}",
                                    f"preprocess.output={stage2_data}", f"train.data={stage2_data}"])
    preprocess(cfg2)
    stage2 = Path(train(cfg2).checkpoint)
    return {"stage1": stage1, "stage2": stage2, "stage2_data": stage2_data, "fitted_vae": fitted_vae}


def test_stage1_trains_and_exports_its_vae(stages):
    ckpt = stages["stage1"]
    assert {"vae.safetensors", "residual.safetensors", "metrics.json", "samples.png"} <= {p.name for p in ckpt.iterdir()}
    exported = load_vae(vae=str(ckpt))
    saved = load_file(str(ckpt / "vae.safetensors"))
    for key, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    fitted = load_vae(vae=str(stages["fitted_vae"]))
    assert any(not torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), exported.state_dict().values()))


def test_stage2_trains_on_its_stage1_latents(stages):
    ckpt = stages["stage2"]
    assert {"unet.safetensors", "context.safetensors", "region_attention.safetensors"} <= {p.name for p in ckpt.iterdir()}
    cfg, method = checkpoint.load_method(ckpt)
    stage1 = load_file(str(stages["stage1"] / "residual.safetensors"))
    for key, tensor in method.residual.state_dict().items():  # init_from brought stage 1's convolutions
        assert torch.equal(tensor, stage1[key]), key
    rows = {k: torch.from_numpy(v) for k, v in
            read_split(str(stages["stage2_data"]), "test", ["raw_in", "lrgb_in", "z_in", "ratio", "wb"], limit=2).items()}
    # z_in is the stage-1 encoder's latent of the demosaiced noisy linear RGB (float16 in the Parquet).
    encoded = method.condition_latent({k: v for k, v in rows.items() if k != "z_in"})
    torch.testing.assert_close(encoded, rows["z_in"].float(), atol=2e-2, rtol=2e-2)
    # Stage 2 refuses latents of another VAE.
    wrong = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vae": str(stages["fitted_vae"])})})
    from lowlight.train import preflight

    with pytest.raises(ConfigError, match="made by VAE"):
        preflight(wrong)


def test_enhance_turns_a_dng_into_a_png(stages, sample_root, tmp_path):
    dng = min((sample_root / "raw").rglob("short/*.dng"))
    out = tmp_path / "darkdiff.png"
    result = CliRunner().invoke(app, ["enhance", "--checkpoint", str(stages["stage2"]), "--input", str(dng),
                                      "--output", str(out), "--steps", "2", "--ratio", "100"])
    assert result.exit_code == 0, result.output
    image = read_image(str(out))
    height, width = read_raw(dng.read_bytes()).bayer.shape
    assert image.shape == (height, width, 3) and image.std() > 0.01
