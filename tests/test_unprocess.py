"""Unprocessing and the DNG writer: exact read-back through rawpy and round trips through the ISPs."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import rawpy
from skimage import data

from lowlight.data.raw import pack_bayer, read_raw, render_srgb, simple_isp
from lowlight.data.unprocess import CameraProfile, mosaic, read_exposure_tags, unprocess, write_dng

PROFILE = CameraProfile.load()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def _to_adu(norm: np.ndarray, profile: CameraProfile = PROFILE) -> np.ndarray:
    black = float(profile.black_level)
    return np.rint(black + norm * (profile.white_level - black)).astype(np.uint16)


def test_profile_is_the_sony_a7s2_with_dcraw_matrix():
    assert PROFILE.pattern == "RGGB"
    assert (PROFILE.black_level, PROFILE.white_level) == (512, 16383)
    assert PROFILE.wb[1] == 1 and PROFILE.wb[0] > 1 and PROFILE.wb[2] > 1
    assert PROFILE.xyz_to_cam[0, 0] == pytest.approx(0.5838)
    np.testing.assert_allclose(PROFILE.cam_to_srgb.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
def test_dng_reads_back_exactly(pattern):
    profile = dataclasses.replace(PROFILE, pattern=pattern)
    bayer = np.random.default_rng(0).integers(0, 16384, (40, 64)).astype(np.uint16)
    buf = io.BytesIO()
    write_dng(buf, bayer, profile, iso=1600, exposure_time=1 / 30)

    with rawpy.imread(io.BytesIO(buf.getvalue())) as raw:
        np.testing.assert_array_equal(raw.raw_image_visible, bayer)
        desc = raw.color_desc.decode()
        assert "".join(desc[c] for c in raw.raw_pattern.ravel()) == pattern
        assert raw.black_level_per_channel == [512] * 4
        assert raw.white_level == 16383
        np.testing.assert_allclose(raw.camera_whitebalance[:3], profile.wb, rtol=1e-5)
        np.testing.assert_allclose(raw.rgb_xyz_matrix[:3], profile.xyz_to_cam, atol=1e-6)
    buf.seek(0)
    assert read_exposure_tags(buf) == (1600, pytest.approx(1 / 30, rel=1e-9))


def test_missing_exposure_tags_read_as_none(tmp_path):
    path = tmp_path / "plain.dng"
    write_dng(path, np.zeros((32, 32), np.uint16), PROFILE)
    assert read_exposure_tags(path) == (None, None)


def test_writer_rejects_what_libraw_would_not_read():
    with pytest.raises(ValueError, match="uint16"):
        write_dng(io.BytesIO(), np.zeros((32, 32), np.float32), PROFILE)
    with pytest.raises(ValueError, match="22 px"):
        write_dng(io.BytesIO(), np.zeros((16, 32), np.uint16), PROFILE)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_mosaic_samples_the_colour_named_by_the_pattern(pattern):
    rgb = np.broadcast_to(np.array([1.0, 2.0, 3.0]), (4, 6, 3))
    cell = mosaic(rgb, pattern)[:2, :2].ravel()
    assert "".join("RGB"[int(v) - 1] for v in cell) == pattern


def test_unprocess_inverts_the_simple_isp():
    # Each 2x2 cell is one colour, so mosaicking loses nothing and the half-size ISP
    # must give the small photo back up to 14-bit quantisation (measured max 4e-4).
    small = data.coffee()[100:164, 200:264].astype(np.float32) / 255
    camera = unprocess(small.repeat(2, axis=0).repeat(2, axis=1), PROFILE)
    assert 0 < camera.min() and camera.max() < 1  # this crop is inside the camera gamut
    frame = read_raw(_dng_bytes(_to_adu(mosaic(camera, PROFILE.pattern))))
    out = simple_isp(pack_bayer(frame), frame.camera_wb, frame.cam_to_srgb).transpose(1, 2, 0)
    assert np.abs(out - small).max() < 2e-3


def test_round_trip_through_rawpys_full_render():
    # Full-resolution rendering demosaics (AHD), which blurs and aliases fine detail;
    # on this 256 px crop of a real photo the round trip measures about 31 dB.
    photo = data.astronaut()[100:356, 100:356].astype(np.float32) / 255
    dng = _dng_bytes(_to_adu(mosaic(unprocess(photo, PROFILE), PROFILE.pattern)))
    rendered = render_srgb(dng)
    assert rendered.shape == photo.shape
    assert _psnr(rendered, photo) > 29
    assert _psnr(render_srgb(dng, ratio=2), photo) < 20  # twice the exposure fails the bound


def _dng_bytes(bayer: np.ndarray) -> bytes:
    buf = io.BytesIO()
    write_dng(buf, bayer, PROFILE)
    return buf.getvalue()
