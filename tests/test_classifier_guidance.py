"""Classifier guidance: the blue loss by hand, the stored gradient is d loss / d z_t of the loss actually
computed (finite differences, no clamp on the way), its sign lowers the loss under either coefficient c_t, the
blue, CLIP and user-function guidances build classifier shards, and the coefficient goes from build-shards'
dataset.json to trainer fit and to the classifier-guided teacher in evaluation."""


import pytest
import torch
from helpers import build_args, read_records

from diffusion.classifier_guidance import blue_tone_loss, eps_and_grad, resolve_guidance
from diffusion.errors import UserError
from diffusion.guidance import classifier_guided_eps, guidance_coefficient
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
    """The loss the seed's Algorithm 2 differentiates, written out here: on decode(x0_hat) / 2 + 0.5, no clamp."""
    with torch.no_grad():
        eps = teacher.eps(z_t, t, emb).double()
        x0 = teacher.schedule.eps_to_x0(z_t, eps, t)
        return loss_fn(teacher.decode(x0).double() / 2 + 0.5, captions)


def test_blue_loss_by_hand():
    """Whitaker's blue loss: mean over pixels of |B - 0.9|, per sample; red and green play no part."""
    images = torch.zeros(2, 3, 1, 2)
    images[0, 2] = torch.tensor([[0.5, 1.2]])  # |0.5 - 0.9| = 0.4, |1.2 - 0.9| = 0.3 -> 0.35
    images[1, 2] = torch.tensor([[0.9, 0.0]])  # 0 and 0.9 -> 0.45
    images[1, :2] = 0.7  # any red and green: same loss
    torch.testing.assert_close(blue_tone_loss(images), torch.tensor([0.35, 0.45]))


def test_blue_loss_gradient_is_all_in_the_blue_channel():
    """d loss / d image = sign(B - 0.9) / (H W) on blue, 0 on red and green (the old RGB distance gave a third
    of that on blue, and pulled red and green toward 0.1)."""
    images = torch.tensor([0.3, 0.95, 0.2, 0.6]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1).requires_grad_(True)
    blue_tone_loss(images).sum().backward()
    assert images.grad[:, :2].abs().max() == 0
    torch.testing.assert_close(images.grad[0, 2], torch.tensor([[-1.0, 1.0], [-1.0, -1.0]]) / 4)


def test_the_loss_sees_the_decoded_images_unclamped(teacher64):
    """No clamp on the gradient path: pixels the decoder puts outside [0, 1] reach the loss as they are."""
    seen = []

    def spy(images, captions):
        seen.append(images.detach())
        return images[:, 2].mean(dim=(1, 2))

    torch.manual_seed(0)
    z_t, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([50, 300])
    eps_and_grad(teacher64, z_t, t, teacher64.encode_text(["a", "b"]), ["a", "b"], spy)
    assert seen[0].min() < 0 or seen[0].max() > 1  # this tiny decoder overshoots a little


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


@pytest.mark.parametrize(("convention", "gamma"), [("sqrt-beta", 100.0), ("sigma", 8.0)])
def test_guided_eps_lowers_the_loss(teacher64, convention, gamma):
    captions = ["x"]
    z_t, t = torch.randn(1, 4, 16, 16, dtype=torch.float64), torch.tensor([500])
    emb = teacher64.encode_text(captions)
    eps, grad = eps_and_grad(teacher64, z_t, t, emb, captions, blue_tone_loss)
    c_t = guidance_coefficient(teacher64.schedule, t, z_t, convention)
    guided = classifier_guided_eps(eps.double(), grad.double(), c_t, gamma)
    def loss_of(e):
        x0 = teacher64.schedule.eps_to_x0(z_t, e, t)
        return blue_tone_loss(teacher64.decode(x0).double() / 2 + 0.5).item()
    with torch.no_grad():
        assert loss_of(guided) < loss_of(eps.double())


def test_blue_build_stores_eps_and_grad(tmp_path, teacher_dir, teacher, clean_source):
    out = tmp_path / "blue"
    assert main(build_args(teacher_dir, clean_source, out, "--guidance", "blue", "--samples", 6)) == 0
    info = read_dataset_info(out)
    assert info["kind"] == "classifier" and info["guidance"]["name"] == "blue"
    assert info["guidance"]["params"] == {"loss": "mean |B - 0.9|", "blue": 0.9}
    assert info["guidance"]["coefficient"] == "sqrt-beta" and info["guidance"]["images"] == "decoded/2+0.5, unclamped"
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
                                                  "params": {"function": "guidance_functions:redness_loss"},
                                                  "coefficient": "sqrt-beta", "images": "decoded/2+0.5, unclamped"}


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


def test_the_coefficient_goes_from_build_shards_to_fit(tmp_path, teacher_dir, clean_source):
    """build-shards records --guidance-coefficient in dataset.json; old shards without it read as sqrt-beta;
    fit takes it from there unless told otherwise, and writes the one it used into distillation.json."""
    import json

    from shards.manifest import recorded_coefficient
    from trainer.cli import main as trainer_main

    sigma_shards = tmp_path / "sigma"
    assert main(build_args(teacher_dir, clean_source, sigma_shards, "--guidance", "blue", "--samples", 4,
                           "--guidance-coefficient", "sigma")) == 0
    info = read_dataset_info(sigma_shards)
    assert info["guidance"]["coefficient"] == "sigma" and recorded_coefficient(info) == "sigma"
    assert recorded_coefficient({"kind": "classifier", "guidance": {"name": "blue", "params": {}}}) == "sqrt-beta"
    assert main(build_args(teacher_dir, clean_source, sigma_shards, "--guidance", "blue", "--samples", 4)) == 0
    assert recorded_coefficient(read_dataset_info(sigma_shards)) == "sigma"  # a re-run without the flag keeps it
    fit = ["fit", "--method", "classifier-distill", "--teacher", str(teacher_dir), "--batch-size", "2",
           "--max-steps", "1", "--ema-decay", "0", "--num-workers", "0", "--report-to", "none"]
    for extra, expected in [([], "sigma"), (["--guidance-coefficient", "sqrt-beta"], "sqrt-beta")]:
        out = tmp_path / f"student-{expected}"
        assert trainer_main(fit + ["--shards", str(sigma_shards), "--out", str(out), *extra]) == 0
        assert json.loads((out / "distillation.json").read_text())["guidance_coefficient"] == expected


def test_the_coefficient_is_refused_where_it_does_not_apply(tmp_path, teacher_dir, cfg_shards, clean_source, capsys):
    from trainer.cli import main as trainer_main
    from trainer.config import FitConfig

    assert main(build_args(teacher_dir, clean_source, tmp_path / "c", "--guidance-coefficient", "sigma")) == 2
    assert "--guidance-coefficient does not apply to --guidance cfg" in capsys.readouterr().err
    assert trainer_main(["fit", "--method", "cfg-distill", "--teacher", str(teacher_dir), "--shards",
                         str(cfg_shards), "--out", str(tmp_path / "f"), "--guidance-coefficient", "sigma"]) == 2
    assert "--guidance-coefficient does not apply to --method cfg-distill" in capsys.readouterr().err
    assert trainer_main(["fit", "--method", "sid-lsg", "--teacher", str(teacher_dir), "--prompts", "p.txt",
                         "--out", str(tmp_path / "s"), "--guidance-coefficient", "sigma"]) == 2
    assert "--guidance-coefficient does not apply to --method sid-lsg" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown --guidance-coefficient 'dhariwal'"):
        FitConfig(method="classifier-distill", teacher="t", shards="s", out="o", guidance_coefficient="dhariwal")


@pytest.mark.parametrize("convention", ["sqrt-beta", "sigma"])
def test_classifier_distill_trains_on_the_target_with_its_coefficient(teacher_dir, teacher, blue_shards, tmp_path,
                                                                      convention):
    """fit's micro-batch loss = ||eps_student - (eps + gamma c_t grad)||^2 with c_t written out here."""
    from diffusion.unet import unet_eps
    from trainer.config import FitConfig
    from trainer.fit import build_student, micro_batch_loss

    records = list(read_records(blue_shards).values())[:4]
    stack = lambda name: torch.stack([r.tensors[name] for r in records]).float()  # noqa: E731
    batch = {"zt": stack("zt"), "t": torch.tensor([r.t for r in records]), "eps": stack("eps"), "grad": stack("grad")}
    text = teacher.encode_text([r.caption for r in records])
    cfg = FitConfig(method="classifier-distill", teacher=str(teacher_dir), shards=str(blue_shards), out=str(tmp_path),
                    guidance_scale=5000.0, guidance_coefficient=convention)
    student = build_student(cfg, teacher_dir).eval()
    alphabar = teacher.schedule.alphabar[batch["t"]].float().reshape(-1, 1, 1, 1)
    c_t = (1 - alphabar).sqrt() if convention == "sigma" else teacher.schedule.betas[batch["t"]].float().sqrt()
    with torch.no_grad():
        loss = micro_batch_loss(cfg, student, teacher.schedule, "cpu", batch, text, None).item()
        eps_student = unet_eps(student, teacher.schedule, batch["zt"], batch["t"], text)
    target = batch["eps"] + 5000.0 * c_t.reshape(-1, 1, 1, 1) * batch["grad"]
    assert loss == pytest.approx((eps_student - target).pow(2).mean().item(), rel=1e-5)


def test_the_classifier_guided_teacher_takes_either_coefficient(teacher_dir, teacher, tmp_path):
    """PATH@blue=GAMMA samples with sqrt(beta_t) (the seed), PATH@blue=GAMMA@sigma with sigma_t; the sampler uses
    it (gamma 0: the same latents; gamma 100: different ones); @sigma elsewhere is refused."""
    from diffusion.samplers import classifier_guided_ddim
    from evaluation.models import parse_model_arg

    seed, sigma = parse_model_arg(f"{teacher_dir}@blue=50"), parse_model_arg(f"{teacher_dir}@blue=50@sigma")
    assert (seed.coefficient, sigma.coefficient) == ("sqrt-beta", "sigma") and sigma.guidance_scale == 50.0
    assert sigma.label == "teacher blue guidance 50 (sigma)" and sigma.to_dict()["coefficient"] == "sigma"
    student = tmp_path / "student"  # what describe_model reads of a cfg-distill student
    student.mkdir()
    (student / "model_index.json").write_text("{}")
    (student / "distillation.json").write_text('{"method": "cfg-distill", "guidance_scale": 7.5}')
    for bad in (f"{teacher_dir}@cfg=3@sigma", f"{teacher_dir}@sigma", f"{student}@sigma"):
        with pytest.raises(UserError, match="applies to a teacher with classifier guidance"):
            parse_model_arg(bad)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda gamma, c: classifier_guided_ddim(teacher, blue_tone_loss, gamma, ["a"], noise, 2, c)  # noqa: E731
    torch.testing.assert_close(run(0.0, "sqrt-beta"), run(0.0, "sigma"))
    assert (run(100.0, "sqrt-beta") - run(100.0, "sigma")).abs().max() > 1e-4
