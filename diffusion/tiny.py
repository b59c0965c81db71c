"""Write a complete, tiny StableDiffusionPipeline folder with random weights and the real CLIP tokenizer.

Used by tests and benchmarks so that the real `from_pretrained` loading path is what they exercise.
The CLIP BPE merges ship inside open_clip; the HF vocabulary is rebuilt from them exactly as CLIP does.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Stable Diffusion 1.x's scheduler config (scaled_linear 0.00085..0.012, 1000 steps).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)

# A CPU-sized SD-like teacher for benchmarks: VAE factor 8, a 3-level UNet with cross-attention.
CPU_SIZES = dict(channels=(64, 128, 256), text_dim=128, vae_channels=(32, 64, 64, 64))


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer (ids as openai/clip-vit-large-patch14), built offline from open_clip's vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
            pad_token="<|endoftext|>", model_max_length=max_length,
        )


def tiny_components(
    resolution: int = 32, channels: tuple[int, ...] = (32, 64), text_dim: int = 32, vae_channels=(32, 64), seed: int = 0
) -> dict:
    """Random-weight VAE (factor 2 ** (len(vae_channels) - 1)), CLIP text encoder and UNet."""
    torch.manual_seed(seed)
    factor = 2 ** (len(vae_channels) - 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1, norm_num_groups=min(32, vae_channels[0]), sample_size=resolution,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    unet = UNet2DConditionModel(
        sample_size=resolution // factor, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=min(32, channels[0]),
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
    )
    return dict(vae=vae, text_encoder=text_encoder, unet=unet)


def write_tiny_teacher(folder: str | Path, resolution: int = 32, seed: int = 0, **sizes) -> Path:
    """Save a StableDiffusionPipeline-layout teacher to `folder` (safetensors weights) and return its path."""
    folder = Path(folder)
    parts = tiny_components(resolution=resolution, seed=seed, **sizes)
    pipe = StableDiffusionPipeline(
        **parts, tokenizer=clip_tokenizer(), scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# The SDXL-layout counterpart of CPU_SIZES: the same UNet widths; two 128-wide text encoders.
CPU_SDXL_SIZES = dict(channels=CPU_SIZES["channels"], text_dims=(128, 128), projection_dim=128,
                      vae_channels=CPU_SIZES["vae_channels"])

# SDXL base's scheduler config (the same betas as SD; Euler with leading spacing).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)


def tiny_sdxl_components(resolution: int = 32, channels: tuple[int, ...] = (32, 64), text_dims=(32, 32),
                         projection_dim: int = 32, vae_channels=(32, 64), seed: int = 0) -> dict:
    """Random-weight SDXL-layout parts: the VAE, two CLIP text encoders (the second with a projection, whose
    output is the pooled embedding) and a UNet with `addition_embed_type="text_time"` whose cross-attention
    takes both encoders' hidden states concatenated (as diffusers' own SDXL tests build it)."""
    from transformers import CLIPTextModelWithProjection

    parts = tiny_components(resolution=resolution, channels=channels, text_dim=text_dims[0], vae_channels=vae_channels,
                            seed=seed)
    factor = 2 ** (len(vae_channels) - 1)
    time_dim = 8
    clip = dict(vocab_size=49408, intermediate_size=2 * text_dims[1], num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=text_dims[1], projection_dim=projection_dim, **clip))
    parts["unet"] = UNet2DConditionModel(
        sample_size=resolution // factor, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, cross_attention_dim=sum(text_dims), attention_head_dim=tuple(c // 16 for c in channels),
        norm_num_groups=min(32, channels[0]), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim, transformer_layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
    )
    return parts


def write_tiny_sdxl_teacher(folder: str | Path, resolution: int = 32, seed: int = 0,
                            force_zeros_for_empty_prompt: bool = True, **sizes) -> Path:
    """Save a StableDiffusionXLPipeline-layout teacher to `folder` (safetensors weights) and return its path. The
    second tokenizer pads with "!" as SDXL's does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = Path(folder)
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(
        **tiny_sdxl_components(resolution=resolution, seed=seed, **sizes), tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
