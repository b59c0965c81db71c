"""`evaluation speed`: time per denoising step, time per image and peak memory of several models, measured
one after another in one process at the same batch size, prompts and step count, with ratios to the guided
teacher (the seed's Figures 3-4 and 8-9).

Each model is measured in a fresh process. CUDA: CUDA-synchronised wall time, `max_memory_allocated` above what
the loaded model holds. CPU: wall time, and the growth of peak RSS over the runs above the RSS after loading
(Linux: VmHWM reset via clear_refs).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from evaluation.models import ModelSpec
from evaluation.render import Renderer
from evaluation.report import markdown_table

MB = 2**20


def _rss(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
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
        return torch.cuda.memory_allocated() if self.cuda else _rss("VmRSS")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.resettable = self.cuda or _reset_peak_rss()
        self.start = self.level()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss("VmHWM") if self.resettable else None
        self.peak_growth = None if peak is None or self.start is None else max(peak - self.start, 0)


def count_unet_rows(unet) -> list[int]:
    rows: list[int] = []
    unet.register_forward_pre_hook(lambda _m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    return rows


def measure(spec: ModelSpec, prompts: list[str], steps: int, repeats: int, dtype: str, device, clip_model=None,
            clip_weights=None) -> dict:
    """Load one model, then run it 1 + `repeats` times (the first is a warm-up, not timed); the memory probe
    covers all runs, so on a CPU the first run's new pages count. Meant to run in a fresh process."""
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


def _child(job: dict) -> None:
    spec = job.pop("spec")
    spec = ModelSpec(**{**spec, "folder": Path(spec["folder"])})
    print(json.dumps(measure(spec, **job)))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))


def add_ratios(results: list[dict]) -> list[dict]:
    """Time per image and peak memory over the CFG-guided teacher's and over the classifier-guided teacher's,
    where present (per image, so a one-step generator compares with an N-step teacher as a user sees it)."""
    references = {
        "cfg": next((r for r in results if r["kind"] == "teacher" and r["guidance_scale"] != 1), None),
        "classifier": next((r for r in results if r["kind"] == "teacher-classifier"), None),
    }
    for result in results:
        for name, ref in references.items():
            if ref is None:
                continue
            result[f"time_over_{name}_teacher"] = result["seconds_per_image"] / ref["seconds_per_image"]
            if result["peak_memory_mb"] and ref["peak_memory_mb"]:
                result[f"memory_over_{name}_teacher"] = result["peak_memory_mb"] / ref["peak_memory_mb"]
    return results


def format_table(results: list[dict]) -> list[str]:
    columns = ["label", "unet_passes_per_step", "seconds_per_step", "seconds_per_image", "peak_memory_mb",
               "time_over_cfg_teacher", "memory_over_cfg_teacher", "time_over_classifier_teacher",
               "memory_over_classifier_teacher"]
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
