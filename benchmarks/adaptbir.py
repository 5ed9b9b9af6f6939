"""AdaptBIR against its baseline, the latent ControlNet, on the LOL-shaped sample set with the tiny bundle and
one budget, per degradation class.

1. Parquet S (``sample_srgb`` with the fitted tiny VAE ``--vae``): srgb_in, srgb_gt, z_in, z_gt;
2. stage I: the restoration VAE (``stage=vae``), shared by both methods;
3. ``lacontrolnet``: stage II (``stage=controlnet``, k = 0 and w = 0: the plain latent ControlNet on the
   restoration encoder, DiffBIR's pipeline with the VAE as its restorer) for 2 x ``--steps``;
   ``adaptbir``: stage II for ``--steps``, then stage III (the CSFT layers, IQA-adaptive k and w) for
   ``--steps``; every run draws its inputs from the same mix (the low-light input, Real-ESRGAN's and a
   CodeFormer-like chain of the clean image), same batch, learning rate and seed;
4. on the test split's centre crops: the clean image through each fixed-strength chain of
   ``lowlight.data.degrade.LEVELS`` (mild, medium, severe; one seed per level), and the low-light input
   itself; PSNR/SSIM of both methods against srgb_gt (spaced DDPM ``--infer-steps``), the IQA class each
   input got, and paired bootstrap 95 % intervals of adaptbir - lacontrolnet per level.

A run that reached its last step is reused (``--reuse-runs``), so the benchmark resumes.

    .venv/bin/python benchmarks/adaptbir.py [--lol-root DIR] [--steps 150] [--eval-limit 110] [--reuse-runs]
        [--json PATH (default benchmarks/results/adaptbir.json)]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS_DIR,
    add_budget_arguments,
    bootstrap_ci,
    load_at_start,
    machine_info,
    print_table,
    repo_relative,
    srgb_budget_overrides,
    trained_checkpoint,
    write_result,
)

from lowlight import adaptive_quality
from lowlight.checkpoint import load_method
from lowlight.config import load_config
from lowlight.data.degrade import LEVELS, degrade
from lowlight.data.parquet import read_split
from lowlight.data.preprocess import preprocess
from lowlight.methods import EnhanceOptions
from lowlight.metrics import psnr, ssim

CLASSES = ("mild", "medium", "severe")


def train_both(args) -> dict[str, str]:
    base = srgb_budget_overrides(args, args.lol_root)
    data = Path(args.out).resolve() / "parquet-s"
    common = [*base, f"preprocess.output={data}", f"train.data={data}", "method.name=adaptbir",
              f"method.options.steps={args.infer_steps}"]
    preprocess(load_config("sample_srgb", common))

    def run(name: str, stage: str, *extra: str) -> str:
        return trained_checkpoint(load_config("sample_srgb", [*common, f"method.options.stage={stage}", *extra,
                                                              f"train.name=bench-adaptbir-{name}"]), args)

    stage1 = run("vae", "vae")
    plain = ["method.options.quality.adaptive=false", f"model.init_from={stage1}"]
    baseline = run("controlnet-2x", "controlnet", *plain, f"train.steps={2 * args.steps}",
                   f"train.checkpoint_every={2 * args.steps}", f"train.val_every={2 * args.steps}")
    stage2 = run("controlnet", "controlnet", *plain)
    return {"lacontrolnet": baseline, "adaptbir": run("csft", "csft", f"model.init_from={stage2}"), "vae": stage1}


def test_inputs(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """{level: degraded inputs}: each fixed chain of the clean crops (seed = the level's index), and the
    low-light inputs as stored."""
    clean = torch.from_numpy(np.asarray(rows["srgb_gt"], dtype=np.float32))
    inputs = {level: degrade(clean, level, torch.Generator().manual_seed(i)) for i, level in enumerate(LEVELS)}
    inputs["lowlight"] = torch.from_numpy(np.asarray(rows["srgb_in"], dtype=np.float32))
    return inputs


def evaluate(checkpoint: str, inputs: dict[str, torch.Tensor], target: torch.Tensor, args) -> dict:
    """Per level: per-image PSNR and SSIM, and (AdaptBIR) the IQA class of each input."""
    _, method = load_method(checkpoint)
    out = {}
    for level, images in inputs.items():
        scores: dict[str, list] = {"psnr": [], "ssim": [], "classes": []}
        for start in range(0, len(images), args.eval_batch):
            batch = {"srgb_in": images[start:start + args.eval_batch]}
            with torch.no_grad():
                restored = method.enhance(batch, EnhanceOptions(steps=args.infer_steps)).float().clamp(0, 1)
                scores["classes"] += adaptive_quality.classes(method.adaptive(batch)["adapt_w"])
            truth = target[start:start + args.eval_batch]
            scores["psnr"] += [psnr(restored[i:i + 1], truth[i:i + 1]) for i in range(len(restored))]
            scores["ssim"] += [ssim(restored[i:i + 1], truth[i:i + 1]) for i in range(len(restored))]
        out[level] = scores
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench/adaptbir")
    p.add_argument("--lol-root", default="out/samples/lol", help="a LOL-shaped folder (`lowlight samples`)")
    add_budget_arguments(p, eval_batch=8)
    p.add_argument("--json", default=str(RESULTS_DIR / "adaptbir.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = load_at_start()
    started = time.time()
    checkpoints = train_both(args)
    rows = read_split(str(Path(args.out).resolve() / "parquet-s"), "test", ["srgb_in", "srgb_gt"],
                      limit=args.eval_limit)
    inputs = test_inputs(rows)
    target = torch.from_numpy(np.asarray(rows["srgb_gt"], dtype=np.float32))
    scores = {name: evaluate(checkpoints[name], inputs, target, args) for name in ("lacontrolnet", "adaptbir")}
    adapt_cfg, _ = load_method(checkpoints["adaptbir"])
    q = adapt_cfg.method.options["quality"]
    levels = list(inputs)
    result = {
        "psnr": {m: {lv: float(np.mean(s[lv]["psnr"])) for lv in levels} for m, s in scores.items()},
        "ssim": {m: {lv: float(np.mean(s[lv]["ssim"])) for lv in levels} for m, s in scores.items()},
        "adaptbir_minus_lacontrolnet_psnr_ci": {
            lv: bootstrap_ci(np.array(scores["adaptbir"][lv]["psnr"]) - np.array(scores["lacontrolnet"][lv]["psnr"]))
            for lv in levels},
        "iqa_metric": q["metric"], "iqa_thresholds": {"severe": q["severe"], "mild": q["mild"]},
        "iqa_class_shares": {lv: {c: scores["adaptbir"][lv]["classes"].count(c) / len(inputs[lv]) for c in CLASSES}
                             for lv in levels},
        "images_per_level": len(rows["srgb_gt"]),
        "checkpoints": {k: repo_relative(v) for k, v in checkpoints.items()},
        "seconds": round(time.time() - started), "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": machine_info(), "load_at_start": load,
    }
    print_table(["method", *levels], [[m, *(f"{result['psnr'][m][lv]:.2f} / {result['ssim'][m][lv]:.3f}"
                                           for lv in levels)] for m in scores],
                title=f"PSNR / SSIM per degradation level, {result['images_per_level']} test crops each "
                      f"(IQA: {result['iqa_metric']})")
    print(f"wrote {write_result('adaptbir', result, args.json)}")


if __name__ == "__main__":
    main()
