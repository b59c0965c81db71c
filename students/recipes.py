"""The stock schedulers under which diffusers' pipelines sample a student exactly as our samplers do.

Each is (class, settings over the teacher's scheduler config). A student folder is written with one
(`use_scheduler`), and the code that distillation.json records sets it too (`scheduler_code`), because a LoRA
student's `pipe` is its base's pipeline, with the base's scheduler. tests/test_stock_diffusers.py runs that code.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

# grid_ddim's grid (diffusion.samplers.step_grid) when N divides the train timesteps: DDIM's step from t goes to
# t - T // N, then to alphabar = 1.
TRAILING_DDIM = (DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": True})
# grid_ddim for any N: DPM-Solver++ of order 1 is DDIM's step between the points of its grid, the same trailing
# points, down to sigma 0; it starts from z itself (init_noise_sigma 1).
TRAILING_DPM_SOLVER_1 = (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "solver_order": 1})
# sid_one_step with timesteps=[t_init]: trailing Euler's init_noise_sigma is sigma_t/a_t, so the UNet sees
# (sigma_t/a_t) z scaled by a_t = sigma_t z, and one Euler step to sigma 0 (eps read in the teacher's prediction
# type, as the generator was trained) lands on x0 = (z_t - sigma_t eps)/a_t.
TRAILING_EULER = (EulerDiscreteScheduler, {"timestep_spacing": "trailing"})
# The pipeline's z for one prompt, as `evaluation generate --seed seed` draws it (diffusion.samplers.initial_noise).
SEEDED = "generator=torch.Generator().manual_seed(seed)"


def use_scheduler(folder: Path, scheduler_class: type, settings: dict) -> None:
    """Rewrite a pipeline folder's scheduler as `scheduler_class` with its config and `settings` (its
    scheduler_config.json and model_index.json's entry), so that from_pretrained builds exactly that scheduler."""
    folder = Path(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class.from_config({**config, **settings}).save_config(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler_class.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def scheduler_code(scheduler_class: type, settings: dict) -> str:
    """The line that gives a loaded `pipe` this scheduler."""
    arguments = "".join(f", {key}={value!r}" for key, value in settings.items())
    return f"pipe.scheduler = {scheduler_class.__name__}.from_config(pipe.scheduler.config{arguments})"


def scheduler_entry(scheduler: tuple[type, dict]) -> dict:
    """How distillation.json's inference recipe names a stock scheduler: {"class": NAME, **settings}."""
    return {"class": scheduler[0].__name__, **scheduler[1]}


def use_recorded_scheduler(folder: Path, inference: dict) -> None:
    """Give a pipeline folder the scheduler its recipe names (none named: the base's own stays)."""
    if entry := inference.get("scheduler"):
        settings = {k: v for k, v in entry.items() if k != "class"}
        classes = {c.__name__: c for c in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)}
        use_scheduler(folder, classes[entry["class"]], settings)
