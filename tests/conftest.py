"""Shared fixtures: tiny models written to disk (so the real loading path is tested), sockets blocked."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection other than to a local socket fails the test."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
            return real_connect(sock, address)
        raise RuntimeError(f"test tried to reach the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    from diffusion.tiny import write_tiny_teacher

    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-sd", resolution=32)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline-layout teacher (two text encoders, micro-conditioning), 32 px."""
    from diffusion.tiny import write_tiny_sdxl_teacher

    return write_tiny_sdxl_teacher(tmp_path_factory.mktemp("teacher") / "tiny-sdxl", resolution=32)


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    from diffusion.teacher import load_teacher

    return load_teacher(teacher_dir)


@pytest.fixture(scope="session")
def bad_source(tmp_path_factory) -> Path:
    """24 good samples in 16-sample tars, every bad input, and a truncated tar."""
    from pipeline.synthetic import write_img2dataset_source

    return write_img2dataset_source(tmp_path_factory.mktemp("laion"), samples=24, per_tar=16, bad_inputs=True)


@pytest.fixture(scope="session")
def clean_source(tmp_path_factory) -> Path:
    from pipeline.synthetic import write_img2dataset_source

    return write_img2dataset_source(tmp_path_factory.mktemp("laion-clean"), samples=20, per_tar=7, seed=1)


@pytest.fixture(scope="session")
def cfg_shards(tmp_path_factory, teacher_dir, bad_source) -> Path:
    from helpers import build_args
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("shards") / "cfg"
    assert main(build_args(teacher_dir, bad_source, out, "--store-clean")) == 0
    return out


@pytest.fixture(scope="session")
def w_student(tmp_path_factory, teacher_dir, cfg_shards) -> Path:
    """A w-distill student of the tiny teacher (w in [1, 4]): progressive's starting point."""
    from helpers import train_w_student

    return train_w_student(tmp_path_factory.mktemp("w-student") / "w", teacher_dir, cfg_shards, 2)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run gets its own Accelerator settings (accelerate keeps them in a process-wide singleton)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def heldout_cfg_shards(tmp_path_factory, teacher_dir, clean_source) -> Path:
    """CFG shards of other images than cfg_shards' (held out from training)."""
    from helpers import build_args
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("shards") / "heldout"
    assert main(build_args(teacher_dir, clean_source, out, "--seed", "5", "--store-clean")) == 0
    return out


@pytest.fixture(scope="session")
def blue_shards(tmp_path_factory, teacher_dir, clean_source) -> Path:
    from helpers import build_args
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("shards") / "blue"
    assert main(build_args(teacher_dir, clean_source, out, "--guidance", "blue")) == 0
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model: (config .json, safetensors weights), loaded through the real pretrained=<file> path."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                              "head_width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
    (folder / "tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "tiny-clip.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model("tiny-clip").state_dict(), folder / "tiny-clip.safetensors")
    return folder / "tiny-clip.json", folder / "tiny-clip.safetensors"
