"""Ray Serve on a local Ray: the API enhances PNG and DNG uploads for an sRGB and a raw method, refuses
every kind of bad input with its 4xx and a message naming the problem, keeps serving afterwards, and
serve/config.yaml passes Serve's own schema."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from tests.test_raw import _xtrans_dng

REPO = Path(__file__).resolve().parents[1]


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(url: str, name: str, data: bytes, **form) -> requests.Response:
    return requests.post(url + "enhance", files={"file": (name, data)}, data=form, timeout=300)


@pytest.fixture(scope="module")
def files(sample_root) -> dict[str, Path]:
    return {"dng": min((sample_root / "raw").glob("*/short/*.dng")),
            "png": min((sample_root / "lol").glob("eval15/low/*.png"))}


def test_health_and_models(serve_app):
    url, _ = serve_app
    assert requests.get(url + "health", timeout=30).json()["models"] == ["raw-regression", "srgb-lacontrolnet"]
    models = {m["name"]: m for m in requests.get(url + "models", timeout=60).json()}
    assert models["raw-regression"]["method"] == "regression" and models["raw-regression"]["domain"] == "raw"
    assert models["srgb-lacontrolnet"]["options"]["steps"] == 2  # the checkpoint's configured default
    assert "guidance_scale" in models["srgb-lacontrolnet"]["options"]
    assert set(models["raw-regression"]["options"]) == {"seed"}
    assert models["raw-regression"]["metrics"]["val_psnr"] == 20.0
    assert requests.get(url + "openapi.json", timeout=30).json()["paths"]["/enhance"]["post"]


@pytest.mark.parametrize("model,kind", [("raw-regression", "dng"), ("srgb-lacontrolnet", "png")])
def test_enhances_an_upload(serve_app, files, model, kind):
    url, _ = serve_app
    path = files[kind]
    response = _post(url, path.name, path.read_bytes(), model=model, seed="3", ratio="50", steps="2")
    assert response.status_code == 200, response.text
    report = response.json()
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(report["png_base64"]))))
    if kind == "png":
        expected = Image.open(path).size[::-1]
    else:
        import rawpy

        with rawpy.imread(str(path)) as raw:  # a raw method renders the packed planes: half the sensor
            expected = tuple(side // 2 for side in raw.raw_image_visible.shape)
    assert image.shape == (*expected, 3)
    assert report["options"]["seed"] == 3 and report["seconds"] > 0
    if model == "raw-regression":
        assert report["ratio"] == 50 and report["ignored_options"] == ["steps"]
    else:
        assert report["options"]["steps"] == 2 and report["ratio"] is None
    assert 0 <= report["scores"]["brightness"] <= 1 and report["scores"]["noise_sigma"] >= 0
    assert isinstance(report["scores"]["niqe"], (float, str))


def _bad_inputs(files, tmp_path) -> list[tuple[str, dict, int, str]]:
    """(file name, form, expected status, words the message must contain)."""
    png, dng = files["png"].read_bytes(), files["dng"].read_bytes()
    xtrans = _xtrans_dng(tmp_path / "DSCF0001.dng").read_bytes()
    return [
        ("notes.png", {"data": b"this is not an image at all", "model": "srgb-lacontrolnet"}, 400, "notes.png"),
        ("cut.png", {"data": png[: len(png) // 2], "model": "srgb-lacontrolnet"}, 400, "cut.png"),
        ("cut.dng", {"data": dng[: len(dng) // 3], "model": "raw-regression"}, 400, "cut.dng"),
        ("empty.png", {"data": b"", "model": "srgb-lacontrolnet"}, 400, "empty"),
        ("big.png", {"data": _png(800, 600), "model": "srgb-lacontrolnet"}, 413, "480000 pixels"),
        ("huge.png", {"data": b"\0" * 2_100_000, "model": "srgb-lacontrolnet"}, 413, "2000000 bytes"),
        ("DSCF0001.dng", {"data": xtrans, "model": "raw-regression"}, 400, "6x6"),
        ("a.png", {"data": png, "model": "no-such-model"}, 404, "no-such-model"),
        ("a.png", {"data": png, "model": "srgb-lacontrolnet", "steps": "0"}, 422, "steps"),
        ("a.png", {"data": png, "model": "srgb-lacontrolnet", "steps": "500"}, 422, "at most 20"),
        ("a.png", {"data": png, "model": "srgb-lacontrolnet", "color_fix": "sepia"}, 422, "color_fix"),
        ("a.png", {"data": png, "model": "srgb-lacontrolnet", "seed": "-1"}, 422, "seed"),
        ("a.png", {"data": png, "model": "raw-regression"}, 415, "RAW"),
        ("a.dng", {"data": dng, "model": "srgb-lacontrolnet"}, 415, "sRGB"),
        ("a.gif", {"data": png, "model": "srgb-lacontrolnet"}, 415, ".gif"),
    ]


def test_bad_input_gets_its_4xx_and_the_service_keeps_serving(serve_app, files, tmp_path):
    url, _ = serve_app
    good = files["dng"]
    for name, form, status, words in _bad_inputs(files, tmp_path):
        data = form.pop("data")
        response = _post(url, name, data, **form)
        assert response.status_code == status, (name, form, response.text)
        assert words in response.json()["error"], (name, response.json())
        after = _post(url, good.name, good.read_bytes(), model="raw-regression", ratio="20")
        assert after.status_code == 200, (name, after.text)


def test_serve_config_passes_serves_schema_and_names_what_exists():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from lowlight.cli import run_checkpoints
    from lowlight.config import load_config
    from lowlight.serving.settings import ServeArgs

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    args = ServeArgs.model_validate(app.args)
    autoscaling = args.model_deployment.autoscaling_config
    if autoscaling is not None:
        AutoscalingConfig.model_validate(autoscaling)
        assert set(autoscaling) <= set(AutoscalingConfig.model_fields)
    # The checkpoints are the runs `make run` writes (relative to the repository, as `serve deploy` runs).
    assert [m.checkpoint for m in args.models] == [str(p) for p in run_checkpoints()]
    samples = load_config("sample_raw").samples.out
    assert args.ui.examples and all(pattern.startswith(samples + "/") for pattern in args.ui.examples)


def test_serve_command_names_a_missing_checkpoint_and_names_models_after_runs(tmp_path):
    from typer.testing import CliRunner

    from lowlight.cli import app
    from lowlight.serving.settings import models_from_checkpoints

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "no-such-run")])
    assert result.exit_code == 2 and "no-such-run" in result.output
    names = [m.name for m in models_from_checkpoints(["out/runs/a/checkpoint_0000300", "out/runs/a", "s3://b/runs/c/"])]
    assert names == ["a", "a-2", "c"]
