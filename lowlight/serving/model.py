"""The model deployment: one checkpoint, loaded once per replica, enhancing requests in batches.

Concurrent requests whose inputs have the same shape and options are stacked into one batch
(``@serve.batch``); the others in the same wait window run one group after another. Progress (steps
done) is written to a named ``ProgressBoard`` actor the UI reads, since the replica that runs a request
is not the one a UI poll would reach.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import ray
from ray import serve

from lowlight import quality
from lowlight.checkpoint import read_metrics
from lowlight.data.images import encode_png
from lowlight.enhance import Enhancer, Prepared
from lowlight.methods import EnhanceOptions
from lowlight.serving.requests import Refusal, Upload, check_pixels, check_upload, options_for, parse_params
from lowlight.serving.settings import Batching, Limits, ModelEntry

PROGRESS_BOARD = "lowlight-progress"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """request id -> (steps done, steps in all)."""

    def __init__(self):
        self.state: dict[str, tuple[int, int]] = {}

    def update(self, request_id: str, done: int, total: int) -> None:
        self.state[request_id] = (done, total)

    def get(self, request_id: str) -> tuple[int, int] | None:
        return self.state.get(request_id)

    def forget(self, request_id: str) -> None:
        self.state.pop(request_id, None)


def progress_board():
    return ProgressBoard.options(name=PROGRESS_BOARD, namespace="lowlight", get_if_exists=True,
                                 lifetime="detached").remote()


@dataclass
class Job:
    prepared: Prepared
    opts: EnhanceOptions
    request_id: str | None

    def group_key(self) -> tuple:
        o = self.opts
        return self.prepared.shape_key(), (o.steps, o.seed, o.guidance_scale, o.tile, o.color_fix)


@serve.deployment
class EnhanceModel:
    def __init__(self, entry: dict, limits: dict, batching: dict, endpoint_url: str | None = None):
        self.entry, self.limits = ModelEntry(**entry), Limits(**limits)
        self.enhancer = Enhancer(self.entry.checkpoint, endpoint_url=endpoint_url)
        batching = Batching(**batching)
        self.run_batch.set_max_batch_size(batching.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.board = progress_board()
        self.batch_sizes: Counter[int] = Counter()

    def info(self) -> dict:
        method, cfg = self.enhancer.method, self.enhancer.cfg
        metrics = {k: v for k, v in read_metrics(self.enhancer.directory).items() if k.startswith(("val_", "step"))}
        return {"name": self.entry.name, "method": method.name, "domain": cfg.method.domain,
                "input": "RAW file" if cfg.method.domain == "raw" else "sRGB image",
                "backbone": cfg.method.backbone, "checkpoint": str(self.enhancer.directory),
                "metrics": metrics, "options": {"seed": 0, **method.enhance_defaults()}}

    async def enhance(self, data: bytes, filename: str, params: dict, request_id: str | None = None,
                      with_input: bool = False) -> dict:
        """{"ok": True, "png", "input_png" (with_input), "report"} or {"ok": False, "status", "error"}:
        refusals travel as values, so the ingress never has to unwrap a remote exception."""
        tick = time.perf_counter()
        try:
            parsed = parse_params(params, self.limits)
            upload = Upload(data, filename)
            check_upload(upload, self.enhancer.cfg.method.domain, self.entry.name, self.limits)
            opts, used, ignored = options_for(parsed, set(self.enhancer.method.enhance_defaults()))
            try:
                prepared = await asyncio.to_thread(self.enhancer.prepare, data, filename, parsed.ratio)
            except ValueError as e:
                raise Refusal(400, str(e)) from None
            check_pixels(filename, prepared.height * prepared.width, self.limits)
            image = await self.run_batch(Job(prepared, opts, request_id))
        except Refusal as r:
            return {"ok": False, "status": r.status, "error": r.message}
        report = {"model": self.entry.name, "method": self.enhancer.method.name, "options": used,
                  "ignored_options": ignored, "ratio": prepared.ratio, "width": image.shape[1],
                  "height": image.shape[0], "scores": quality.scores(image)}
        out = {"ok": True, "png": encode_png(image, bits=8), "report": report}
        if with_input:
            out["input_png"] = encode_png(self.enhancer.input_preview(prepared), bits=8)
        report["seconds"] = time.perf_counter() - tick
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def run_batch(self, jobs: list[Job]) -> list:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[job.group_key()].append(index)
        results: list = [None] * len(jobs)
        for members in groups.values():
            group = [jobs[i] for i in members]
            opts = group[0].opts
            opts.progress = self.progress_reporter([job.request_id for job in group if job.request_id])
            self.batch_sizes[len(group)] += 1
            images = await asyncio.to_thread(self.enhancer.run, [job.prepared for job in group], opts)
            for i, image in zip(members, images, strict=True):
                results[i] = image
        return results

    def progress_reporter(self, request_ids: list[str]):
        if not request_ids:
            return None

        def report(done: int, total: int) -> None:
            for request_id in request_ids:
                self.board.update.remote(request_id, done, total)
        return report

    def stats(self) -> dict:
        """How many batches of each size this replica ran (does batching happen?)."""
        return {"pid": os.getpid(), "batch_sizes": dict(self.batch_sizes)}
