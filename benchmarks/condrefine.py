"""Condition refinement on the LOL-shaped sample set with the tiny bundle, one budget for every run: does
the plug-in move the condition latent towards the ground truth (the paper's Fig. 4 claim), and does its
baseline gain end to end?

1. Parquet S (``sample_srgb`` with the fitted tiny VAE ``--vae``): srgb_in, srgb_gt, z_in, z_gt;
2. the stage-1 restoration: ``regression`` on sRGB pairs (``--restorer`` overrides), trained on S;
3. Parquet S1: S plus its output and latent (``preprocess.pre_restore``: srgb_pre, z_pre);
4. the baseline (``lacontrolnet``) and ``condrefine`` around it, trained on S1 with the same steps, batch,
   learning rate and seed; ``--ablations`` adds every row of ``lowlight/configs/ablations/condrefine.yaml``,
   all with one budget of their own (``--ablation-steps``, the full row retrained at it when it differs from
   ``--steps``) and scored on the first ``--ablation-images`` test crops, each row paired with the full one;
5. on the test split's centre crops: PSNR against srgb_gt of D(l_c), D(l_hat) and D(h_hat[:4]) (the
   latents decoded by the same VAE), and end to end PSNR/SSIM of both methods (DDIM ``--infer-steps``),
   paired per image with a bootstrap 95 % interval.

A run that reached its last step is reused (``--reuse-runs``), so the benchmark resumes.

    .venv/bin/python benchmarks/condrefine.py [--lol-root DIR] [--steps 150] [--ablations]
        [--ablation-steps N] [--ablation-images N] [--reuse-runs]
        [--json PATH (default benchmarks/results/condrefine.json)]
"""

from __future__ import annotations

import argparse
import json
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

from lowlight.ablations import load_ablations
from lowlight.checkpoint import load_method
from lowlight.config import load_config
from lowlight.data.parquet import read_split
from lowlight.data.preprocess import preprocess
from lowlight.methods import EnhanceOptions
from lowlight.metrics import psnr, ssim

EVAL_COLUMNS = ("record_id", "srgb_in", "srgb_gt", "srgb_pre", "z_in", "z_gt", "z_pre")


def run(overrides_: list[str], args) -> str:
    return trained_checkpoint(load_config("sample_srgb", overrides_), args)


def stage1_data(args, base: list[str], restorer: list[str], label: str) -> tuple[str, list[str]]:
    """Train a stage-1 restorer on Parquet S, then write Parquet S1 with its columns; returns the overrides
    that name both."""
    work = Path(args.out).resolve()
    plain = work / "parquet-s"
    preprocess(load_config("sample_srgb", [*base, f"preprocess.output={plain}"]))
    ckpt = run([*base, f"train.data={plain}", "method.name=regression", "method.backbone=nafnet-l4-w8",
                "train.lr=1e-3", *restorer, f"train.name=bench-restorer-{label}"], args)
    data = work / f"parquet-s1-{label}"
    with_stage1 = [*base, f"preprocess.pre_restore={ckpt}", f"preprocess.output={data}", f"train.data={data}"]
    preprocess(load_config("sample_srgb", with_stage1))
    return str(data), with_stage1


def latent_scores(ckpt: str, rows: dict[str, np.ndarray], args) -> dict[str, list[float]]:
    """Per image: PSNR of D(l_c), D(l_hat), D(h_hat[:4]) against srgb_gt."""
    _, method = load_method(ckpt)
    out: dict[str, list[float]] = {"l_c": [], "refined": [], "prior": []}
    for start in range(0, len(rows["record_id"]), args.eval_batch):
        batch = {k: torch.from_numpy(np.asarray(rows[k][start:start + args.eval_batch], dtype=np.float32))
                 for k in EVAL_COLUMNS if k != "record_id"}
        with torch.no_grad():
            refined = method.refine(batch, torch.Generator().manual_seed(0))
            decoded = {"l_c": method.bundle.decode(method.base_condition(batch)),
                       "refined": method.bundle.decode(refined["refined"])}
            if "prior" in refined:
                decoded["prior"] = method.bundle.decode(refined["prior"][:, :batch["z_gt"].shape[1]])
        for name, images in decoded.items():
            out[name] += [psnr(images[i:i + 1], batch["srgb_gt"][i:i + 1]) for i in range(len(images))]
    return out


def end_to_end(ckpt: str, rows: dict[str, np.ndarray], args) -> dict[str, list[float]]:
    ids = [str(r) for r in rows["record_id"]]
    cache = Path(ckpt) / f"bench-eval-{args.infer_steps}-{len(ids)}.json"
    if cache.exists() and json.loads(cache.read_text())["ids"] == ids:
        return json.loads(cache.read_text())["scores"]
    _, method = load_method(ckpt)
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    for start in range(0, len(ids), args.eval_batch):
        batch = {k: torch.from_numpy(np.asarray(rows[k][start:start + args.eval_batch], dtype=np.float32))
                 for k in EVAL_COLUMNS if k != "record_id"}
        with torch.no_grad():
            image = method.enhance(batch, EnhanceOptions(steps=args.infer_steps)).float().clamp(0, 1)
        target = batch["srgb_gt"]
        scores["psnr"] += [psnr(image[i:i + 1], target[i:i + 1]) for i in range(len(image))]
        scores["ssim"] += [ssim(image[i:i + 1], target[i:i + 1]) for i in range(len(image))]
    cache.write_text(json.dumps({"ids": ids, "scores": scores}))
    return scores


def ablation_steps(args) -> int:
    return args.ablation_steps or args.steps


def ablation_runs(args, base: list[str], common: list[str], full: str, data: str) -> dict[str, tuple[str, str]]:
    """Every Table 13 row trained with one budget (``--ablation-steps``): {row: (checkpoint, its stage-1
    Parquet)}, a row with its own restoration network scored on that network's outputs; the full row is the
    main run when that budget is the main one."""
    steps = ablation_steps(args)
    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.val_every={steps}"]
    suffix = "" if steps == args.steps else f"-s{steps}"
    checkpoints = {"full": (full, data)} if not suffix else {}
    if not args.ablations:
        return checkpoints
    for name, row in load_ablations("condrefine").items():
        if name in checkpoints:
            continue
        sets, row_data = common, data
        if row.restorer:
            row_data, sets = stage1_data(args, base, row.restorer, name)
            sets = [*sets, f"method.options.steps={args.infer_steps}"]
        checkpoints[name] = (run([*sets, *budget, "method.name=condrefine", *row.diffusion,
                                  f"train.name=bench-condrefine-{name}{suffix}"], args), row_data)
    return checkpoints


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench/condrefine")
    p.add_argument("--lol-root", default="out/samples/lol", help="a LOL-shaped folder (`lowlight samples`)")
    add_budget_arguments(p, eval_batch=8)
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--ablation-steps", type=int, default=None, help="the ablation rows' budget (default --steps)")
    p.add_argument("--ablation-images", type=int, default=None, help="test crops scoring the ablation rows")
    p.add_argument("--json", default=str(RESULTS_DIR / "condrefine.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = load_at_start()
    started = time.time()
    base = srgb_budget_overrides(args, args.lol_root)
    data, with_stage1 = stage1_data(args, base, [], "default")
    common = [*with_stage1, "method.options.steps=" + str(args.infer_steps)]
    checkpoints = {"baseline": run([*common, "method.name=lacontrolnet", "train.name=bench-lacontrolnet"], args),
                   "condrefine": run([*common, "method.name=condrefine", "train.name=bench-condrefine-full"], args)}
    ablation_runs_ = ablation_runs(args, base, common, checkpoints["condrefine"], data)
    rows = read_split(data, "test", list(EVAL_COLUMNS), limit=args.eval_limit)
    latents = latent_scores(checkpoints["condrefine"], rows, args)
    e2e = {name: end_to_end(ckpt, rows, args) for name, ckpt in checkpoints.items()}
    subset = {k: v[:args.ablation_images] for k, v in rows.items()}
    ablation_scores = {name: end_to_end(ckpt, subset if row_data == data else
                                        read_split(row_data, "test", list(EVAL_COLUMNS), limit=args.ablation_images),
                                        args)
                       for name, (ckpt, row_data) in ablation_runs_.items()}
    ablations = {name: {m: float(np.mean(v)) for m, v in scores.items()} for name, scores in ablation_scores.items()}
    _, refined_method = load_method(checkpoints["condrefine"])
    result = {
        "latent_psnr": {k: float(np.mean(v)) for k, v in latents.items() if v},
        "psnr": {k: float(np.mean(v["psnr"])) for k, v in e2e.items()},
        "ssim": {k: float(np.mean(v["ssim"])) for k, v in e2e.items()},
        "ablations": ablations, "extra_params": refined_method.extra_parameters(),
        "ablation_minus_full_psnr_ci": {
            name: bootstrap_ci(np.array(scores["psnr"]) - np.array(ablation_scores["full"]["psnr"]))
            for name, scores in ablation_scores.items() if name != "full"},
        "ablation_budget": {"steps": ablation_steps(args), "images": len(subset["record_id"])},
        "refined_minus_l_c_psnr_ci": bootstrap_ci(np.array(latents["refined"]) - np.array(latents["l_c"])),
        "condrefine_minus_baseline_psnr_ci": bootstrap_ci(np.array(e2e["condrefine"]["psnr"])
                                                          - np.array(e2e["baseline"]["psnr"])),
        "images": len(rows["record_id"]),
        "checkpoints": {k: repo_relative(v) for k, v in checkpoints.items()}
        | {name: repo_relative(ckpt) for name, (ckpt, _) in ablation_runs_.items()},
        "seconds": round(time.time() - started), "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": machine_info(), "load_at_start": load,
    }
    print_table(["latent", "PSNR vs target"], [[k, f"{v:.2f}"] for k, v in result["latent_psnr"].items()],
                title=f"decoded latents, {result['images']} test crops")
    print_table(["run", "PSNR", "SSIM"], [[k, f"{v['psnr']:.2f}", f"{v['ssim']:.4f}"] for k, v in ablations.items()]
                + [["baseline", f"{result['psnr']['baseline']:.2f}", f"{result['ssim']['baseline']:.4f}"]],
                title="end to end")
    print(f"wrote {write_result('condrefine', result, args.json)}")


if __name__ == "__main__":
    main()
