"""Train the digits world's teacher on CPU, in StableDiffusionPipeline layout.

Components: a small VAE (factor 4: 32 px images, 4x8x8 latents), a small CLIP text encoder with the real CLIP
tokenizer, a small cross-attention UNet on SD's scheduler (scaled_linear, 1000 steps, eps prediction).
Training: the VAE first (reconstruction + a light KL), its scaling factor set to 1 / std of the latents as SD
does, then the UNet and the text encoder together on eps-MSE with 15 % of captions dropped to "" so that
classifier-free guidance works; the saved UNet is an EMA of the trained one.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion.schedule import NoiseSchedule
from diffusion.tiny import SD_SCHEDULER, clip_tokenizer
from digits.data import caption
from trainer.ema import lerp_toward_
from trainer.optim import make_adam

TOKENS = 16  # captions here are short; the pipeline pads to the tokenizer's max length
ADAM_BETAS = (0.9, 0.999)  # AdamW's defaults


@dataclass
class TeacherRecipe:
    vae_steps: int = 400
    unet_steps: int = 2000
    batch_size: int = 128
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    caption_dropout: float = 0.15
    ema_decay: float = 0.999
    seed: int = 0


def make_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "tokenizer": clip_tokenizer(TOKENS)}


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, recipe: TeacherRecipe) -> float:
    """Reconstruction (MSE) + 1e-4 KL; returns the scaling factor 1 / std of the latent means."""
    optimizer = make_adam(vae.parameters(), decoupled=True, lr=recipe.vae_lr, betas=ADAM_BETAS, eps=1e-8)
    generator = torch.Generator().manual_seed(recipe.seed)
    vae.train()
    for _ in tqdm(range(recipe.vae_steps), desc="digits teacher: VAE", unit="step"):
        batch = pixels[torch.randint(0, len(pixels), (recipe.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, batch) + 1e-4 * posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    return float(1.0 / means.std())


def train_unet(parts: dict, latents: torch.Tensor, labels: np.ndarray, recipe: TeacherRecipe,
               train_text_encoder: bool = True) -> UNet2DConditionModel:
    """eps-MSE on z_t = a_t z0 + sigma_t eps with a fresh caption per sample and 15 % empty captions. With
    `train_text_encoder` False the text encoder stays frozen (a fine-tune that keeps the base's text embeddings)."""
    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    text_encoder.requires_grad_(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    optimizer = make_adam(params, decoupled=True, lr=recipe.unet_lr, betas=ADAM_BETAS, eps=1e-8, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    ema = copy.deepcopy(unet).requires_grad_(False)
    averages, currents = list(ema.parameters()), list(unet.parameters())
    rng, generator = random.Random(recipe.seed), torch.Generator().manual_seed(recipe.seed)
    unet.train()
    text_encoder.train(train_text_encoder)
    progress = tqdm(range(recipe.unet_steps), unit="step",
                    desc="digits teacher: UNet" + " + text encoder" * train_text_encoder)
    for step in progress:
        index = torch.randint(0, len(latents), (recipe.batch_size,), generator=generator)
        texts = ["" if rng.random() < recipe.caption_dropout else caption(int(labels[i]), rng) for i in index]
        ids = tokenizer(texts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, schedule.num_timesteps, (recipe.batch_size,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        z_t = schedule.add_noise(latents[index], noise, t)
        eps = unet(z_t, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(eps, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        lerp_toward_(averages, currents, 1 - min(recipe.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


def train_teacher(pixels: torch.Tensor, labels: np.ndarray, out: Path, recipe: TeacherRecipe | None = None) -> dict:
    """Train on pixels (N x 3 x 32 x 32 in [-1, 1]) and save a StableDiffusionPipeline folder to `out`."""
    recipe = recipe or TeacherRecipe()
    start = time.perf_counter()
    parts = make_components(recipe.seed)
    scaling = train_vae(parts["vae"], pixels, recipe)
    parts["vae"].register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        latents = torch.cat([parts["vae"].encode(pixels[i:i + 256]).latent_dist.mean
                             for i in range(0, len(pixels), 256)]) * scaling
    unet = train_unet(parts, latents, labels, recipe)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"].eval(), tokenizer=parts["tokenizer"], unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return {"seconds": time.perf_counter() - start, "vae_scaling_factor": scaling, "recipe": recipe.__dict__}
