"""Black and white levels pinned per camera, where the datasets' released code does not use LibRaw's.

LibRaw reports a black and white level per file; for some cameras the released SID/ELD code
normalises with fixed values instead (LibRaw's white for compressed Sony ARW, and Canon's
ISO-dependent white, are not what those papers divided by). Reading such a camera's files with
the pinned values makes packed raw data match the released pipelines. Every value here is read
from the cited file; a camera that is not listed keeps LibRaw's per-file values.

Sources:
- SID, github.com/cchen156/Learning-to-See-in-the-Dark, ``test_Sony.py``/``train_Sony.py``
  ``pack_raw``: ``np.maximum(im - 512, 0) / (16383 - 512)`` (Sony A7S2, compressed ARW).
- ELD, github.com/Vandermode/ELD, ``dataset/sid_dataset.py`` ``pack_raw_bayer``:
  ``white_point = 16383`` with the file's ``black_level_per_channel``, for every camera of
  ``test_ELD.py`` (CanonEOS5D4, CanonEOS70D, CanonEOS700D, NikonD850, SonyA7S2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PinnedLevels:
    """Fixed levels for one camera model."""

    camera: str
    models: tuple[str, ...]  # EXIF Model, Make + Model or DNG UniqueCameraModel spellings
    white_level: float
    black_level: float | None = None  # None keeps the file's per-channel black level

    def matches(self, names: tuple[str, ...]) -> bool:
        wanted = {_normalise(m) for m in self.models}
        return any(_normalise(name) in wanted for name in names)


PINNED_LEVELS = (
    PinnedLevels("Sony A7S2", ("ILCE-7SM2", "Sony ILCE-7SM2"), white_level=16383, black_level=512),
    PinnedLevels("Nikon D850", ("NIKON D850", "NIKON CORPORATION NIKON D850"), white_level=16383),
    PinnedLevels("Canon EOS 70D", ("Canon EOS 70D",), white_level=16383),
    PinnedLevels("Canon EOS 700D", ("Canon EOS 700D",), white_level=16383),
    PinnedLevels("Canon EOS 5D Mark IV", ("Canon EOS 5D Mark IV",), white_level=16383),
)


def _normalise(name: str) -> str:
    # EXIF spellings differ in case, spaces and dashes ("ILCE-7SM2", "Sony ILCE 7SM2")
    return re.sub(r"[^a-z0-9]", "", name.lower())


def pinned_levels(names: tuple[str, ...]) -> PinnedLevels | None:
    """The pinned levels of the first camera any of ``names`` identifies, or None."""
    names = tuple(n for n in names if n)
    return next((entry for entry in PINNED_LEVELS if entry.matches(names)), None)
