"""Checkpoints without pickle: every tensor in safetensors, everything else in small JSON.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding, for each named state, NAME.safetensors and
NAME.json. Nested states (optimizer, EMA, RNG) are flattened: each tensor becomes a JSON placeholder
{"__tensor__": "path"}, dicts with non-string keys (an optimizer's parameter indices) and tuples keep their types.
A folder is written as `.tmp` and renamed when complete, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffusion.errors import UserError

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.copy())
        return {"__ndarray__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__items__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_state(folder: Path, name: str, state: Any) -> None:
    """NAME.safetensors (every tensor) + NAME.json (the structure)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, name, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _unflatten(json.loads((folder / f"{name}.json").read_text()), tensors)


def save_weights(folder: Path, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(folder / f"{name}.safetensors"))


def load_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(out) / CHECKPOINTS
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """--resume latest (None when there is none yet: a fresh start) or an explicit checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return path


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
