"""What a checkpoint holds and how every rank writes and reads it (the only distributed part of checkpoints)."""

from __future__ import annotations

import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion.errors import UserError
from trainer.checkpoint import (
    checkpoint_dir, load_state, load_weights, prune_checkpoints, rng_state, save_state, save_weights, set_rng_state,
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


def save_checkpoint(out: Path, run: dict, cfg, accelerator, student, optimizer, lr_scheduler, ema, state) -> Path:
    """Every rank writes its RNG state; rank 0 writes the rest, then renames `.tmp` to the final name."""
    final = checkpoint_dir(out, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(tmp, f"rng-rank{accelerator.process_index}", rng_state())
    if accelerator.is_main_process:
        save_weights(tmp, "unet", accelerator.unwrap_model(student).state_dict())
        save_state(tmp, "optimizer", optimizer.state_dict())
        if ema is not None:
            save_state(tmp, "ema", ema.state_dict())
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_state(tmp, "trainer_state", {"state": state.to_dict(), "run": run, "config": cfg.to_dict(),
                                          "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(out, cfg.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def load_checkpoint(path: Path, run: dict, accelerator, student, optimizer, lr_scheduler, ema) -> TrainState:
    """Restore everything in place; refuse a checkpoint of another run, warn when only the data order changes."""
    saved = load_state(path, "trainer_state")
    if changed := _differences(saved["run"]["identity"], run["identity"]):
        raise UserError(f"--resume {path}: this checkpoint is from another run ({'; '.join(changed)})")
    if saved["run"]["teacher_fingerprint"] != run["teacher_fingerprint"]:
        raise UserError(f"--resume {path}: this checkpoint was trained from another teacher")
    if changed := _differences(saved["run"]["data_layout"], run["data_layout"]):
        accelerator.print(f"warning: resuming with another data layout ({'; '.join(changed)}): "
                          "the run continues, with a different data order than an uninterrupted one")
    if saved["run"]["manifest_sha256"] != run["manifest_sha256"]:
        accelerator.print("warning: the shard manifest changed since this checkpoint was written")
    accelerator.unwrap_model(student).load_state_dict(load_weights(path, "unet"))
    optimizer.load_state_dict(load_state(path, "optimizer"))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(load_state(path, "ema"))
        ema.to(accelerator.device)
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng_file = path / f"rng-rank{accelerator.process_index}.json"
    if rng_file.is_file():
        set_rng_state(load_state(path, f"rng-rank{accelerator.process_index}"))
    return TrainState.from_dict(saved["state"])
