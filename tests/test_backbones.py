"""Backbones (SID U-Net, NAFNet) and the NAFNet block: shapes, sizes, init identity, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowlight.models.backbones import BACKBONES, NAFNET_PRESETS, NAFNet, SIDUNet, build_backbone
from lowlight.models.blocks import LayerNorm2d, NAFBlock

# Narrow widths keep the forward passes cheap; the architecture (levels, block counts) is the preset's.
LIGHT_WIDTH = {"unet": 4, "nafnet-1": None, "nafnet-2": 2, "nafnet-l4-w8": None, "nafnet-l4-w16": 4,
               "nafnet-sidd": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def light(name: str, cin: int = 4, cout: int = 9) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, cin, cout, width=LIGHT_WIDTH[name])


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (5, 3)])
def test_any_input_size_keeps_its_shape(name, size):
    with torch.no_grad():
        out = light(name)(torch.rand(2, 4, *size))
    assert out.shape == (2, 9, *size)
    assert torch.isfinite(out).all()


def test_sid_unet_has_the_papers_size():
    with torch.device("meta"):
        net = SIDUNet(4, 9, width=32)
    assert 7.5e6 <= n_params(net) <= 8.1e6
    assert build_backbone("unet", 4, 9).head.out_channels == 9


def test_nafnet_presets_sizes():
    with torch.device("meta"):
        counts = {name: n_params(NAFNet.preset(name, 4, 9)) for name in NAFNET_PRESETS}
    assert counts["nafnet-1"] < counts["nafnet-l4-w8"] < counts["nafnet-l4-w16"] < counts["nafnet-2"]
    assert counts["nafnet-2"] < counts["nafnet-sidd"]
    assert 28e6 <= counts["nafnet-sidd"] <= 30e6  # NAFNet's SIDD model is about 29 M parameters
    with torch.device("meta"):
        sidd = NAFNet.preset("nafnet-sidd", 4, 9)
    assert [len(e) for e in sidd.encoders] == [2, 2, 4, 8]
    assert len(sidd.middle) == 12 and [len(d) for d in sidd.decoders] == [2, 2, 2, 2]
    assert sidd.intro.out_channels == 32 and sidd.ending.out_channels == 9
    with torch.device("meta"):
        paper_1 = NAFNet.preset("nafnet-1", 4, 9)
    assert len(paper_1.encoders) == 0 and len(paper_1.middle) == 1 and paper_1.intro.out_channels == 16


def conv_params(module: torch.nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    return sum(p.numel() for m in convs for p in m.parameters(recurse=False))


# ExposureDiffusion's Table 5b ("Computational cost of each model"): UNet 7.762M, NAFNet-1 4.697K,
# NAFNet-2 6.871M parameters. Those are the paper's models: packed Bayer (4 channels) plus the photon
# map (--with_photon: 8 input channels) and the adaptive residual head (2*4+1 = 9 outputs).
TABLE_5B = {"unet": 7.762e6, "nafnet-1": 4.697e3, "nafnet-2": 6.871e6}


@pytest.mark.parametrize("name", sorted(TABLE_5B))
def test_presets_match_the_papers_table_5b(name):
    with torch.device("meta"):
        net = build_backbone(name, 8, 9)
    assert abs(n_params(net) / TABLE_5B[name] - 1) < 0.10
    # The paper's counter (thop) counts convolution weights only, not LayerNorm2d or the blocks' beta/gamma:
    # counted that way the presets give the printed numbers to their last digit.
    printed = TABLE_5B[name]
    scale = 1e3 if printed < 1e6 else 1e6
    assert round(conv_params(net) / scale, 3) == round(printed / scale, 3)


def test_layernorm2d_normalises_over_channels():
    x = torch.randn(2, 6, 5, 7)
    ln = LayerNorm2d(6)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_nafblock_is_the_identity_at_init(dropout):
    torch.manual_seed(0)
    block = NAFBlock(8, dropout=dropout).train()
    x = torch.randn(2, 8, 9, 11)
    assert torch.equal(block(x), x)
    assert torch.count_nonzero(block.beta) == 0 and torch.count_nonzero(block.gamma) == 0


def test_fresh_nafnet_body_is_the_identity():
    torch.manual_seed(0)
    net = NAFNet.preset("nafnet-l4-w8", 4, 4)
    blocks = [m for m in net.modules() if isinstance(m, NAFBlock)]
    assert len(blocks) == 9
    for block in blocks:
        x = torch.randn(1, block.beta.shape[1], 4, 4)
        assert torch.equal(block(x), x)


def _backward(net: torch.nn.Module) -> None:
    out = net(torch.rand(2, 4, 19, 23))
    (out**2).mean().backward()


@pytest.mark.parametrize("name", BACKBONES)
def test_every_parameter_gets_a_gradient(name):
    net = light(name)
    _backward(net)  # at init: beta/gamma = 0 zero some gradients, but every parameter is in the graph (DDP)
    assert [n for n, p in net.named_parameters() if p.grad is None] == []

    net.zero_grad(set_to_none=True)
    with torch.no_grad():  # away from init every parameter should actually learn
        for m in net.modules():
            if isinstance(m, NAFBlock):
                m.beta.fill_(0.5)
                m.gamma.fill_(0.5)
    _backward(net)
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("name", ["unet", "nafnet-1"])
def test_deterministic_given_the_seed(name):
    a, b = light(name), light(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.rand(1, 4, 16, 20)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_build_backbone_passes_width_and_kwargs():
    net = build_backbone("nafnet-l4-w8", 3, 3, width=4, enc_blocks=(1, 2), dec_blocks=(0, 1), middle_blocks=0)
    assert isinstance(net, NAFNet) and net.intro.out_channels == 4 and net.multiple == 4
    assert [len(e) for e in net.encoders] == [1, 2] and len(net.middle) == 0
    assert build_backbone("unet", 3, 3, width=4).head.in_channels == 4
    with torch.no_grad():
        assert net(torch.rand(1, 3, 7, 9)).shape == (1, 3, 7, 9)


def test_build_backbone_rejects_unknown_names():
    names = r"'resnet'.*unet.*nafnet-1.*nafnet-2.*nafnet-l4-w8.*nafnet-l4-w16.*nafnet-sidd"
    with pytest.raises(ValueError, match=names):
        build_backbone("resnet", 4, 4)
    with pytest.raises(ValueError, match="one entry per level"):
        NAFNet(4, 4, enc_blocks=(1, 1), dec_blocks=(1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["unet", "nafnet-1"])
def test_runs_on_cuda_with_bf16_autocast(name):
    net = light(name).cuda()
    x = torch.rand(2, 4, 37, 53, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)
    assert out.shape == (2, 9, 37, 53) and out.is_cuda and torch.isfinite(out).all()
    out.float().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
