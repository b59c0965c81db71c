"""`evaluation speed`: time per denoising step, time per image and peak memory of several models at the same
batch size, prompts and step count, with ratios to the guided teacher (the seed's Figures 3-4 and 8-9).

Times: all models are loaded in one process and timed interleaved, in turns of one batch each in rotating order
(A, B, C, then B, C, A, ...: `evaluation.timing.Turns`), one warm-up turn then `repeats` timed turns, so a load
on the machine that comes and goes hits every model alike; a model's seconds per batch is the median of its
turns, and each time ratio also gets the median, min and max of its per-turn ratios. CUDA: synchronised wall
time; CPU: wall time.

Memory: each model in a fresh process (no model inherits another's allocator pages or peak RSS), a warm-up and
one run. CUDA: `max_memory_allocated` above what the loaded model holds. CPU: the growth of peak RSS over the
runs above the RSS after loading (Linux: VmHWM reset via clear_refs).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from evaluation.models import ModelSpec
from evaluation.render import Renderer
from evaluation.report import markdown_table
from evaluation.timing import Turns, ratio

MB = 2**20
MEMORY_REPEATS = 1  # runs after the warm-up in a memory process: its times are not the ones reported
TURN_SECONDS = "seconds_per_batch_by_turn"  # a model's seconds per batch in each timed turn, in turn order


def rss(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (VmRSS now, VmHWM the peak), None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Linux: the peak RSS (VmHWM) restarts from the current RSS; False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of a block above the level at its start."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def level(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else rss("VmRSS")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.resettable = self.cuda or reset_peak_rss()
        self.start = self.level()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = rss("VmHWM") if self.resettable else None
        self.peak_growth = None if peak is None or self.start is None else max(peak - self.start, 0)


def count_unet_rows(unet) -> list[int]:
    rows: list[int] = []
    unet.register_forward_pre_hook(lambda _m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    return rows


def measure(spec: ModelSpec, prompts: list[str], steps: int, repeats: int, dtype: str, device, clip_model=None,
            clip_weights=None) -> dict:
    """Load one model, then run it 1 + `repeats` times (the first is a warm-up, not timed); the memory probe
    covers all runs, so on a CPU the first run's new pages count. Meant to run in a fresh process: `measure_all`
    keeps its memory, UNet passes and step count, and replaces its times with interleaved ones."""
    probe = MemoryProbe(torch.device(device))
    before_load = probe.level()
    renderer = Renderer(spec, steps, dtype, device, clip_model or "ViT-g-14", clip_weights)
    loaded = probe.level()
    rows = count_unet_rows(renderer.unet)
    seeds = list(range(len(prompts)))
    times = []
    with probe:
        renderer.latents(prompts, seeds)  # warm-up
        rows.clear()
        for _ in range(repeats):
            if probe.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            renderer.latents(prompts, seeds)
            if probe.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    batch_seconds = statistics.median(times)
    steps = renderer.steps  # 1 for a one-step generator, whatever was asked
    result = {
        "label": spec.label, "kind": spec.kind, "guidance_scale": spec.guidance_scale,
        "batch_size": len(prompts), "steps": steps,
        "seconds_per_image": batch_seconds / len(prompts), "seconds_per_step": batch_seconds / steps,
        "unet_passes_per_step": sum(rows) / (repeats * len(prompts) * steps),
        "peak_memory_mb": None if probe.peak_growth is None else probe.peak_growth / MB,
        "model_memory_mb": None if None in (before_load, loaded) else (loaded - before_load) / MB,
        "backward_per_step": spec.kind == "teacher-classifier",
    }
    del renderer
    gc.collect()
    if probe.cuda:
        torch.cuda.empty_cache()
    return result


def measure_in_fresh_process(spec: ModelSpec, prompts: list[str], steps: int, repeats: int, dtype: str, device,
                             clip_model=None, clip_weights=None) -> dict:
    """`measure` in a new Python process, so that no model inherits another's allocator pages or peak RSS."""
    job = {"spec": {k: v for k, v in spec.to_dict().items() if k != "label"}, "prompts": prompts, "steps": steps,
           "repeats": repeats, "dtype": dtype, "device": str(device), "clip_model": clip_model,
           "clip_weights": clip_weights}
    done = subprocess.run([sys.executable, "-m", "evaluation.speed", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {spec.label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_seconds(contenders: dict[str, Callable[[], object]], repeats: int,
                        synchronize: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender over `repeats` turns in rotating order, after one warm-up turn (run in
    the first turn's order, then dropped)."""
    turns = Turns(contenders, synchronize)
    for _ in range(1 + repeats):
        turns.run()
    return {name: seconds[1:] for name, seconds in turns.seconds.items()}


def time_interleaved(specs: list[ModelSpec], prompts: list[str], steps: int, repeats: int, dtype: str, device,
                     clip_model=None, clip_weights=None) -> list[list[float]]:
    """Load every model in this process, then time one batch of each per turn: each model's seconds per batch in
    every timed turn, in the order of `specs`."""
    seeds = list(range(len(prompts)))
    renderers = [Renderer(spec, steps, dtype, device, clip_model or "ViT-g-14", clip_weights) for spec in specs]
    contenders = {str(i): partial(r.latents, prompts, seeds) for i, r in enumerate(renderers)}
    cuda = torch.device(device).type == "cuda"
    seconds = interleaved_seconds(contenders, repeats, torch.cuda.synchronize if cuda else None)
    del renderers, contenders
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return [seconds[str(i)] for i in range(len(specs))]


def with_turn_seconds(result: dict, seconds: list[float]) -> dict:
    """A fresh-process result with its times replaced by the interleaved turns' (the median batch)."""
    batch_seconds = statistics.median(seconds)
    return {**result, TURN_SECONDS: seconds, "seconds_per_image": batch_seconds / result["batch_size"],
            "seconds_per_step": batch_seconds / result["steps"]}


def measure_all(specs: list[ModelSpec], prompts: list[str], steps: int, repeats: int, dtype: str, device,
                clip_model=None, clip_weights=None) -> list[dict]:
    """Memory (and UNet passes) of each model in a fresh process, first, while this one holds no model; then the
    times of all of them interleaved in this process; with ratios to the teachers."""
    options = dict(dtype=dtype, device=device, clip_model=clip_model, clip_weights=clip_weights)
    results = [measure_in_fresh_process(spec, prompts, steps, MEMORY_REPEATS, **options) for spec in specs]
    times = time_interleaved(specs, prompts, steps, repeats, **options)
    return add_ratios([with_turn_seconds(result, seconds) for result, seconds in zip(results, times)])


def _child(job: dict) -> None:
    spec = job.pop("spec")
    spec = ModelSpec(**{**spec, "folder": Path(spec["folder"])})
    print(json.dumps(measure(spec, **job)))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))


def add_ratios(results: list[dict]) -> list[dict]:
    """Time per image and peak memory over the CFG-guided teacher's and over the classifier-guided teacher's,
    where present (per image, so a one-step generator compares with an N-step teacher as a user sees it). Where
    both have interleaved turns, each time ratio gets `_median`, `_min` and `_max`: of the per-turn ratios (the
    model's seconds in turn k over the teacher's in turn k)."""
    references = {
        "cfg": next((r for r in results if r["kind"] == "teacher" and r["guidance_scale"] != 1), None),
        "classifier": next((r for r in results if r["kind"] == "teacher-classifier"), None),
    }
    for result in results:
        for name, ref in references.items():
            if ref is None:
                continue
            result[f"time_over_{name}_teacher"] = result["seconds_per_image"] / ref["seconds_per_image"]
            result.update(turn_ratio_spread(f"time_over_{name}_teacher", result, ref))
            if result["peak_memory_mb"] and ref["peak_memory_mb"]:
                result[f"memory_over_{name}_teacher"] = result["peak_memory_mb"] / ref["peak_memory_mb"]
    return results


def turn_ratio_spread(field: str, result: dict, ref: dict) -> dict:
    """`field`_median, _min and _max of the per-turn time ratios of `result` over `ref` (none without turns):
    `evaluation.timing.ratio` with one block per turn (every model renders the same batch, so per batch is per
    image). The ratio of the medians, `field`, lies between min and max; the reference's own are all exactly 1."""
    if TURN_SECONDS not in result or TURN_SECONDS not in ref:
        return {}
    spread = ratio(result[TURN_SECONDS], ref[TURN_SECONDS], blocks=len(ref[TURN_SECONDS]), skip=0)
    return {f"{field}_median": spread.median, f"{field}_min": spread.low, f"{field}_max": spread.high}


def format_table(results: list[dict]) -> list[str]:
    columns = ["label", "unet_passes_per_step", "seconds_per_step", "seconds_per_image", "peak_memory_mb",
               "time_over_cfg_teacher", "time_over_cfg_teacher_min", "time_over_cfg_teacher_max",
               "memory_over_cfg_teacher", "time_over_classifier_teacher", "time_over_classifier_teacher_min",
               "time_over_classifier_teacher_max", "memory_over_classifier_teacher"]
    columns = [c for c in columns if any(c in r for r in results)]
    return markdown_table(columns, [[r.get(c) for c in columns] for r in results])


def bar_chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in results]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(labels) + 1.5))
    axes[0].barh(labels, [r["seconds_per_image"] * 1000 for r in results], color="tab:blue")
    axes[0].set_xlabel("ms per image (batched)")
    axes[1].barh(labels, [r["peak_memory_mb"] or 0 for r in results], color="tab:orange")
    axes[1].set_xlabel("peak memory above the loaded model (MiB)")
    axes[1].set_yticklabels([])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
