"""The evaluation report: one self-contained HTML file (images and plots inlined, opens without a server)
and a Markdown summary next to it. Methods are rows, metrics columns, the best value of each column in
bold; an image grid (input, each method, ground truth, each with a zoomed centre crop); a
fidelity-perception scatter; seconds per image and peak memory per method; the protocol.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the headless backend
import numpy as np
from PIL import Image

from lowlight.iqa import NEEDS_WEIGHTS, PARAMETER_FREE

# Direction of every column the evaluation can write (True: lower is better).
LOWER_BETTER = {"psnr_raw": False, "ssim_raw": False, "psnr_raw_ls": False, "ssim_raw_ls": False,
                "psnr_srgb": False, "ssim_srgb": False, "seconds_per_image": True, "peak_rss_mb": True}
LOWER_BETTER |= {name: lower for name, (_, lower) in (PARAMETER_FREE | NEEDS_WEIGHTS).items()}
PERCEPTUAL_ORDER = ("lpips", "niqe", "musiq", "piqe", "nlpd")  # the scatter's y axis: the first one present
ZOOM = 4  # the zoomed crop is the centre 1/ZOOM of each side


def file_stem(row_id: str) -> str:
    """A row id (e.g. ``Sony/10001_00_0.1s#0``) as a file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in row_id)


def columns_of(models: list[dict]) -> list[str]:
    seen = []
    for model in models:
        seen += [k for k in model["mean"] if k not in seen]
    return seen


def value_of(model: dict, column: str):
    """A metric's mean, or a per-model figure (seconds per image, peak memory)."""
    return model["mean"].get(column, model.get(column))


def best_values(models: list[dict], columns: list[str]) -> dict[str, float]:
    best = {}
    for column in columns:
        values = [v for v in (value_of(m, column) for m in models) if isinstance(v, float)]
        if values:
            best[column] = min(values) if LOWER_BETTER.get(column, False) else max(values)
    return best


def cell(value, best: float | None) -> tuple[str, str]:
    """(markdown, html) of one number, bold when it is the column's best."""
    if not isinstance(value, float):
        return "-", "-"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    if best is not None and np.isclose(value, best) and np.isfinite(value):
        return f"**{text}**", f"<b>{text}</b>"
    return text, text


def table(models: list[dict]) -> tuple[str, str]:
    columns = columns_of(models)
    extra = ["seconds_per_image", "peak_rss_mb"]
    best = best_values(models, columns + extra)
    head = ["method", "model", *columns, "s / image", "peak MB"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows_html = []
    for m in models:
        cells = [cell(value_of(m, c), best.get(c)) for c in columns + extra]
        md.append("| " + " | ".join([m["method"], m["model"], *(c[0] for c in cells)]) + " |")
        rows_html.append("<tr><td>" + "</td><td>".join([html.escape(m["method"]), html.escape(m["model"]),
                                                         *(c[1] for c in cells)]) + "</td></tr>")
    arrows = [f"{c} {'↓' if LOWER_BETTER.get(c) else '↑'}" for c in columns]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["method", "model", *arrows, "s / image ↓", "peak MB ↓"])
    return "\n".join(md), f"<table id='scores'><thead><tr>{header}</tr></thead><tbody>{''.join(rows_html)}</tbody></table>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def zoomed(png: bytes) -> bytes:
    image = Image.open(io.BytesIO(png))
    w, h = image.size
    box = (w // 2 - w // (2 * ZOOM), h // 2 - h // (2 * ZOOM), w // 2 + w // (2 * ZOOM), h // 2 + h // (2 * ZOOM))
    buf = io.BytesIO()
    image.crop(box).resize((w, h), Image.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def image_grid(summary: dict, out: Path) -> str:
    models = summary["models"]
    row_ids = sorted({i for m in models for i in m["previews"]})
    reference = out / "images" / "reference"
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["input", *(m["model"] for m in models), "ground truth"])
    rows = []
    for row_id in row_ids:
        paths = [reference / f"{file_stem(row_id)}-input.png",
                 *(out / m["previews"][row_id] if row_id in m["previews"] else None for m in models),
                 reference / f"{file_stem(row_id)}-target.png"]
        cells = []
        for path in paths:
            if path is None or not path.exists():
                cells.append("<td>-</td>")
                continue
            png = path.read_bytes()
            cells.append(f"<td><img src='{data_uri(png)}' alt='{path.name}'><br>"
                         f"<img class='zoom' src='{data_uri(zoomed(png))}' alt='zoom {path.name}'></td>")
        rows.append(f"<tr><th>{html.escape(row_id)}</th>{''.join(cells)}</tr>")
    return f"<table id='grid'><thead><tr><th></th>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def scatter(models: list[dict]) -> tuple[bytes, str] | None:
    """PSNR (sRGB) against the first perceptual metric every model has; None when there is none."""
    perceptual = next((p for p in PERCEPTUAL_ORDER if all(p in m["mean"] for m in models)), None)
    if perceptual is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for m in models:
        ax.scatter(m["mean"]["psnr_srgb"], m["mean"][perceptual], s=40)
        ax.annotate(m["model"], (m["mean"]["psnr_srgb"], m["mean"][perceptual]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("PSNR sRGB (dB) →")
    ax.set_ylabel(f"{perceptual} {'(lower is better)' if LOWER_BETTER.get(perceptual) else '(higher is better)'}")
    ax.set_title("fidelity vs perception")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), perceptual


def protocol(summary: dict) -> list[str]:
    s = summary["settings"]
    ls_note = ("; `*_raw_ls`: after the least-squares brightness fit to the ground truth (ExposureDiffusion's "
               "protocol; it reads the answer)") if s["ls_correction"] else ""
    lines = [(f"data: `{summary['data']}`, split `{summary['split']}`; each row is one image (a centre crop or "
              "grid tile, as preprocessing wrote it), values in [0, 1], no border crop"),
             "raw methods: PSNR/SSIM on the packed Bayer planes (`psnr_raw`, `ssim_raw`)" + ls_note,
             ("sRGB: every output rendered (raw methods with each row's white balance and colour matrix) and "
              "scored against the rendered ground truth; SSIM with an 11x11 Gaussian window, sigma 1.5"),
             (f"inference: seed {s['seed']}, options {s['options'] or 'the checkpoint defaults'}; seconds per "
              "image are the model's forward time per row; peak MB is the scoring actor's peak resident memory")]
    lines += [f"`{name}`: {reason}" for name, reason in summary.get("unavailable", {}).items()]
    lines += [f"`{m['model']}`: {', '.join(m['failed'])} could not be computed on these images (too small for "
              "the metric's filters)" for m in summary["models"] if m.get("failed")]
    return lines


def write_report(summary: dict, out: Path) -> tuple[Path, Path]:
    md_table, html_table = table(summary["models"])
    plot = scatter(summary["models"])
    plot_html = (f"<h2>Fidelity and perception</h2><img id='scatter' src='{data_uri(plot[0])}' alt='scatter'>"
                 if plot else "")
    if plot:
        (out / "scatter.png").write_bytes(plot[0])
    notes = protocol(summary)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lowlight evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;}} table{{border-collapse:collapse;margin:1em 0;}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;}} #grid img{{width:160px;image-rendering:pixelated;}}
#grid td{{text-align:center;}}</style></head><body>
<h1>Evaluation</h1>{html_table}
<h2>Images</h2><p>Each cell: the image, and below it the centre 1/{ZOOM} enlarged.</p>{image_grid(summary, out)}
{plot_html}
<h2>Protocol</h2><ul>{''.join(f'<li>{html.escape(line)}</li>' for line in notes)}</ul></body></html>"""
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page)
    md = ["# Evaluation", "", md_table, "", "Best value of each column in bold.", ""]
    if plot:
        md += [f"![fidelity vs perception (PSNR sRGB against {plot[1]})](scatter.png)", ""]
    md += ["## Protocol", "", *(f"- {line}" for line in notes), "", "Images: `report.html`."]
    md_path.write_text("\n".join(md) + "\n")
    return html_path, md_path
