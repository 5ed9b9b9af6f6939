"""Latent methods on settings that real weights on GPUs use: a bf16 frozen UNet beside an fp32 trainable
ControlNet without autocast, memory switches on what trains, and settings that cannot work refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowlight import checkpoint
from lowlight.config import ConfigError, MethodConfig, ModelConfig, load_config
from lowlight.methods import EnhanceOptions, build_method
from lowlight.models.control import control_residuals
from lowlight.models.sd import SDBundle


def random_batch(n: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    latent = (n, 4, size // 8, size // 8)
    return {"z_in": torch.randn(latent, generator=g), "z_gt": torch.randn(latent, generator=g),
            "srgb_in": torch.rand(n, 3, size, size, generator=g), "srgb_gt": torch.rand(n, 3, size, size, generator=g)}


def lacontrolnet(model: ModelConfig | None = None, **options):
    return build_method(MethodConfig(name="lacontrolnet", domain="srgb", options=options), 3, model or ModelConfig())


@pytest.mark.parametrize("name", ["lacontrolnet", "sd_controlnet"])
def test_fp32_controlnet_trains_beside_a_bf16_unet_without_autocast(name):
    method = build_method(MethodConfig(name=name, domain="srgb"), 3, ModelConfig(frozen_dtype="bf16"))
    assert method.unet.dtype == torch.bfloat16 and method.controlnet.dtype == torch.float32
    loss, _ = method(random_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in method.controlnet.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    image = method.predict(random_batch(1), EnhanceOptions(steps=2))
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_memory_switches_reach_the_trainable_controlnet():
    method = lacontrolnet(ModelConfig(gradient_checkpointing=True, attention="sliced"))
    assert method.controlnet.is_gradient_checkpointing
    processors = {type(p).__name__ for p in method.controlnet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}, processors
    plain = lacontrolnet()
    assert not plain.controlnet.is_gradient_checkpointing
    assert {type(p).__name__ for p in plain.controlnet.attn_processors.values()} == {"AttnProcessor2_0"}
    # The switches trade speed for memory and change nothing else: same loss, same gradients.
    method.train(), plain.train()
    results = []
    for m in (method, plain):
        perturbed(m.controlnet, 6)
        loss, _ = m(random_batch(), torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.controlnet.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_changing_the_schedule_of_a_frozen_unet_is_refused():
    with pytest.raises(ConfigError, match=r"model.prediction_type.*UNet is frozen"):
        lacontrolnet(ModelConfig(prediction_type="v_prediction"))
    with pytest.raises(ConfigError, match=r"model.zero_terminal_snr.*UNet is frozen"):
        lacontrolnet(ModelConfig(zero_terminal_snr=True, prediction_type="v_prediction"))
    lacontrolnet(ModelConfig(prediction_type="epsilon", zero_terminal_snr=False))  # what the bundle has: no change
    concat = build_method(MethodConfig(name="sd_concat", domain="srgb"), 3, ModelConfig(prediction_type="v_prediction"))
    assert concat.schedule.prediction_type == "v_prediction"  # the UNet trains, so it can learn the new target


def test_guidance_without_condition_dropout_is_refused():
    with pytest.raises(ConfigError, match=r"guidance_scale.*cond_dropout is 0"):
        lacontrolnet(guidance_scale=3.0)
    method = lacontrolnet()
    with pytest.raises(ConfigError, match=r"guidance_scale=2.0 needs the unconditional branch"):
        method.predict(random_batch(1), EnhanceOptions(steps=2, guidance_scale=2.0))
    lacontrolnet(guidance_scale=3.0, cond_dropout=0.1)


@pytest.mark.parametrize("name", ["lacontrolnet", "sd_controlnet", "sd_concat"])
def test_predict_on_a_file_encodes_the_input_once(monkeypatch, name):
    method = build_method(MethodConfig(name=name, domain="srgb"), 3, ModelConfig())
    encoded = []
    real_encode = method.bundle.encode
    monkeypatch.setattr(method.bundle, "encode", lambda images: encoded.append(images.shape) or real_encode(images))
    image = method.predict({"srgb_in": random_batch(1)["srgb_in"]}, EnhanceOptions(steps=2))
    assert encoded == [(1, 3, 64, 64)] and image.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", ["lacontrolnet", "sd_controlnet", "sd_concat"])
def test_each_baseline_starts_as_the_bare_unet(name):
    """Zero-initialised extra channels and zero convolutions: before training the condition changes nothing."""
    method = build_method(MethodConfig(name=name, domain="srgb"), 3, ModelConfig())
    batch = random_batch()
    x_t, t = torch.randn_like(batch["z_gt"]), torch.tensor([10, 900])
    bare = SDBundle.tiny().unet  # a fresh load of the same weights, untouched by the method
    with torch.no_grad():
        expected = bare(x_t, t, encoder_hidden_states=method.prompt(2, x_t)).sample
        got = method.denoise(x_t, t, method.hint(batch))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fix", ["adain", "wavelet"])
def test_colour_fix_in_predict_pulls_channel_means_to_the_stage1_image(fix):
    batch = random_batch(1)
    batch["srgb_pre"] = torch.stack([torch.full((64, 64), v) for v in (0.8, 0.4, 0.1)])[None]  # a warm, bright image
    target = batch["srgb_pre"].mean(dim=(2, 3))
    plain = lacontrolnet().predict(batch, EnhanceOptions(steps=2, color_fix="none")).mean(dim=(2, 3))
    fixed = lacontrolnet().predict(batch, EnhanceOptions(steps=2, color_fix=fix)).mean(dim=(2, 3))
    assert (fixed - target).abs().max() < 0.5 * (plain - target).abs().max(), (plain, fixed, target)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights moved off their initialisation (zero convolutions become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module


def test_per_sample_control_scales_equal_one_scale_per_call():
    method = lacontrolnet()
    controlnet = perturbed(method.controlnet, 0)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 8, 8, 8, generator=g), torch.tensor([300, 300])
    prompt = method.prompt(2, x)
    with torch.no_grad():
        both = control_residuals(controlnet, x, t, prompt, x, torch.tensor([0.5, 2.0]))
        alone = [control_residuals(controlnet, x[i:i + 1], t[:1], prompt[:1], x[i:i + 1], w)
                 for i, w in enumerate((0.5, 2.0))]
    for i, one in enumerate(alone):
        torch.testing.assert_close(both.mid_block_res_sample[i:i + 1], one.mid_block_res_sample)
        for got, expected in zip(both.down_block_res_samples, one.down_block_res_samples, strict=True):
            torch.testing.assert_close(got[i:i + 1], expected)
    assert both.mid_block_res_sample[1].abs().sum() > both.mid_block_res_sample[0].abs().sum()


def test_a_stage_starts_from_the_earlier_stages_weights(tmp_path):
    """Stage 1 trains the ControlNet; stage 2 freezes it and trains the UNet; stage 3 starts from stage 2
    and gets the ControlNet from stage 1, which stage 2 did not save."""
    def config(trainable: list[str], init_from: Path | None = None):
        sets = ["method.name=lacontrolnet", "model.vae=null", f"method.options.trainable={trainable}".replace("'", "")]
        return load_config("sample_srgb", sets + ([f"model.init_from={init_from}"] if init_from else []))

    cfg1 = config(["controlnet"])
    stage1 = build_method(cfg1.method, 3, cfg1.model)
    perturbed(stage1.controlnet, 2)
    checkpoint.save(tmp_path / "stage1", cfg1, stage1, 3, {})
    cfg2 = config(["unet"], tmp_path / "stage1")
    stage2 = build_method(cfg2.method, 3, cfg2.model)
    assert all(torch.equal(a, b) for a, b in zip(stage2.controlnet.state_dict().values(),
                                                 stage1.controlnet.state_dict().values(), strict=True))
    perturbed(stage2.unet, 3)
    checkpoint.save(tmp_path / "stage2", cfg2, stage2, 3, {})
    assert not (tmp_path / "stage2" / "controlnet.safetensors").exists()
    cfg3 = config(["controlnet"], tmp_path / "stage2")
    stage3 = build_method(cfg3.method, 3, cfg3.model)
    for got, expected in ((stage3.controlnet, stage1.controlnet), (stage3.unet, stage2.unet)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), expected.state_dict().values(),
                                                     strict=True))
    with pytest.raises(ConfigError, match="model.init_from"):
        build_method(cfg1.method, 3, ModelConfig(init_from=str(tmp_path / "stage1" / "missing")))


def test_a_step_callback_updates_the_condition_every_tile_reads():
    method = lacontrolnet()
    perturbed(method.controlnet, 4)  # so the condition changes the output
    batch = random_batch(1)
    opts = EnhanceOptions(steps=3, tile=4)  # an 8 x 8 latent in overlapping 4 x 4 tiles
    plain = method.sample_latent(batch, opts)
    steps = []

    def halving(batch, condition):
        def callback(state):
            steps.append(state.index)
            condition.hint = condition.hint * 0.5
        return callback

    method.step_callback = halving
    updated = method.sample_latent(batch, opts)
    assert steps == [0, 1, 2]
    assert (updated - plain).abs().max() > 1e-4


def test_trainable_parts_by_path_stay_fp32_and_round_trip(tmp_path):
    cfg = load_config("sample_srgb", ["method.name=lacontrolnet", "model.vae=null", "model.frozen_dtype=bf16",
                                      "method.options.trainable=[controlnet,vae.decoder.conv_o*]"])
    method = build_method(cfg.method, 3, cfg.model)
    assert set(method.checkpoint_modules()) == {"controlnet", "vae.decoder.conv_out"}
    trained = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("controlnet.", "vae.decoder.conv_out.")) for n in trained)
    assert method.vae.decoder.conv_out.weight.dtype == torch.float32
    assert method.vae.encoder.conv_in.weight.dtype == torch.bfloat16 and method.unet.dtype == torch.bfloat16
    perturbed(method.vae.decoder.conv_out, 5)
    checkpoint.save(tmp_path / "ckpt", cfg, method, 3, {})
    assert (tmp_path / "ckpt" / "vae.decoder.conv_out.safetensors").exists()
    _, loaded = checkpoint.load_method(tmp_path / "ckpt")
    assert torch.equal(loaded.vae.decoder.conv_out.weight, method.vae.decoder.conv_out.weight)
    with pytest.raises(ConfigError, match=r"'vae.nothing\*' matches no module"):
        build_method(MethodConfig(name="lacontrolnet", domain="srgb", options={"trainable": ["vae.nothing*"]}), 3)
