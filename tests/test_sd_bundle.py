"""The SD bundle loads the layouts real checkpoints have (SD 1.5: PNDM scheduler + CLIP text
encoder; SD 2.1: DDIM with v-prediction), honours the config's overrides and memory switches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from typer.testing import CliRunner

from lowlight.cli import app
from lowlight.config import ConfigError, ModelConfig
from lowlight.models import prompt, sd
from lowlight.sampling import NoiseSchedule


def _bundle_like(tmp_path, name: str, scheduler) -> str:
    directory = tmp_path / name
    shutil.copytree(sd.tiny_dir(), directory)
    shutil.rmtree(directory / "scheduler")
    scheduler.save_pretrained(directory / "scheduler")
    return str(directory)


def _add_text_encoder(directory: str, tmp_path) -> CLIPTextModel:
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\n")
    CLIPTokenizer(str(vocab), str(merges), model_max_length=77).save_pretrained(f"{directory}/tokenizer")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=4, hidden_size=sd.TINY_CROSS_ATTENTION_DIM, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    encoder.save_pretrained(f"{directory}/text_encoder")
    return encoder.eval()


def test_tiny_bundle_has_zero_prompt_and_sd_schedule():
    bundle = sd.SDBundle.tiny()
    assert bundle.prompt_embedding.shape == (1, prompt.PROMPT_LENGTH, sd.TINY_CROSS_ATTENTION_DIM)
    assert not bundle.prompt_embedding.any()
    assert bundle.scheduler.config.prediction_type == "epsilon"
    assert bundle.latent_factor == 8
    images = torch.rand(1, 3, 64, 64)
    assert bundle.decode(bundle.encode(images)).shape == images.shape


def test_sd15_layout_with_text_encoder_gives_its_empty_prompt(tmp_path):
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    directory = _bundle_like(tmp_path, "sd15", scheduler)
    encoder = _add_text_encoder(directory, tmp_path)
    bundle = sd.SDBundle.load(ModelConfig(pretrained=directory))
    ids = torch.tensor([[0] + [1] * 76])  # "" = start token, then end/pad tokens
    with torch.no_grad():
        expected = encoder(ids)[0]
    assert bundle.prompt_embedding.abs().sum() > 0
    torch.testing.assert_close(bundle.prompt_embedding, expected)
    schedule = NoiseSchedule.from_scheduler(bundle.scheduler)
    assert schedule.prediction_type == "epsilon"
    torch.testing.assert_close(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod.float())


def test_sd21_v_prediction_layout(tmp_path):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False)
    directory = _bundle_like(tmp_path, "sd21v", scheduler)
    # SD 2.x UNets use linear projections in their transformers and per-block head counts.
    unet = sd.tiny_unet()
    unet = UNet2DConditionModel.from_config(unet.config, use_linear_projection=True, attention_head_dim=[4, 8])
    shutil.rmtree(f"{directory}/unet")
    unet.save_pretrained(f"{directory}/unet")
    saved = torch.randn(1, prompt.PROMPT_LENGTH, sd.TINY_CROSS_ATTENTION_DIM)
    (tmp_path / "sd21v" / prompt.PROMPT_EMBEDDING_FILE).write_bytes(prompt.to_bytes(saved))
    bundle = sd.SDBundle.load(ModelConfig(pretrained=directory))
    torch.testing.assert_close(bundle.prompt_embedding, saved)
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    assert bundle.unet.config.use_linear_projection


def test_overrides_and_memory_switches():
    model = ModelConfig(prediction_type="v_prediction", zero_terminal_snr=True, attention="sliced",
                        gradient_checkpointing=True, vae_tile=128, vae_slicing=True)
    bundle = sd.SDBundle.load(model)
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    assert bundle.scheduler.config.timestep_spacing == "trailing"
    assert float(bundle.scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR
    assert bundle.unet.is_gradient_checkpointing
    assert bundle.vae.use_tiling and bundle.vae.use_slicing
    assert (bundle.vae.tile_sample_min_size, bundle.vae.tile_latent_min_size) == (128, 16)
    plain = sd.SDBundle.tiny()
    assert float(plain.scheduler.alphas_cumprod[-1]) > 1e-3
    assert not plain.unet.is_gradient_checkpointing
    # The switches change memory, not results: sliced attention and checkpointing give the same outputs
    # and gradients as the plain UNet, sliced VAE decoding the same images.
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    outputs = []
    for b in (bundle, plain):
        b.unet.train()
        out = b.unet(x, t, encoder_hidden_states=b.prompt(2, x.device, x.dtype)).sample
        out.square().mean().backward()
        outputs.append((out.detach(), [p.grad for p in b.unet.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(bundle.decode(x), plain.decode(x), rtol=1e-4, atol=1e-4)


def test_missing_pretrained_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="missing"):
        sd.SDBundle.load(ModelConfig(pretrained=str(tmp_path / "missing")))


def test_a_real_bundle_without_text_encoder_or_saved_embedding_is_refused(tmp_path):
    directory = _bundle_like(tmp_path, "no-text", PNDMScheduler())
    with pytest.raises(ConfigError, match=r"neither text_encoder/ nor prompt_embedding.safetensors.*lowlight bundle"):
        sd.SDBundle.load(ModelConfig(pretrained=directory))
    (tmp_path / "no-text" / prompt.PROMPT_EMBEDDING_FILE).write_bytes(prompt.to_bytes(torch.zeros(1, 77, 8)))
    with pytest.raises(ConfigError, match=r"\(1, 77, 8\) embedding.*needs \(1, 77, 32\)"):
        sd.SDBundle.load(ModelConfig(pretrained=directory))


def test_bundle_command_saves_the_text_encoders_embedding_beside_the_weights(tmp_path):
    """The weights are staged without text_encoder/; the embedding comes from another copy that has it."""
    with_text = _bundle_like(tmp_path, "full", PNDMScheduler())
    encoder = _add_text_encoder(with_text, tmp_path)
    weights = _bundle_like(tmp_path, "staged", PNDMScheduler())
    done = CliRunner().invoke(app, ["bundle", weights, "--text-encoder", with_text])
    assert done.exit_code == 0, done.output
    assert prompt.PROMPT_EMBEDDING_FILE in done.output
    with torch.no_grad():
        expected = encoder(torch.tensor([[0] + [1] * 76]))[0]
    torch.testing.assert_close(sd.SDBundle.load(ModelConfig(pretrained=weights)).prompt_embedding, expected)
