"""Checkpoints without pickle: every tensor in safetensors, everything else in small JSON.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding, for each named state, NAME.safetensors and
NAME.json. Nested states (optimizer, EMA, RNG) are flattened: each tensor becomes a JSON placeholder
{"__tensor__": "path"}, dicts with non-string keys (an optimizer's parameter indices) and tuples keep their types.
A folder is written as `.tmp`, closed by `checkpoint.json` (the step and every file's size, written last) and
renamed, so an interrupted save never looks like a checkpoint. A folder without `checkpoint.json` was written
before the marker existed: it is read as complete, and checked like any other when a resume reads it.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffusion.errors import UserError

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
_NAME = re.compile(r"^step-(\d{8})$")
_ENTRY = re.compile(r"^step-(\d{8})(\.tmp)?$")
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)  # what reading a damaged file raises


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be read back: the file and the problem, on one line."""

    def __init__(self, file: str, problem: Exception | str) -> None:
        lines = str(problem).strip().splitlines() or [type(problem).__name__]
        super().__init__(f"{file}: {lines[0]}")


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


def write_marker(folder: Path, step: int) -> None:
    """checkpoint.json, the last file of a checkpoint: its step and the size of every other file."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({"step": step, "files": files}))


def check_marker(folder: Path) -> None:
    """Every file checkpoint.json lists is there with its size; no marker: a checkpoint of an earlier version."""
    if not (folder / MARKER).is_file():
        return
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except _UNREADABLE as error:
        raise DamagedCheckpoint(MARKER, error) from None
    for name, size in files.items():
        if not (folder / name).is_file():
            raise DamagedCheckpoint(name, "missing")
        if (found := (folder / name).stat().st_size) != size:
            raise DamagedCheckpoint(name, f"{found} bytes, {MARKER} says {size}")


def _tensor_shapes(folder: Path, name: str) -> dict[str, list[int]]:
    """The tensors NAME.safetensors holds, from its header (the whole file's length is checked against it)."""
    file = folder / f"{name}.safetensors"
    if not file.is_file():
        raise DamagedCheckpoint(file.name, "missing")
    try:
        with safe_open(str(file), "pt") as opened:
            return {key: opened.get_slice(key).get_shape() for key in opened.keys()}
    except _UNREADABLE as error:
        raise DamagedCheckpoint(file.name, error) from None


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, dict):
        if "__tensor__" in value or "__ndarray__" in value:
            return {value.get("__tensor__", value.get("__ndarray__"))}
        return set().union(*map(_placeholders, value.values()))
    if isinstance(value, list):
        return set().union(*map(_placeholders, value))
    return set()


def check_state(folder: Path, name: str) -> None:
    """NAME.json parses and every tensor it names is in NAME.safetensors: load_state would succeed."""
    try:
        structure = json.loads((folder / f"{name}.json").read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{name}.json", "missing") from None
    except _UNREADABLE as error:
        raise DamagedCheckpoint(f"{name}.json", error) from None
    if missing := sorted(_placeholders(structure) - set(_tensor_shapes(folder, name))):
        raise DamagedCheckpoint(f"{name}.safetensors", f"has no tensor {missing[0]}")


def check_weights(folder: Path, name: str, shapes: dict[str, list[int]]) -> None:
    """NAME.safetensors holds exactly these tensors, in these shapes (a module's state dict)."""
    found = _tensor_shapes(folder, name)
    if wrong := sorted(k for k in set(found) | set(shapes) if found.get(k) != shapes.get(k)):
        raise DamagedCheckpoint(f"{name}.safetensors", f"{wrong[0]} is {found.get(wrong[0])}, the model's is "
                                                      f"{shapes.get(wrong[0])}")


def read_state(folder: Path, name: str) -> Any:
    """load_state, with a damaged file as DamagedCheckpoint."""
    check_state(folder, name)
    try:
        return load_state(folder, name)
    except _UNREADABLE as error:
        raise DamagedCheckpoint(f"{name}.json", error) from None


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


def checkpoint_entries(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder in OUT, complete or interrupted (`.tmp`)."""
    folder = Path(out) / CHECKPOINTS
    entries = [(int(m[1]), p) for p in folder.iterdir() if (m := _ENTRY.match(p.name))] if folder.is_dir() else []
    return sorted(entries)


def resume_candidates(out: Path, resume: str | None) -> list[Path]:
    """The checkpoints --resume may continue from, in the order to try them: `latest`, every checkpoint in
    OUT, newest first (none: a fresh start); a folder, that one alone; no --resume, none."""
    if not resume:
        return []
    if resume == "latest":
        return list_checkpoints(out)[::-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return [path]


def prune_checkpoints(out: Path, keep: int, newest: int | None = None) -> None:
    """Keep the last `keep` checkpoints up to step `newest`. Later ones (damaged ones a resume skipped, or those
    of a resume from an earlier checkpoint) stay until the run overwrites them."""
    kept = [p for p in list_checkpoints(out) if newest is None or int(_NAME.match(p.name)[1]) <= newest]
    for old in kept[:-keep]:
        shutil.rmtree(old)
