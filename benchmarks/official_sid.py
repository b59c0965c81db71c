"""One training iteration of the official SiD-LSG code (github.com/mingyuanzhou/SiD-LSG), as a timed contender.

`OfficialProcess(official, teacher_dir, prompts, batch_size, kappa)` starts a process of its own that builds,
once, what the official `training/sid_training_loop.py` builds (lines 205-331: teacher UNet loaded by its
`load_sd15`, fake score net and generator deep-copied from it, an EMA copy, two Adam optimisers) on our tiny
StableDiffusionPipeline folder (`OfficialLoop`); each `step()` then runs one pass of the loop body (lines
383-567) there, single process, fp32, on the CPU, while the caller waits:

1. `gc.collect()` (line 385; the `torch.cuda.empty_cache()` beside it frees a CUDA cache there is none of here).
   It is official work, but its cost grows with the process's Python objects, not with the model: on the tiny
   CPU teacher it is about a quarter of the iteration (~0.27 s of ~1.0 s, batch 4, res 64). That is why the
   loop runs in its own process: in the benchmark's, it would also scan our loop's objects. `collect_garbage
   =False` leaves it out, to show what the rest of the official iteration costs;
2. fake score update (388-462): batch_size prompts from the prompt iterator, 10% of them blanked (the context
   dropout of lines 208-211 is on whenever kappa1 or kappa2 is not 1), z and noise, the generator's one-step sample
   without grad (`sid_sd_sampler`, t_init = 625), t ~ U{20..979}, the kappa1-guided fake epsilon prediction
   (`sid_sd_denoise`: tokenises and encodes prompt and blank text with the CLIP text encoder, 2B batch), the
   squared error loss, backward, NaN-to-num of the grads, Adam step;
3. generator update (465-549): new prompts, z, noise and t, the one-step sample with grad, the kappa2 = kappa3
   fake and kappa4 real x0 predictions (`sid_sd_denoise`, each 2B), the alpha-weighted SiD loss, backward into the
   generator, NaN-to-num of the grads, Adam step;
4. the generator EMA update (553-563, on by default: --ema 0.5 Mimg, ramp-up 0.05) and cur_nimg += batch_size.

Imported from the checkout (path put first on sys.path only while importing): `load_sd15`, `sid_sd_sampler`,
`sid_sd_denoise` (training/sid_sd_util.py 51-118, 163-211, 214-274), `InfiniteSampler` (torch_utils/misc.py
110-141), `training_stats.report` (works without init in one process), `dnnlib.util.construct_class_by_name`.
Replicated, since they are written inline in `training_loop()` (which cannot be called piecewise, and whose module
imports metrics code needing `dill`): the seeding (238-239), the loop body above with its two losses and EMA, the
optimiser settings of sid_train.py 220-221 (Adam, betas (0, 0.999), eps 1e-8, lr 1e-6) and the prompt dataset
(training/aesthetics_dataset.py 49-50 returns a dummy image and a prompt; the class itself reads a file and needs
`blobfile`). Defaults are sid_train.py's (tmin 20, tmax 980, init_timestep 625, loss scaling 1) except alpha = 1.2
(sid_train.py defaults to 1; alpha only picks the loss formula of line 526 or 528, same cost).

Deviations: no DistributedDataParallel (one process; `misc.ddp_sync` is then a no-op), so no barriers; the prompt
DataLoader runs in-process (num_workers 0, no pinned memory) instead of one prefetching worker; the tick-time
maintenance (status line, CUDA memory stats, snapshots, metrics, stats.jsonl) is skipped, it runs every
`--tick` kimg, not every iteration; xformers is off (CPU); with torch versions whose Sampler.__init__ takes no
dataset, InfiniteSampler's attributes are set without its __init__ (its __iter__ is used as is); blank prompt
lines are dropped; epsilon-prediction teachers only (the v-prediction branch of lines 424-441 needs `compute_snr`
and a DDIM scheduler that `load_sd15` forgets to import).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

NEEDED = ("training/sid_training_loop.py", "training/sid_sd_util.py", "torch_utils/misc.py",
          "torch_utils/training_stats.py", "dnnlib/util.py")
# sid_train.py defaults (lines 99, 125, 127-133) and training_loop()'s ema_rampup_ratio (line 162).
INIT_TIMESTEP, TMIN, TMAX, ALPHA, LOSS_SCALING = 625, 20, 980, 1.2, 1.0
EMA_HALFLIFE_KIMG, EMA_RAMPUP_RATIO = 500, 0.05
ADAM = dict(class_name="torch.optim.Adam", lr=1e-6, betas=[0.0, 0.999], eps=1e-8)  # sid_train.py 220-221, fp32
CONTEXT_DROPOUT = 0.1  # training loop line 394


def official_available(official: Path) -> str | None:
    """None if `official` looks like a usable SiD-LSG checkout, else why not (one line)."""
    for name in NEEDED:
        if not (Path(official) / name).is_file():
            return f"{name} not found under {official}"
    return None


def _import(official: Path, name: str):
    """Import the checkout's module `name`, refusing a same-named module from elsewhere."""
    root = Path(official).resolve()
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(root))
    if not Path(module.__file__).resolve().is_relative_to(root):
        raise ImportError(f"{name} was imported from {module.__file__}, not from the checkout {root}")
    return module


class PromptDataset(torch.utils.data.Dataset):
    """training/aesthetics_dataset.py ImageDataset with prompt_only=True (lines 49-50), from a list."""

    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx):
        return torch.zeros(1, 4, 4), self.prompts[idx]


def infinite_sampler(sampler_class, dataset, seed: int):
    """torch_utils/misc.py InfiniteSampler(dataset, rank=0, num_replicas=1, seed=seed), as line 274 makes it. Its
    __init__ passes the dataset on to torch's Sampler.__init__, which newer torch no longer takes: there the same
    attributes are set directly, so that the official __iter__ (lines 124-141) still draws the order."""
    try:
        return sampler_class(dataset=dataset, rank=0, num_replicas=1, seed=seed)
    except TypeError:
        sampler = sampler_class.__new__(sampler_class)
        vars(sampler).update(dataset=dataset, rank=0, num_replicas=1, shuffle=True, seed=seed, window_size=0.5)
        return sampler


def fake_score_loss(noise_fake: torch.Tensor, noise: torch.Tensor, batch_gpu_total: int) -> tuple[torch.Tensor, bool]:
    """training/sid_training_loop.py 423-445 (epsilon prediction): drop NaN samples, sum of squared errors; and
    whether any sample is left (the loop skips backward otherwise, line 449)."""
    nan_mask = torch.isnan(noise_fake).flatten(start_dim=1).any(dim=1)
    if nan_mask.any():
        noise_fake, noise = noise_fake[~nan_mask], noise[~nan_mask]
    loss = ((noise_fake - noise) ** 2).sum().mul(LOSS_SCALING / batch_gpu_total)
    return loss, len(noise) > 0


def generator_loss(images, y_real, y_fake, alpha: float, batch_gpu_total: int) -> tuple[torch.Tensor, bool]:
    """training/sid_training_loop.py 508-530: drop NaN samples, the alpha-weighted SiD loss over the per-sample
    weight factor; and whether any sample is left (the loop skips backward otherwise, line 532)."""
    nan_mask = torch.stack([torch.isnan(x).flatten(start_dim=1).any(dim=1) for x in (images, y_real, y_fake)]).any(0)
    if nan_mask.any():
        images, y_real, y_fake = images[~nan_mask], y_real[~nan_mask], y_fake[~nan_mask]
    with torch.no_grad():
        weight_factor = abs(images - y_real).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    if alpha == 1:
        loss = (y_real - y_fake) * (y_fake - images) / weight_factor
    else:
        loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / weight_factor
    loss = loss.sum().mul(LOSS_SCALING / batch_gpu_total)
    return loss, len(y_real) > 0


def clean_gradients(net: torch.nn.Module) -> None:
    """training/sid_training_loop.py 458-460 and 541-543."""
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)


class OfficialLoop:
    """The state training_loop() builds (lines 205-331) and one pass of its loop body (lines 383-567)."""

    def __init__(self, official: Path, teacher_dir: Path, prompts: list[str], batch_size: int, kappa: float,
                 seed: int):
        sd_util = _import(official, "training.sid_sd_util")
        misc, self.stats = _import(official, "torch_utils.misc"), _import(official, "torch_utils.training_stats")
        dnnlib_util = _import(official, "dnnlib.util")
        self.sampler, self.denoise = sd_util.sid_sd_sampler, sd_util.sid_sd_denoise
        np.random.seed(seed % (1 << 31))  # lines 238-239 (one process: rank 0)
        torch.manual_seed(np.random.randint(1 << 31))
        with contextlib.redirect_stdout(sys.stderr):  # load_sd15 prints; keep a benchmark's stdout for its figures
            unet, vae, self.scheduler, self.text_encoder, self.tokenizer = sd_util.load_sd15(
                pretrained_model_name_or_path=str(teacher_dir), pretrained_vae_model_name_or_path=None,
                device=torch.device("cpu"), weight_dtype=torch.float32, enable_xformers=False, lora_config=None)
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError("only epsilon-prediction teachers are replicated (see the module docstring)")
        self.resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.true_score = unet.eval().requires_grad_(False)  # lines 284-287
        self.fake_score = copy.deepcopy(unet).train().requires_grad_(True)
        self.G = copy.deepcopy(unet).train().requires_grad_(True)
        self.fake_optimizer = dnnlib_util.construct_class_by_name(params=self.fake_score.parameters(), **ADAM)
        self.g_optimizer = dnnlib_util.construct_class_by_name(params=self.G.parameters(), **ADAM)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)  # lines 324-325
        self.fake_score.eval().requires_grad_(False)  # lines 330-331
        self.G.eval().requires_grad_(False)
        dataset = PromptDataset(prompts)  # lines 273-275, in-process
        self.prompts = iter(torch.utils.data.DataLoader(
            dataset, sampler=infinite_sampler(misc.InfiniteSampler, dataset, seed), batch_size=batch_size))
        self.batch_size, self.kappa, self.cur_nimg = batch_size, kappa, 0
        self.context_dropout = kappa != 1  # lines 208-211: cfg_train_fake = cfg_eval_fake = kappa

    def _draw(self, dropout: bool):
        """Prompts, z, noise and t_init for one round (lines 392-402 and 473-483)."""
        _, contexts = next(self.prompts)
        if dropout:
            blank = torch.rand(len(contexts)) < CONTEXT_DROPOUT
            contexts = ["" if flag else context for flag, context in zip(blank.tolist(), contexts)]
        z = torch.randn([len(contexts), *self.latent_shape], dtype=torch.float32)
        init_timesteps = INIT_TIMESTEP * torch.ones((len(contexts),), dtype=torch.long)
        return contexts, z, torch.randn_like(z), init_timesteps

    def _sample(self, z, contexts, init_timesteps):
        return self.sampler(unet=self.G, latents=z, contexts=contexts, init_timesteps=init_timesteps,
                            noise_scheduler=self.scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            resolution=self.resolution, dtype=torch.float32, return_images=False, vae=None,
                            num_steps=1)

    def _denoise(self, unet, images, noise, contexts, timesteps, **kwargs):
        return self.denoise(unet=unet, images=images, noise=noise, contexts=contexts, timesteps=timesteps,
                            noise_scheduler=self.scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            resolution=self.resolution, dtype=torch.float32, guidance_scale=self.kappa, **kwargs)

    def update_fake_score(self) -> None:
        """Lines 388-462 (one accumulation round: batch_gpu = batch_size in one process)."""
        self.fake_score.train().requires_grad_(True)
        self.fake_optimizer.zero_grad(set_to_none=True)
        contexts, z, noise, init_timesteps = self._draw(self.context_dropout)
        with torch.no_grad():
            images = self._sample(z, contexts, init_timesteps)
        timesteps = torch.randint(TMIN, TMAX, (len(contexts),), dtype=torch.long)
        noise_fake = self._denoise(self.fake_score, images, noise, contexts, timesteps, predict_x0=False)  # kappa1
        loss, kept = fake_score_loss(noise_fake, noise, self.batch_size)
        if kept:
            loss.backward()
        self.stats.report("fake_score_Loss/loss", loss.item())  # lines 452-453
        self.fake_score.eval().requires_grad_(False)
        clean_gradients(self.fake_score)
        self.fake_optimizer.step()

    def update_generator(self) -> None:
        """Lines 465-549 (fp32: no gradient clipping, line 546)."""
        self.G.train().requires_grad_(True)
        self.g_optimizer.zero_grad(set_to_none=True)
        contexts, z, noise, init_timesteps = self._draw(False)  # use_context_dropout_train_G = False (line 212)
        timesteps = torch.randint(TMIN, TMAX, (len(contexts),), dtype=torch.long)
        images = self._sample(z, contexts, init_timesteps)
        y_fake = self._denoise(self.fake_score, images, noise, contexts, timesteps)  # kappa2 = kappa3
        y_real = self._denoise(self.true_score, images, noise, contexts, timesteps)  # kappa4
        loss, kept = generator_loss(images, y_real, y_fake, ALPHA, self.batch_size)
        if kept:
            loss.backward()
        self.stats.report("G_Loss/loss", loss.item())  # lines 535-536
        self.G.eval().requires_grad_(False)
        clean_gradients(self.G)
        self.g_optimizer.step()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Lines 553-563 and 567."""
        halflife_nimg = min(EMA_HALFLIFE_KIMG * 1000, self.cur_nimg * EMA_RAMPUP_RATIO)
        beta = 0.5 ** (self.batch_size / max(halflife_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        self.cur_nimg += self.batch_size

    def iteration(self, collect_garbage: bool = True) -> None:
        if collect_garbage:
            gc.collect()  # line 385, every iteration
        self.G.eval().requires_grad_(False)  # line 386
        self.update_fake_score()
        self.update_generator()
        self.update_ema()


class OfficialProcess:
    """The official loop in a process of its own, one iteration per `step()`, stepped over a pipe while the
    benchmark's process waits: its gc.collect() then scans the official loop's Python objects only, as in the
    official code's own process (in the benchmark's process it would also scan ours and cost more)."""

    def __init__(self, official: Path, teacher_dir: Path, prompts: Path, batch_size: int, kappa: float,
                 seed: int = 0, collect_garbage: bool = True):
        if (problem := official_available(official)) is not None:
            raise FileNotFoundError(problem)
        job = {"official": str(official), "teacher_dir": str(teacher_dir), "prompts": str(prompts),
               "batch_size": batch_size, "kappa": kappa, "seed": seed}
        self.command = "step" if collect_garbage else "step-without-gc"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(job)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self._expect("ready")

    def step(self) -> None:
        self.process.stdin.write(self.command + "\n")
        self.process.stdin.flush()
        self._expect("done")

    def _expect(self, word: str) -> None:
        if (line := self.process.stdout.readline().strip()) != word:
            self.log.seek(0)
            raise RuntimeError(f"official contender: expected {word!r}, got {line!r}:\n{self.log.read()[-3000:]}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def _serve(job: dict) -> None:
    """The child of OfficialProcess: build the loop, say "ready", then one iteration per line read."""
    protocol, sys.stdout = sys.stdout, sys.stderr  # anything the official code prints goes to the log
    prompts = [p for p in Path(job["prompts"]).read_text().splitlines() if p.strip()] or [""]
    loop = OfficialLoop(Path(job["official"]), Path(job["teacher_dir"]), prompts, job["batch_size"], job["kappa"],
                        job["seed"])
    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        loop.iteration(collect_garbage=line.strip() == "step")
        print("done", file=protocol, flush=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
