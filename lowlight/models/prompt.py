"""The empty-prompt context that every latent method feeds SD's cross-attention.

SD's cross-attention projections have no bias, so a context of zeros is not "no prompt": it is an
input the frozen UNet never saw in training. Real bundles therefore need CLIP's embedding of "":
computed from the bundle's ``text_encoder/`` when it has one, or read from
``prompt_embedding.safetensors`` saved beside the weights once (``lowlight bundle``), so a cluster
can stage the weights without the text encoder. Anything else is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lowlight.config import ConfigError

PROMPT_LENGTH = 77  # CLIP's context length: the empty prompt is padded to it
PROMPT_EMBEDDING_FILE = "prompt_embedding.safetensors"
KEY = "prompt_embedding"


def encode_empty_prompt(source: str) -> Tensor:
    """[1, 77, D]: the CLIP text encoder's output for "" (``source`` has tokenizer/ and text_encoder/)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval()
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids)[0].float()


def to_bytes(embedding: Tensor) -> bytes:
    return save_safetensors({KEY: embedding.detach().to("cpu", torch.float32).contiguous()})


def from_bytes(data: bytes, where: str, cross_attention_dim: int) -> Tensor:
    """The saved embedding, checked against the UNet it will feed."""
    try:
        embedding = load_safetensors(data)[KEY]
    except Exception as e:  # safetensors raises its own error types for foreign files
        raise ConfigError(f"'{where}' is not a prompt embedding ({KEY} in safetensors): {e}") from e
    expected = (1, PROMPT_LENGTH, cross_attention_dim)
    if tuple(embedding.shape) != expected:
        raise ConfigError(f"'{where}' holds a {tuple(embedding.shape)} embedding; this UNet's cross-attention "
                          f"needs {expected}: it was made with another text encoder")
    return embedding.float()


def empty_prompt_embedding(pretrained: str, source: str, cross_attention_dim: int) -> Tensor:
    """The empty-prompt context of a real bundle (``source``: the local directory or hub id that
    ``pretrained`` resolved to)."""
    local = Path(source)
    if not local.is_dir() or (local / "text_encoder").is_dir():
        return encode_empty_prompt(source)
    saved = local / PROMPT_EMBEDDING_FILE
    if saved.is_file():
        return from_bytes(saved.read_bytes(), str(saved), cross_attention_dim)
    raise ConfigError(
        f"model.pretrained '{pretrained}' has neither text_encoder/ nor {PROMPT_EMBEDDING_FILE}. A zero context "
        f"is out of distribution for SD's bias-free cross-attention, so it is not used in their place. Save the "
        f"empty-prompt embedding beside the weights once: `lowlight bundle {pretrained} --text-encoder SRC` "
        f"(SRC: a hub id or directory with tokenizer/ and text_encoder/ of the same model)")
