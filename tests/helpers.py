"""Helpers the tests share."""

from __future__ import annotations

from pathlib import Path


def build_args(teacher_dir, source, out, *extra) -> list[str]:
    return ["build-shards", "--teacher", str(teacher_dir), "--source", str(source), "--out", str(out),
            "--resolution", "32", "--batch-size", "4", "--shard-size", "5", *map(str, extra)]


def read_records(folder: Path) -> dict:
    """key -> Record over every shard of a folder (asserting keys are unique)."""
    import webdataset as wds

    from shards.format import Record
    from shards.manifest import read_manifest

    records = {}
    for shard in read_manifest(folder):
        for sample in wds.tarfile_samples([{"url": str(folder / shard.file)}]):
            record = Record.decode(sample)
            assert record.key not in records
            records[record.key] = record
    return records


def relative(a, b) -> float:
    """||a - b|| / ||b|| of two tensors."""
    return ((a - b).norm() / b.norm()).item()


def train_w_student(out: Path, teacher_dir, shards, steps: int) -> Path:
    """A small w-student (w in [1, 4], a 16-wide w embedding) of `teacher_dir` on `shards`, in `out`."""
    from trainer.cli import main

    assert main(fit_args("w-distill", teacher_dir, shards, out, "--max-steps", steps, "--w-min", 1, "--w-max", 4,
                         "--w-embedding-dim", 16)) == 0
    return out


def fit_args(method, teacher_dir, shards, out, *extra) -> list[str]:
    """`trainer fit` for the tiny teacher: quick, quiet, deterministic."""
    return ["fit", "--method", method, "--teacher", str(teacher_dir), "--shards", str(shards), "--out", str(out),
            "--batch-size", "4", "--lr", "1e-4", "--lr-warmup-steps", "0", "--ema-decay", "0", "--num-workers", "1",
            "--report-to", "none", *map(str, extra)]


def progressive_args(student, shards, out, *extra) -> list[str]:
    """`trainer fit --method progressive` from a w-student: quick, quiet, deterministic."""
    return ["fit", "--method", "progressive", "--student", str(student), "--shards", str(shards), "--out", str(out),
            "--batch-size", "4", "--lr", "1e-4", "--ema-decay", "0", "--num-workers", "0", "--report-to", "none",
            *map(str, extra)]


def count_unet_calls(unet) -> list[dict]:
    """Record the keyword arguments of every forward of a diffusers UNet (a forward pre-hook)."""
    calls = []
    unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append({"batch": args[0].shape[0], **kwargs}),
                                   with_kwargs=True)
    return calls


def write_tiny_inception(path: Path) -> Path:
    """A TorchScript stand-in with the interface of inception-2015-12-05.pt that clean-fid uses (.layers)."""
    import torch

    class TinyInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                              torch.nn.Linear(48, 2048))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path


def write_tiny_vgg(path: Path) -> Path:
    """A TorchScript stand-in with the interface of NVlabs' vgg16.pt: uint8 images in, features out."""
    import torch

    class TinyVGG(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                torch.nn.Linear(48, 32))

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.features(x.float() / 255.0)

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyVGG()), str(path))
    return path


def write_tiny_coco(folder: Path, images: int = 12) -> Path:
    """COCO-2014 validation in its real layout: two captions per image, one grayscale JPEG among them."""
    import json

    from PIL import Image, ImageDraw

    (folder / "annotations").mkdir(parents=True)
    (folder / "val2014").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    annotations = []
    for i in range(images):
        image_id = 1000 + i
        colour = colours[i % len(colours)]
        image = Image.new("RGB", (80 + 8 * i, 64), "white")
        ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill=colour)
        if i == 3:
            image = image.convert("L")
        image.save(folder / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        annotations += [{"id": 2 * i, "image_id": image_id, "caption": f"a {colour} circle "},
                        {"id": 2 * i + 1, "image_id": image_id, "caption": f"A round {colour} shape."}]
    (folder / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    return folder


def sid_args(teacher_dir, prompts, out, *extra) -> list[str]:
    """`trainer fit --method sid-lsg` for the tiny teacher: quick, quiet, deterministic."""
    return ["fit", "--method", "sid-lsg", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "2", "--lr", "1e-4", "--grid-every-kimg", "0", "--report-to", "none", *map(str, extra)]


def assert_images_close(a: list, b: list, max_fraction: float = 1e-3) -> None:
    """The same images up to floating-point order: renders of other batch shapes (or thread counts, or CPUs'
    kernels) may round a pixel to the neighbouring level. At most 1 level apart anywhere, and fewer than
    `max_fraction` of all pixels differing at all; a real bug (another seed, prompt or step) breaks both."""
    import numpy as np

    a, b = np.stack(a).astype(np.int16), np.stack(b).astype(np.int16)
    assert a.shape == b.shape
    difference = np.abs(a - b)
    assert difference.max() <= 1, f"pixels differ by up to {difference.max()} levels"
    differing = (difference.max(axis=-1) > 0).mean()
    assert differing < max_fraction, f"{differing:.3%} of pixels differ"



def add_shard_copy(folder: Path, name: str, index: int = 0) -> None:
    """Damage a shard folder consistently: a copy of its shard `index` listed as `name`, in the manifest and in
    dataset.json's count, so sizes and sha256 all match but every key of that shard is there twice."""
    import dataclasses
    import shutil

    from shards.manifest import read_dataset_info, read_manifest, write_dataset_info, write_manifest

    shards = read_manifest(folder)
    shutil.copy(folder / shards[index].file, folder / name)
    write_manifest(folder, shards + [dataclasses.replace(shards[index], file=name)])
    info = read_dataset_info(folder)
    write_dataset_info(folder, {**info, "samples": info["samples"] + shards[index].samples})
