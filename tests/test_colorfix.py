"""Colour fixes: AdaIN matches channel statistics, the wavelet fix swaps low frequencies, modes dispatch."""

from __future__ import annotations

import pytest
import torch

from lowlight.colorfix import COLOR_FIX_MODES, adain_color_fix, color_fix, wavelet_color_fix, wavelet_split


def smooth_field(seed: int, size: int = 64) -> torch.Tensor:
    """A low-frequency colour field: 4x4 random values upsampled bilinearly."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


def texture(seed: int, size: int = 64) -> torch.Tensor:
    """Zero-mean pixel-scale detail."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) - 0.5


def test_adain_matches_reference_channel_statistics():
    generator = torch.Generator().manual_seed(0)
    image = 0.25 + 0.5 * torch.rand(2, 3, 16, 16, generator=generator)
    reference = 0.4 + 0.2 * torch.rand(2, 3, 16, 16, generator=generator)  # fixed result stays in [0, 1]
    fixed = adain_color_fix(image, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-4, rtol=0)
    # The structure is the image's: per channel, an increasing affine map of it.
    assert torch.corrcoef(torch.stack([fixed[0, 0].flatten(), image[0, 0].flatten()]))[0, 1] > 0.9999


def test_wavelet_takes_low_frequencies_from_reference_and_detail_from_image():
    # A colour/brightness shift between the two, as between a diffusion output and its condition.
    image = 0.55 + 0.2 * smooth_field(1) + 0.2 * texture(2)
    reference = torch.tensor([0.3, 0.35, 0.25]).view(1, 3, 1, 1) + 0.3 * smooth_field(3) + 0.2 * texture(4)
    fixed = wavelet_color_fix(image, reference)
    assert fixed.min() > 0 and fixed.max() < 1  # no clamping distorts the measurement below
    fixed_high, fixed_low = wavelet_split(fixed)
    image_high, image_low = wavelet_split(image)
    reference_high, reference_low = wavelet_split(reference)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().mean().item()

    # Measured by the same decomposition: close to the intended source, far from the other one.
    # (Not exact: blurring a low band again changes it a little.)
    assert error(fixed_low, reference_low) < 0.1 * error(image_low, reference_low)
    assert error(fixed_high, image_high) < 0.2 * error(reference_high, image_high)


def test_wavelet_split_is_exact_and_works_on_images_smaller_than_the_dilation():
    image = torch.rand(1, 3, 5, 7)
    high, low = wavelet_split(image, levels=5)  # dilation reaches 16 > 7
    torch.testing.assert_close(high + low, image)
    assert low.std() < image.std()


def test_wavelet_low_band_is_five_dilated_binomial_blurs():
    """An impulse spreads by 1 + 2 + 4 + 8 + 16 = 31 pixels through dilations 1, 2, 4, 8, 16 (StableSR/DiffBIR)."""
    impulse = torch.zeros(1, 3, 81, 81)
    impulse[..., 40, 40] = 1
    _, low = wavelet_split(impulse, levels=5)
    support = (low[0, 0] > 0).nonzero()
    assert support.min().item() == 40 - 31 and support.max().item() == 40 + 31
    torch.testing.assert_close(low.sum(), torch.tensor(3.0))  # the kernel preserves mass
    assert low[0, 0, 40, 40] == low[0, 0].max()


def test_none_is_identity_and_modes_dispatch():
    image, reference = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert color_fix(image, reference, "none") is image
    assert torch.equal(color_fix(image, reference, "adain"), adain_color_fix(image, reference))
    assert torch.equal(color_fix(image, reference, "wavelet"), wavelet_color_fix(image, reference))
    assert set(COLOR_FIX_MODES) == {"none", "adain", "wavelet"}


def test_bad_mode_and_shape_mismatch_are_errors():
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="'none', 'adain', 'wavelet'"):
        color_fix(image, image, "histogram")
    for fix in (adain_color_fix, wavelet_color_fix):
        with pytest.raises(ValueError, match="one shape"):
            fix(image, torch.rand(1, 3, 8, 9))
