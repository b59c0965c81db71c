"""How every rank writes and reads a checkpoint (the only distributed part of checkpoints), for any loop: a
checkpoint holds named parts (modules, optimizers, EMA, schedules) and the loop's own counters."""

from __future__ import annotations

import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion.errors import UserError
from trainer.checkpoint import (
    CHECKPOINTS, DamagedCheckpoint, check_marker, check_state, check_weights, checkpoint_dir, load_state, load_weights,
    prune_checkpoints, read_state, resume_candidates, rng_state, save_state, save_weights, set_rng_state, write_marker,
)

RECENT_LOSSES = 100


@dataclass
class TrainState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    recent_losses: deque = field(default_factory=lambda: deque(maxlen=RECENT_LOSSES))

    def record(self, loss: float | None) -> None:
        """Count a finished optimiser step; None means it was skipped for a non-finite loss."""
        self.step += 1
        if loss is None:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0
            self.recent_losses.append(loss)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "recent_losses": list(self.recent_losses)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        losses = deque(values["recent_losses"], maxlen=RECENT_LOSSES)
        return cls(values["step"], values["nonfinite_total"], values["nonfinite_in_a_row"], losses)


def _collective(part) -> bool:
    """A part whose state_dict() and load_state_dict() every rank calls (a sharded model's, trainer.fsdp): its
    state_dict() gathers the full state onto the main process (None elsewhere); `part.weights` says whether it
    is saved as a module's weights or as a nested state."""
    return bool(getattr(part, "collective", False))


def _write_part(folder: Path, name: str, part, accelerator) -> None:
    if isinstance(part, torch.nn.Module):
        save_weights(folder, name, accelerator.unwrap_model(part).state_dict())
    else:
        save_state(folder, name, part.state_dict())


def _write_collective_part(folder: Path, name: str, part, accelerator) -> None:
    """Every rank gathers; the main process writes the full state in the layout _write_part gives it."""
    state = part.state_dict()
    if accelerator.is_main_process:
        (save_weights if part.weights else save_state)(folder, name, state)


def _kept_in_trainer_state(folder: Path, name: str, saved: dict) -> bool:
    """Checkpoints of version 0.1 kept the LR schedule inside trainer_state."""
    return not (folder / f"{name}.safetensors").is_file() and name in saved


def _check_part(folder: Path, name: str, part, accelerator, saved: dict) -> None:
    """What _read_part will read, checked without changing anything (DamagedCheckpoint if it cannot be)."""
    if _kept_in_trainer_state(folder, name, saved):
        return
    if _collective(part) and part.weights:
        check_weights(folder, name, part.shapes())
    elif isinstance(part, torch.nn.Module):
        shapes = {k: list(v.shape) for k, v in accelerator.unwrap_model(part).state_dict().items()}
        check_weights(folder, name, shapes)
    else:
        check_state(folder, name)


def _read_part(folder: Path, name: str, part, accelerator, saved: dict) -> None:
    if _kept_in_trainer_state(folder, name, saved):
        part.load_state_dict(saved[name])
        return
    if _collective(part):  # every rank reads the full state and keeps its shard
        part.load_state_dict((load_weights if part.weights else load_state)(folder, name))
        return
    if isinstance(part, torch.nn.Module):
        accelerator.unwrap_model(part).load_state_dict(load_weights(folder, name))
        return
    part.load_state_dict(load_state(folder, name))
    if callable(getattr(part, "to", None)):  # diffusers' EMAModel takes the loaded (CPU) tensors as they are
        part.to(accelerator.device)


def save_checkpoint(out: Path, step: int, run: dict, config: dict, accelerator, parts: dict[str, Any],
                    state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step-NNNNNNNN/`: every rank its RNG state; rank 0 each part (a module's weights, or
    anything with state_dict(): optimizers, EMA, LR schedule; a collective part's full state, which every rank
    helps gather), the grad scaler and `trainer_state` (the loop's counters, the run's identity, the config);
    then `.tmp` is renamed to the final name."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(tmp, f"rng-rank{accelerator.process_index}", rng_state())
    for name, part in parts.items():
        if part is not None and _collective(part):
            _write_collective_part(tmp, name, part, accelerator)
        elif part is not None and accelerator.is_main_process:
            _write_part(tmp, name, part, accelerator)
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_state(tmp, "trainer_state", {"state": state, "run": run, "config": config, "scaler": scaler})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_marker(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(out, keep, step)
    accelerator.wait_for_everyone()
    return final


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def refuse_another_run(path: Path, saved_run: dict, run: dict) -> None:
    """A checkpoint of another run is an error, never a damaged checkpoint to skip."""
    if changed := _differences(saved_run["identity"], run["identity"]):
        raise UserError(f"--resume {path}: this checkpoint is from another run ({'; '.join(changed)})")
    if saved_run["teacher_fingerprint"] != run["teacher_fingerprint"]:
        raise UserError(f"--resume {path}: this checkpoint was trained from another teacher")


def warn_on_changes(saved_run: dict, run: dict, accelerator) -> None:
    """Warn when only the data order (or the data) changes since the checkpoint."""
    if changed := _differences(saved_run.get("data_layout", {}), run.get("data_layout", {})):
        accelerator.print(f"warning: resuming with another data layout ({'; '.join(changed)}): "
                          "the run continues, with a different data order than an uninterrupted one")
    if saved_run.get("data_sha256") != run.get("data_sha256"):
        accelerator.print("warning: the training data (shard manifest or prompt file) changed since this checkpoint")


def verify_checkpoint(path: Path, run: dict, accelerator, parts: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume reads from `path`, checked before any of it is applied (loading changes modules,
    optimizers and RNG in place): the marker's file sizes, every JSON, every safetensors header, each module's
    tensor names and shapes, and every rank's RNG file (so all ranks decide alike). Returns trainer_state.
    Raises DamagedCheckpoint naming the file, or UserError for a checkpoint of another run."""
    check_marker(path)
    saved = read_state(path, "trainer_state")
    if missing := [key for key in ("state", "run") if not isinstance(saved, dict) or key not in saved]:
        raise DamagedCheckpoint("trainer_state.json", f"has no {missing[0]!r}")
    refuse_another_run(path, saved["run"], run)
    for name, part in parts.items():
        if part is not None:
            _check_part(path, name, part, accelerator, saved)
    for rng in sorted(path.glob("rng-rank*.json")):
        check_state(path, rng.stem)
    return saved


def resume_checkpoint(out: Path, resume: str | None, run: dict, accelerator,
                      parts: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """--resume: restore the checkpoint to continue from in place and return it with the loop's saved state;
    None for a fresh start. `latest` skips a damaged checkpoint for the one before it, with one warning line;
    none readable is an error naming each problem. A damaged explicit checkpoint is an error."""
    candidates, damaged = resume_candidates(out, resume), []
    for i, path in enumerate(candidates):
        try:
            saved = verify_checkpoint(path, run, accelerator, parts)
        except DamagedCheckpoint as damage:
            if resume != "latest":
                raise UserError(f"--resume {path}: {damage}") from None
            damaged.append(f"{path.name} ({damage})")
            then = f"trying {candidates[i + 1].name}" if i + 1 < len(candidates) else "no earlier checkpoint"
            accelerator.print(f"warning: skipping {path} ({damage}); {then}")
            continue
        warn_on_changes(saved["run"], run, accelerator)
        apply_checkpoint(path, saved, accelerator, parts)
        return path, saved["state"]
    if damaged:
        raise UserError(f"--resume latest: no checkpoint in {Path(out) / CHECKPOINTS} can be read: "
                        + "; ".join(damaged))
    return None


def apply_checkpoint(path: Path, saved: dict[str, Any], accelerator, parts: dict[str, Any]) -> None:
    """Restore every part, the grad scaler and this rank's RNG in place from a verified checkpoint."""
    for name, part in parts.items():
        if part is not None:
            _read_part(path, name, part, accelerator, saved)
    if accelerator.scaler is not None and saved.get("scaler") is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng_file = path / f"rng-rank{accelerator.process_index}.json"
    if rng_file.is_file():
        set_rng_state(load_state(path, f"rng-rank{accelerator.process_index}"))
