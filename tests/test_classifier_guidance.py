"""Classifier guidance: the stored gradient is d loss / d z_t (finite differences), its sign lowers the loss,
and the blue, CLIP and user-function guidances build classifier shards."""


import pytest
import torch
from helpers import build_args, read_records

from diffusion.classifier_guidance import blue_tone_loss, eps_and_grad, resolve_guidance
from diffusion.errors import UserError
from diffusion.guidance import classifier_guided_eps
from diffusion.teacher import load_teacher
from pipeline.cli import main
from shards.manifest import read_dataset_info


@pytest.fixture(scope="module")
def teacher64(teacher_dir):
    """The tiny teacher in float64, so finite differences are exact enough to compare."""
    teacher = load_teacher(teacher_dir)
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        module.double()
    return teacher


def _loss_at(teacher, z_t, t, emb, captions, loss_fn):
    with torch.no_grad():
        eps = teacher.eps(z_t, t, emb).double()
        x0 = teacher.schedule.eps_to_x0(z_t, eps, t)
        return loss_fn((teacher.decode(x0).double() / 2 + 0.5).clamp(0, 1), captions)


@pytest.mark.parametrize("loss_fn", [blue_tone_loss], ids=["blue"])
def test_gradient_matches_finite_differences(teacher64, loss_fn):
    torch.manual_seed(0)
    captions = ["a red circle", "a blue square"]
    z_t, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([300, 800])
    emb = teacher64.encode_text(captions)
    _, grad = eps_and_grad(teacher64, z_t, t, emb, captions, loss_fn)
    direction = torch.randn_like(z_t)
    h = 1e-4
    plus = _loss_at(teacher64, z_t + h * direction, t, emb, captions, loss_fn)
    minus = _loss_at(teacher64, z_t - h * direction, t, emb, captions, loss_fn)
    finite = (plus - minus) / (2 * h)
    analytic = (grad.double() * direction).sum(dim=(1, 2, 3))
    torch.testing.assert_close(analytic, finite, rtol=2e-3, atol=1e-7)
    assert analytic.abs().min() > 1e-5  # a real, non-vanishing signal


def test_guided_eps_lowers_the_loss(teacher64):
    captions = ["x"]
    z_t, t = torch.randn(1, 4, 16, 16, dtype=torch.float64), torch.tensor([500])
    emb = teacher64.encode_text(captions)
    eps, grad = eps_and_grad(teacher64, z_t, t, emb, captions, blue_tone_loss)
    beta = teacher64.schedule.beta(t, z_t)
    guided = classifier_guided_eps(eps.double(), grad.double(), beta, 100.0)
    def loss_of(e):
        x0 = teacher64.schedule.eps_to_x0(z_t, e, t)
        return blue_tone_loss((teacher64.decode(x0).double() / 2 + 0.5).clamp(0, 1)).item()
    with torch.no_grad():
        assert loss_of(guided) < loss_of(eps.double())


def test_blue_build_stores_eps_and_grad(tmp_path, teacher_dir, teacher, clean_source):
    out = tmp_path / "blue"
    assert main(build_args(teacher_dir, clean_source, out, "--guidance", "blue", "--samples", 6)) == 0
    info = read_dataset_info(out)
    assert info["kind"] == "classifier" and info["guidance"]["name"] == "blue"
    assert info["tensors"] == ["zt", "eps", "grad"]
    record = next(iter(read_records(out).values()))
    z_t, t = record.tensors["zt"].float()[None], torch.tensor([record.t])
    emb = teacher.encode_text([record.caption])
    eps, grad = eps_and_grad(teacher, z_t, t, emb, [record.caption], blue_tone_loss)
    torch.testing.assert_close(record.tensors["eps"].float(), eps[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(record.tensors["grad"].float(), grad[0], atol=1e-4, rtol=1e-2)
    assert record.tensors["grad"].abs().sum() > 0


def test_user_function_guidance(tmp_path, teacher_dir, clean_source):
    out = tmp_path / "user"
    assert main(build_args(teacher_dir, clean_source, out, "--guidance", "guidance_functions:redness_loss",
                           "--samples", 4)) == 0
    assert read_dataset_info(out)["guidance"] == {"name": "guidance_functions:redness_loss",
                                                  "params": {"function": "guidance_functions:redness_loss"}}


def test_user_function_must_return_one_loss_per_sample(tmp_path, teacher_dir, clean_source, capsys):
    args = build_args(teacher_dir, clean_source, tmp_path / "o", "--guidance", "guidance_functions:scalar_loss")
    assert main(args) == 2
    assert "one value per sample" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot load guidance"):
        resolve_guidance("no_such_module:f")


def test_clip_guidance_build_and_gradient(tmp_path, teacher_dir, teacher64, clean_source, tiny_clip):
    config, weights = tiny_clip
    clip = resolve_guidance("clip", clip_model=str(config), clip_weights=str(weights)).loss
    clip.model.double()
    clip.mean, clip.std = clip.mean.double(), clip.std.double()
    captions = ["a red circle", "a green square"]
    z_t, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([200, 600])
    emb = teacher64.encode_text(captions)
    _, grad = eps_and_grad(teacher64, z_t, t, emb, captions, clip)
    direction, h = torch.randn_like(z_t), 1e-4
    finite = (_loss_at(teacher64, z_t + h * direction, t, emb, captions, clip)
              - _loss_at(teacher64, z_t - h * direction, t, emb, captions, clip)) / (2 * h)
    torch.testing.assert_close((grad.double() * direction).sum(dim=(1, 2, 3)), finite, rtol=5e-3, atol=1e-8)

    out = tmp_path / "clip"
    assert main(build_args(teacher_dir, clean_source, out, "--guidance", "clip", "--clip-model", config,
                           "--clip-weights", weights, "--samples", 4)) == 0
    params = read_dataset_info(out)["guidance"]["params"]
    assert params["model"] == "tiny-clip" and len(params["weights_sha256"]) == 64


def test_clip_without_weights_is_one_clear_line(tmp_path, teacher_dir, clean_source, capsys):
    assert main(build_args(teacher_dir, clean_source, tmp_path / "o", "--guidance", "clip")) == 2
    err = capsys.readouterr().err
    assert "CLIP weights file None not found; pass --clip-weights FILE" in err
