"""Checkpoint codec, micro-batch positions and the caption cache: the pieces the loop is built from."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from diffusion.errors import UserError
from shards.reader import ShardStream
from trainer.checkpoint import (
    checkpoint_dir, list_checkpoints, load_state, prune_checkpoints, resume_candidates, rng_state, save_state,
    set_rng_state,
)
from trainer.data import MicroBatches
from trainer.text_cache import TextEmbeddingCache


def _adamw_after_steps(model, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(steps):
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = _adamw_after_steps(model, 2)
    save_state(tmp_path, "optimizer", optimizer.state_dict())
    assert b"\x80" not in (tmp_path / "optimizer.json").read_bytes()  # JSON, not a pickle stream
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    restored = torch.optim.AdamW(twin.parameters(), lr=0.5)
    restored.load_state_dict(load_state(tmp_path, "optimizer"))
    assert restored.param_groups[0]["betas"] == (0.8, 0.9) and restored.param_groups[0]["lr"] == 0.1
    for m, opt in ((model, optimizer), (twin, restored)):  # one more step each: identical
        m(torch.ones(2, 3)).sum().backward()
        opt.step()
    torch.testing.assert_close(model.weight, twin.weight, rtol=0, atol=0)


def test_rng_state_round_trips(tmp_path):
    save_state(tmp_path, "rng", rng_state())
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_state(tmp_path, "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_checkpoint_listing_pruning_and_resume_paths(tmp_path):
    assert resume_candidates(tmp_path, "latest") == [] and resume_candidates(tmp_path, None) == []
    for step in (5, 10, 15):
        folder = checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    checkpoint_dir(tmp_path, 20).with_name("step-00000020.tmp").mkdir()  # an interrupted save
    assert resume_candidates(tmp_path, "latest") == [checkpoint_dir(tmp_path, s) for s in (15, 10, 5)]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000015"]
    assert resume_candidates(tmp_path, str(checkpoint_dir(tmp_path, 10))) == [checkpoint_dir(tmp_path, 10)]
    with pytest.raises(UserError, match="not a checkpoint folder"):
        resume_candidates(tmp_path, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("resampled", [True, False])
def test_micro_batches_resume_from_any_position(cfg_shards, resampled):
    def batches(start: int, workers: int) -> list[list[str]]:
        stream = ShardStream(cfg_shards, shuffle_buffer=8, seed=4, resampled=resampled)
        micro = MicroBatches(stream, 4, ("zt",), resampled_pass_length=3, num_workers=workers)
        return [b["key"] for b in itertools.islice(micro.from_position(start), 8)]

    whole = batches(0, workers=1)
    assert batches(5, workers=1) == (whole + batches(8, workers=1))[5:13]  # positions 5..12, across passes
    assert batches(0, workers=0) == batches(0, workers=0) and len({k for b in whole for k in b}) > 4
    if not resampled:  # an epoch is every record once: 24 records, batches of 4 -> 6 per pass
        epoch = [k for b in whole[:6] for k in b]
        assert len(set(epoch)) == 24


def test_text_cache_encodes_each_caption_once():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((2,), float(len(c))) for c in captions])

    cache = TextEmbeddingCache(encode, max_entries=2)
    out = cache(["a", "bb", "a"])
    assert calls == [["a", "bb"]] and out.hidden[:, 0].tolist() == [1.0, 2.0, 1.0]
    cache(["bb", "ccc"])  # "a" is the least recently used: evicted
    cache(["a"])
    assert calls[1:] == [["ccc"], ["a"]] and cache.encoded == 4


def test_the_marker_lists_every_file_and_finds_a_truncated_one(tmp_path):
    from trainer.checkpoint import DamagedCheckpoint, check_marker, check_state, write_marker

    save_state(tmp_path, "rng", rng_state())
    check_marker(tmp_path)  # no marker: a checkpoint of an earlier version, taken as complete
    write_marker(tmp_path, 7)
    marker = json.loads((tmp_path / "checkpoint.json").read_text())
    assert marker["step"] == 7 and sorted(marker["files"]) == ["rng.json", "rng.safetensors"]
    check_marker(tmp_path)
    data = (tmp_path / "rng.safetensors").read_bytes()
    (tmp_path / "rng.safetensors").write_bytes(data[:-1])
    with pytest.raises(DamagedCheckpoint, match=rf"^rng.safetensors: {len(data) - 1} bytes, checkpoint.json says"):
        check_marker(tmp_path)
    with pytest.raises(DamagedCheckpoint, match="^rng.safetensors: Error while deserializing header"):
        check_state(tmp_path, "rng")


def test_pruning_keeps_the_checkpoint_just_written_below_later_ones(tmp_path):
    """After a resume skipped a damaged step 4 for step 2, writing step 3 with a limit of 1 keeps step 3."""
    for step in (2, 3, 4):
        checkpoint_dir(tmp_path, step).mkdir(parents=True)
    prune_checkpoints(tmp_path, keep=1, newest=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        print(*args)


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    from types import SimpleNamespace

    from trainer.outdir import earlier_run, prepare_out

    out = tmp_path / "out"
    for folder in ("checkpoints/step-00000003", "checkpoints/step-00000004.tmp", "logs/fit", "round-02steps",
                   "unet", "vae", "samples", "shards"):
        (out / folder).mkdir(parents=True)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "x", "vae": ["diffusers", "AutoencoderKL"],
                                                      "safety_checker": [None, None]}))
    for name in ("distillation.json", "samples/kimg-0000000.000.png", "samples/mine.png", "notes.txt", "README.md",
                 "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        (out / name).write_text("{}")
    assert earlier_run(out) == "checkpoints up to step 4 and a finished student and finished rounds round-02steps"
    prepare_out(SimpleNamespace(out=str(out), resume=None, overwrite=True), _OneProcess(), (str(out / "shards"),))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["checkpoints", "notes.txt", "samples", "samples/mine.png", "shards"]
    assert earlier_run(out) is None
