"""Validation grids (trainer.validation): written and logged every --validate-every steps, the same fixed
noise and prompts each time (the step-0 grid is the untrained student: the teacher's own sampler, bit for bit
up to pixel rounding), each method's sampler, and the refusals."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.utils import make_grid

from diffusion.samplers import grid_ddim, initial_noise, sid_one_step, step_grid
from diffusion.unet import add_guidance_embedding, w_condition
from helpers import assert_images_close, fit_args, sid_args
from trainer.cli import main as trainer_main
from trainer.validation import VALIDATION_STEPS, fit_sampler, grid_sampler, sid_sampler

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PROMPTS = ["a red cat", "a blue house", "a green tree", "a tiny boat"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("validation") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _grid(teacher, x0: torch.Tensor) -> np.ndarray:
    """Decoded in float32, 2 per row, as torchvision's save_image writes a grid."""
    grid = make_grid((teacher.decode(x0).float() / 2 + 0.5).clamp(0, 1), nrow=2)
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


@torch.no_grad()
def _expected_grid(teacher, unet, steps: int, w: float | None = None) -> np.ndarray:
    """The grid by hand: prompt i from seed i, `steps`-step grid DDIM in one batch."""
    noise = initial_noise(list(range(len(PROMPTS))), teacher.latent_shape(32))
    scale = None if w is None else torch.full((len(PROMPTS),), w)
    return _grid(teacher, grid_ddim(unet, teacher.schedule, noise, teacher.encode_text(PROMPTS), steps, scale))


def test_cfg_distill_writes_and_logs_a_grid_every_validate_every_steps(teacher_dir, teacher, cfg_shards, tmp_path,
                                                                       prompt_file, monkeypatch):
    monkeypatch.setattr("trainer.validation.GRID_BATCH", 3)  # two batches: a grid must not depend on them
    out = tmp_path / "cfg"
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 2, "--lr", 1e-3,
                                 "--validate-every", 1, "--validation-prompts", prompt_file,
                                 "--report-to", "tensorboard")) == 0
    names = ["step-00000000.png", "step-00000001.png", "step-00000002.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == names
    grids = [_png(out / "samples" / name) for name in names]
    assert all(g.shape == (70, 70, 3) for g in grids)  # 2 x 2 images of 32 px, 2 px padding
    assert_images_close([grids[0]], [_expected_grid(teacher, teacher.unet, VALIDATION_STEPS)])
    assert not np.array_equal(grids[0], grids[2])  # the student trained; the noise and prompts did not change
    events = EventAccumulator(str(out / "logs" / "fit"), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("validation")
    assert [e.step for e in logged] == [0, 1, 2] and (logged[0].width, logged[0].height) == (70, 70)
    for event, grid in zip(logged, grids):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")), grid)
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, out, "--max-steps", 1, "--overwrite")) == 0
    assert list((out / "samples").iterdir()) == []  # --overwrite removed the earlier run's grids


def test_w_distill_and_progressive_grids_sample_at_the_middle_w(teacher_dir, teacher, cfg_shards, tmp_path,
                                                               prompt_file):
    from diffusers import UNet2DConditionModel

    student = tmp_path / "w"
    assert trainer_main(fit_args("w-distill", teacher_dir, cfg_shards, student, "--max-steps", 2, "--w-min", 1,
                                 "--w-max", 4, "--w-embedding-dim", 16, "--lr", 1e-3, "--validate-every", 2,
                                 "--validation-prompts", prompt_file)) == 0
    assert sorted(p.name for p in (student / "samples").iterdir()) == ["step-00000000.png", "step-00000002.png"]
    out = tmp_path / "progressive"
    assert trainer_main(["fit", "--method", "progressive", "--student", str(student), "--shards", str(cfg_shards),
                         "--out", str(out), "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
                         "--start-steps", "4", "--end-steps", "1", "--iters-per-round", "1", "--ema-decay", "0.5",
                         "--validate-every", "1", "--validation-prompts", str(prompt_file)]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step-{i:08d}.png" for i in range(3)]
    unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet")  # round 1 starts as it: 2 steps, w 2.5
    first = _png(out / "samples/step-00000000.png")
    assert_images_close([first], [_expected_grid(teacher, unet, 2, w=2.5)])
    with pytest.raises(AssertionError):  # the trained w embedding tells w apart in the grid
        assert_images_close([first], [_expected_grid(teacher, unet, 2, w=1.0)])


def test_sid_lsg_grids_keep_their_kimg_names_and_are_logged_at_the_iteration(teacher_dir, teacher, tmp_path,
                                                                             prompt_file):
    out = tmp_path / "sid"
    assert trainer_main(sid_args(teacher_dir, prompt_file, out, "--max-kimg", 0.004, "--grid-every-kimg", 0.004,
                                 "--grid-prompts", 4, "--report-to", "tensorboard")) == 0
    names = ["kimg-0000000.000.png", "kimg-0000000.004.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == names
    noise = initial_noise(list(range(4)), teacher.latent_shape(32))
    with torch.no_grad():  # the generator starts as the teacher
        x_g = sid_one_step(teacher.unet, teacher.schedule, noise, 625, teacher.encode_text(PROMPTS))
        expected = _grid(teacher, x_g)
    assert_images_close([_png(out / "samples" / names[0])], [expected])
    events = EventAccumulator(str(out / "logs" / "fit-sid-lsg"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("validation")] == [0, 2]  # iterations of 2 images


def _sampler(method: str, teacher, unet):
    if method == "progressive":
        return grid_sampler(teacher.schedule, 2, 3.0, unet)
    if method == "sid-lsg":
        return sid_sampler(unet, teacher.schedule, 625)
    return fit_sampler(SimpleNamespace(method=method, w_min=2.0, w_max=6.0), teacher.schedule, unet)


@pytest.mark.parametrize("method", ["cfg-distill", "classifier-distill", "w-distill", "progressive", "sid-lsg"])
def test_each_methods_sampler(teacher, method):
    """The UNet passes each method's validation sampler makes: its timesteps and its w (none at guidance 1)."""
    unet = add_guidance_embedding(teacher.unet, 16) if method in ("w-distill", "progressive") else teacher.unet
    calls = []
    handle = unet.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((int(args[1][0]), kwargs.get("timestep_cond"))), with_kwargs=True)
    noise = initial_noise([0, 1], teacher.latent_shape(32))
    try:
        with torch.no_grad():
            x0 = _sampler(method, teacher, unet)(noise, teacher.encode_text(["a", "b"]))
    finally:
        handle.remove()
    assert x0.shape == noise.shape and torch.isfinite(x0).all()
    steps = {"progressive": step_grid(2, 1000), "sid-lsg": [625]}.get(method, step_grid(VALIDATION_STEPS, 1000))
    assert [t for t, _ in calls] == steps
    w = {"w-distill": 4.0, "progressive": 3.0}.get(method)
    for _, cond in calls:
        assert cond is None if w is None else torch.equal(cond, w_condition(torch.full((2,), w), unet))


def test_validate_every_needs_prompts_and_is_not_sid_lsgs(teacher_dir, cfg_shards, tmp_path, prompt_file, capsys):
    assert trainer_main(fit_args("cfg-distill", teacher_dir, cfg_shards, tmp_path / "a", "--validate-every", 5)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "Error: --validate-every needs --validation-prompts FILE: the prompts of the validation grids"]
    assert trainer_main(["fit", "--method", "sid-lsg", "--teacher", str(teacher_dir), "--prompts", str(prompt_file),
                         "--out", str(tmp_path / "b"), "--validate-every", "5"]) == 2
    assert "--validate-every does not apply to --method sid-lsg" in capsys.readouterr().err
