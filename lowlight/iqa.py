"""Image-quality metrics for evaluation: PSNR/SSIM (``metrics.py``) plus pyiqa's. pyiqa's parameter-free
metrics always run; the ones that need weights (LPIPS, NIQE, MUSIQ, MANIQA, CLIP-IQA) run only when the
files are already in the weights folder or the usual caches: loading never downloads (``lowlight weights
--out DIR`` does, on a machine with the internet). A metric that cannot run is reported unavailable with
the reason, never as a number.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

# name: (full-reference?, lower is better)
PARAMETER_FREE = {"nlpd": (True, True), "gmsd": (True, True), "fsim": (True, False), "vif": (True, False),
                  "vsi": (True, False), "piqe": (False, True)}
NEEDS_WEIGHTS = {"lpips": (True, True), "niqe": (False, True), "musiq": (False, False), "maniqa": (False, False),
                 "clipiqa": (False, False)}
DEFAULT_METRICS = ("nlpd", "gmsd", "fsim", "vif", "piqe", "lpips", "niqe", "musiq")


class WeightsMissing(FileNotFoundError):
    pass


@dataclass
class Metric:
    name: str
    full_reference: bool
    lower_better: bool
    compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) NCHW sRGB -> [N]


def use_weights_dir(weights_dir: str | os.PathLike | None) -> None:
    """Point torch hub and pyiqa at ``weights_dir`` (torch hub layout: ``checkpoints/``, ``pyiqa/``)."""
    if weights_dir is None:
        return
    from pyiqa.utils import download_util

    torch.hub.set_dir(str(weights_dir))
    download_util.DEFAULT_CACHE_DIR = str(Path(weights_dir) / "pyiqa")


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Make pyiqa's and torch hub's downloaders load cached files only, raising ``WeightsMissing`` (with
    the file that is needed and where) instead of fetching."""
    from pyiqa.utils import download_util

    original_pyiqa, original_hub = download_util.load_file_from_url, torch.hub.load_state_dict_from_url

    def pyiqa_cached(url, model_dir=None, progress=True, file_name=None):
        path = Path(model_dir or download_util.DEFAULT_CACHE_DIR) / (file_name or os.path.basename(urlparse(url).path))
        if not path.exists():
            raise WeightsMissing(f"needs {path} (from {url})")
        return str(path)

    def hub_cached(url, model_dir=None, *args, file_name=None, **kwargs):
        path = Path(model_dir or Path(torch.hub.get_dir()) / "checkpoints") / (file_name or os.path.basename(urlparse(url).path))
        if not path.exists():
            raise WeightsMissing(f"needs {path} (from {url})")
        return original_hub(url, model_dir, *args, file_name=file_name, **kwargs)

    swaps = [(m, attr, new) for m in list(sys.modules.values()) if m is not None
             for attr, old, new in (("load_file_from_url", original_pyiqa, pyiqa_cached),
                                    ("load_state_dict_from_url", original_hub, hub_cached))
             if getattr(m, attr, None) is old]
    for module, attr, new in swaps:
        setattr(module, attr, new)
    try:
        yield
    finally:
        for module, attr, _ in swaps:
            setattr(module, attr, original_pyiqa if attr == "load_file_from_url" else original_hub)


def lpips_loss_or_none() -> torch.nn.Module | None:
    """pyiqa's LPIPS as a differentiable loss on [0, 1] sRGB images from cached weights, or None when they are
    not there (nothing is downloaded): callers train without it and report so."""
    try:
        import pyiqa

        with no_downloads():
            return pyiqa.create_metric("lpips", as_loss=True)
    except Exception:  # noqa: BLE001 - WeightsMissing, or pyiqa's own errors for an incomplete cache
        return None


def build_metrics(names: list[str] | tuple[str, ...], device: str = "cpu"
                  ) -> tuple[dict[str, Metric], dict[str, str]]:
    """The metrics that can run here, and {name: reason} for those that cannot."""
    import pyiqa

    known = PARAMETER_FREE | NEEDS_WEIGHTS
    metrics, unavailable = {}, {}
    for name in names:
        if name not in known:
            unavailable[name] = f"unknown metric; choose from {sorted(known)}"
            continue
        full_reference, lower_better = known[name]
        try:
            with no_downloads():
                model = pyiqa.create_metric(name, device=device, as_loss=False)
        except Exception as e:  # noqa: BLE001  (pyiqa raises many types when weights or packages are missing)
            unavailable[name] = f"unavailable: {type(e).__name__}: {e}"
            continue
        compute = ((lambda p, t, m=model: m(p, t).flatten()) if full_reference
                   else (lambda p, t, m=model: m(p).flatten()))
        metrics[name] = Metric(name, full_reference, lower_better, compute)
    return metrics, unavailable


def fetch_weights(out: str | os.PathLike) -> dict[str, str]:
    """Download the weighted metrics' files into ``out`` (needs the internet); {name: 'ok' or error}."""
    import pyiqa

    use_weights_dir(out)
    status = {}
    for name in NEEDS_WEIGHTS:
        try:
            pyiqa.create_metric(name, device="cpu")
            status[name] = "ok"
        except Exception as e:  # noqa: BLE001  (report each failure and go on with the others)
            status[name] = f"{type(e).__name__}: {e}"
    return status
