"""RAW reading, packing and the ISPs, checked against rawpy on DNGs written by unprocess.write_dng."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import rawpy
import tifffile
from skimage import data

from lowlight.data import unprocess as dng
from lowlight.data.camera_levels import pinned_levels
from lowlight.data.raw import (
    PATTERNS,
    UnsupportedSensor,
    camera_names,
    linear_rgb,
    pack_bayer,
    read_raw,
    render_srgb,
    simple_isp,
    srgb_gamma,
    srgb_gamma_inverse,
)
from lowlight.data.unprocess import CameraProfile, mosaic, unprocess, write_dng

PROFILE = CameraProfile.load()
UNLISTED = dataclasses.replace(PROFILE, name="lowlight test camera")  # no pinned levels: the file's own
BLACK, WHITE = 512, 16383
# Distinct ADU values per Bayer site: R, the green in R's row, B, the green in B's row.
SITE_VALUES = {"R": 1512, "G1": 5512, "B": 9512, "G2": 13512}


def _sites(pattern: str) -> list[str]:
    """Site names of the 2x2 cell in raster order, worked out independently of raw.py."""
    red_row = pattern.index("R") // 2
    return [c if c != "G" else ("G1" if i // 2 == red_row else "G2") for i, c in enumerate(pattern)]


def _write(path, bayer, profile=PROFILE):
    write_dng(path, bayer, profile)
    return path


def _photo_dng(tmp_path, size=128, name="photo.dng"):
    """A DNG of a real photo crop, its values in ADU."""
    photo = data.astronaut()[80 : 80 + size, 140 : 140 + size].astype(np.float32) / 255
    norm = mosaic(unprocess(photo, PROFILE), PROFILE.pattern)
    bayer = np.rint(BLACK + norm * (WHITE - BLACK)).astype(np.uint16)
    return _write(tmp_path / name, bayer), bayer


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_packs_to_r_g1_b_g2(tmp_path, pattern):
    cell = np.array([SITE_VALUES[s] for s in _sites(pattern)], np.uint16).reshape(2, 2)
    bayer = np.tile(cell, (12, 14))
    path = _write(tmp_path / "cfa.dng", bayer, dataclasses.replace(PROFILE, pattern=pattern))

    frame = read_raw(path)
    packed = pack_bayer(frame)

    assert frame.pattern == pattern
    assert packed.shape == (4, 12, 14)
    expected = [(SITE_VALUES[s] - BLACK) / (WHITE - BLACK) for s in ("R", "G1", "B", "G2")]
    np.testing.assert_allclose(packed.reshape(4, -1).mean(axis=1), expected, rtol=1e-6)
    assert np.all(np.ptp(packed, axis=(1, 2)) == 0)
    # rawpy agrees on which site holds red and blue.
    with rawpy.imread(str(path)) as raw:
        colors = raw.raw_colors_visible
        assert np.all(bayer[colors == 0] == SITE_VALUES["R"])
        assert np.all(bayer[colors == 2] == SITE_VALUES["B"])


def test_black_and_white_normalisation_uses_per_site_black(tmp_path):
    blacks = (500, 510, 520, 530)  # raster order of the RGGB cell: R, G1, G2, B
    profile = dataclasses.replace(UNLISTED, black_level=blacks)
    cell = np.array([[400, 510 + 1000], [520 + 2000, 16383]], np.uint16)
    frame = read_raw(_write(tmp_path / "levels.dng", np.tile(cell, (12, 12)), profile))

    np.testing.assert_array_equal(frame.black_level, blacks)
    assert frame.white_level == WHITE
    packed = pack_bayer(frame)[:, 0, 0]  # R, G1, B, G2
    np.testing.assert_allclose(packed, [0.0, 1000 / (WHITE - 510), 1.0, 2000 / (WHITE - 520)], rtol=1e-6)


def test_frame_carries_camera_white_balance_and_colour_matrix(tmp_path):
    frame = read_raw(_photo_dng(tmp_path)[0])
    np.testing.assert_allclose(frame.camera_wb, PROFILE.wb, rtol=1e-4)
    np.testing.assert_allclose(frame.cam_to_srgb, PROFILE.cam_to_srgb, atol=1e-3)
    # White-balanced camera white is sRGB white.
    np.testing.assert_allclose(frame.cam_to_srgb.sum(axis=1), 1.0, atol=1e-4)


def test_linear_rgb_amplifies_balances_clips_and_averages_greens():
    packed = np.array([0.01, 0.02, 0.03, 0.04], np.float32)[:, None, None] * np.ones((4, 1, 2), np.float32)
    packed[0, 0, 1] = 0.9  # saturates once amplified
    out = linear_rgb(packed, np.array([2.0, 1.0, 1.5]), ratio=10)
    np.testing.assert_allclose(out[:, 0, 0], [0.2, 0.3, 0.45], rtol=1e-6)
    assert out[0, 0, 1] == 1.0


def test_gamma_is_rawpys_bt709_curve():
    x = np.array([0.0, 0.01, 0.1, 0.5, 1.0], np.float32)
    bt709 = np.where(x < 0.018, 4.5 * x, 1.099 * x**0.45 - 0.099)
    np.testing.assert_allclose(srgb_gamma(x), bt709, atol=2e-3)
    grid = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(srgb_gamma_inverse(srgb_gamma(grid)), grid, atol=1e-6)


def test_simple_isp_matches_rawpy_half_size(tmp_path):
    # LibRaw's half-size path is WB, clip, green averaging, CCM, gamma in 16-bit integers,
    # so the float ISP should agree to about the 16-bit output step, not just visually.
    path, _ = _photo_dng(tmp_path, size=256)
    frame = read_raw(path)
    ours = simple_isp(pack_bayer(frame), frame.camera_wb, frame.cam_to_srgb).transpose(1, 2, 0)
    theirs = render_srgb(path, half_size=True)
    assert ours.shape == theirs.shape == (128, 128, 3)
    err = np.abs(ours - theirs)
    assert err.mean() < 1e-3
    assert err.max() < 5e-3


@pytest.mark.parametrize("ratio", [20, 100])
def test_render_with_ratio_amplifies_like_a_longer_exposure(tmp_path, ratio):
    bright_path, bright = _photo_dng(tmp_path, name="bright.dng")
    dark = np.rint(BLACK + (bright.astype(np.float64) - BLACK) / ratio).astype(np.uint16)
    dark_path = _write(tmp_path / "dark.dng", dark)

    target = render_srgb(bright_path)
    amplified = render_srgb(dark_path, ratio=ratio)
    as_shot = render_srgb(dark_path)

    # Rounding the dark frame to whole ADUs costs up to ratio/2 ADU after amplification
    # (measured mean abs error: 0.0013 at x20, 0.0054 at x100).
    assert np.abs(amplified - target).mean() < 0.002 + 6e-5 * ratio
    assert as_shot.mean() < target.mean() / 3


def test_bytes_and_path_give_identical_results(tmp_path):
    path, _ = _photo_dng(tmp_path)
    from_path, from_bytes = read_raw(path), read_raw(path.read_bytes())
    for field in dataclasses.fields(from_path):
        np.testing.assert_array_equal(getattr(from_path, field.name), getattr(from_bytes, field.name))
    np.testing.assert_array_equal(render_srgb(path, ratio=3), render_srgb(path.read_bytes(), ratio=3))


# ---------------------------------------------------------------- sensors that are not 2x2 Bayer

# Fujifilm X-Trans (X-T2, SID's Fuji set), shifted by one row and column so that its top-left
# 2x2 reads G B / R G, a Bayer-looking cell: only the 6x6 repeat tells it apart.
XTRANS_SHIFTED = ("GBGGRG", "RGRBGB", "GBGGRG", "GRGGBG", "BGBRGR", "GRGGBG")


def _xtrans_dng(path):
    """A DNG with a 6x6 CFARepeatPatternDim/CFAPattern, otherwise as write_dng writes one."""
    cfa = {dng.CFA_REPEAT_PATTERN_DIM, dng.CFA_PATTERN}
    tags = [t for t in dng._dng_tags(UNLISTED, None, None) if t[0] not in cfa]
    codes = tuple("RGB".index(c) for row in XTRANS_SHIFTED for c in row)
    tags += [(dng.CFA_REPEAT_PATTERN_DIM, dng.SHORT, 2, (6, 6), True),
             (dng.CFA_PATTERN, dng.BYTE, 36, codes, True)]
    tifffile.imwrite(path, np.full((36, 36), 1000, np.uint16), photometric="cfa", extratags=sorted(tags),
                     metadata=None)
    return path


def test_x_trans_is_refused_naming_the_file(tmp_path):
    path = _xtrans_dng(tmp_path / "DSCF0001.dng")
    with rawpy.imread(str(path)) as raw:  # LibRaw reads it, and its corner looks like Bayer
        assert raw.raw_pattern.shape == (6, 6)
        assert "".join(raw.color_desc.decode()[c] for c in raw.raw_colors_visible[:2, :2].ravel()) == "GBRG"
    with pytest.raises(UnsupportedSensor, match=r"DSCF0001\.dng' has a 6x6 colour filter array") as err:
        read_raw(path)
    assert "X-Trans" in str(err.value)
    with pytest.raises(UnsupportedSensor, match="RAW data has a 6x6"):
        read_raw(path.read_bytes())


# ---------------------------------------------------------------- pinned black and white levels


def _flat_dng(path, profile, adu=4512):
    write_dng(path, np.full((24, 24), adu, np.uint16), profile)
    return path


def test_sony_a7s2_levels_are_pinned_as_sid_packs_them(tmp_path):
    # LibRaw reports what the file says (here black 500, white 15000); SID's pack_raw uses 512 and 16383
    profile = dataclasses.replace(PROFILE, black_level=500, white_level=15000)
    path = _flat_dng(tmp_path / "sony.dng", profile)
    with rawpy.imread(str(path)) as raw:
        assert (raw.black_level_per_channel, raw.white_level) == ([500] * 4, 15000)
    frame = read_raw(path)
    np.testing.assert_array_equal(frame.black_level, [512] * 4)
    assert frame.white_level == 16383
    sid_pack = max(4512 - 512, 0) / (16383 - 512)  # test_Sony.py pack_raw
    np.testing.assert_allclose(pack_bayer(frame), sid_pack, rtol=1e-6)


def test_eld_cameras_keep_the_file_black_and_pin_white(tmp_path):
    # ELD's pack_raw_bayer: the file's black_level_per_channel, white_point = 16383, for every camera
    profile = dataclasses.replace(PROFILE, name="Nikon D850", black_level=(600, 601, 602, 603),
                                  white_level=15520)
    frame = read_raw(_flat_dng(tmp_path / "nikon.dng", profile))
    np.testing.assert_array_equal(frame.black_level, [600, 601, 602, 603])
    assert frame.white_level == 16383


def test_unlisted_cameras_keep_the_file_levels(tmp_path):
    profile = dataclasses.replace(UNLISTED, black_level=500, white_level=15000)
    frame = read_raw(_flat_dng(tmp_path / "other.dng", profile))
    np.testing.assert_array_equal(frame.black_level, [500] * 4)
    assert frame.white_level == 15000


def test_camera_names_come_from_make_and_model_tags(tmp_path):
    # ARW, NEF and CR2 name the camera in IFD0's Make and Model, as this TIFF does
    path = tmp_path / "DSC_0001.NEF"
    tags = [(271, 2, 0, "NIKON CORPORATION", True), (272, 2, 0, "NIKON D850", True)]
    tifffile.imwrite(path, np.zeros((4, 4), np.uint16), extratags=tags)
    names = camera_names(path)
    assert names == ("NIKON D850", "NIKON CORPORATION NIKON D850", "")
    assert pinned_levels(names).camera == "Nikon D850"
    assert camera_names(b"FUJIFILMCCD-RAW 0201FF383501") == ("", "", "")
    assert pinned_levels(camera_names(b"FUJIFILMCCD-RAW 0201FF383501")) is None
    assert pinned_levels(("ILCE-7SM2",)).black_level == 512


# ---------------------------------------------------------------- each file's own white balance


def test_a_target_renders_with_its_own_as_shot_white_balance(tmp_path):
    # Same scene, two exposures shot with different as-shot white balance: each renders with its own.
    _, bayer = _photo_dng(tmp_path, size=128)
    warm = dataclasses.replace(PROFILE, wb=np.array([2.0, 1.0, 1.8], np.float32))
    short_path = _write(tmp_path / "short.dng", bayer)
    long_path = _write(tmp_path / "long.dng", bayer, warm)
    short, long = read_raw(short_path), read_raw(long_path)
    np.testing.assert_allclose(long.camera_wb, warm.wb, rtol=1e-4)
    rendered = render_srgb(long_path, half_size=True)
    own = simple_isp(pack_bayer(long), long.camera_wb, long.cam_to_srgb).transpose(1, 2, 0)
    other = simple_isp(pack_bayer(long), short.camera_wb, long.cam_to_srgb).transpose(1, 2, 0)
    assert np.abs(rendered - own).mean() < 1e-3
    assert np.abs(rendered - other).mean() > 10 * np.abs(rendered - own).mean()
