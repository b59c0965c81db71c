"""Load a frozen text-to-image teacher in diffusers' StableDiffusionPipeline layout, and wrap it once.

Every stage talks to the teacher through `Teacher`: text encoding with "" as the unconditional prompt,
VAE encode/decode in the scaled latent space, and eps predictions (cond and uncond in one batched forward).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion.errors import UserError
from diffusion.files import sha256_file
from diffusion.schedule import NoiseSchedule
from diffusion.unet import unet_eps

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_GET_IT = "download it once with `hf download <repo-id> --local-dir DIR` on a machine with internet"


def resolve_teacher_dir(teacher: str | os.PathLike) -> Path:
    """A local folder, or a hub id already in the local HF cache (never downloads)."""
    path = Path(teacher).expanduser()
    if path.exists():
        return path
    if str(teacher).count("/") == 1 and not str(teacher).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(teacher), local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise UserError(f"teacher {teacher!r} is neither a folder nor in the local HF cache; {_GET_IT}") from None
    raise UserError(f"teacher folder {path} does not exist; {_GET_IT}")


def check_teacher_files(root: Path) -> None:
    """Raise one clear line naming the first missing file of the StableDiffusionPipeline layout."""
    required = [root / "model_index.json"] + [root / c / "config.json" for c in ("vae", "text_encoder", "unet")]
    required.append(root / "scheduler" / "scheduler_config.json")
    for path in required:
        if not path.is_file():
            raise UserError(f"teacher file missing: {path}; {_GET_IT}")
    for component in ("vae", "text_encoder", "unet"):
        if not any(f.suffix in WEIGHT_SUFFIXES for f in (root / component).iterdir()):
            raise UserError(f"teacher weights missing: no *.safetensors in {root / component}; {_GET_IT}")
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or (tok / "vocab.json").is_file()):
        raise UserError(f"teacher file missing: {tok / 'tokenizer.json'} (or vocab.json + merges.txt); {_GET_IT}")


def teacher_fingerprint(root: Path) -> str:
    """sha256 over the configs and the full contents of the weight files of the teacher's components."""
    digest = hashlib.sha256()
    for component in COMPONENTS:
        folder = root / component
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.suffix == ".json":
                content = json.dumps(json.loads(f.read_text()), sort_keys=True).encode()
                digest.update(f"{component}/{f.name}:{hashlib.sha256(content).hexdigest()}\n".encode())
            elif f.suffix in WEIGHT_SUFFIXES or f.name in ("vocab.json", "merges.txt"):
                digest.update(f"{component}/{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


@dataclass
class Teacher:
    """A frozen teacher. `unet` is the wrapped diffusers model (k-diffusion's `inner_model` habit)."""

    unet: UNet2DConditionModel | None  # None when loaded without it (the trainer only needs the text encoder)
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    scheduler_config: dict
    fingerprint: str
    root: Path

    def __post_init__(self) -> None:
        for module in (m for m in (self.unet, self.vae, self.text_encoder) if m is not None):
            module.requires_grad_(False)
            module.eval()

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_scale_factor:
            raise UserError(f"--resolution {resolution} is not a multiple of the VAE's factor {self.vae_scale_factor}")
        side = resolution // self.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Last hidden state of the text encoder for captions padded to the tokenizer's max length."""
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, vae_noise: torch.Tensor) -> torch.Tensor:
        """Scaled latents z0 = scaling_factor * (mean + std * vae_noise) of pixels in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z0 = dist.mean + dist.std * vae_noise.to(self.device, dist.mean.dtype)
        return z0 * self.vae.config.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (differentiable: used for classifier gradients)."""
        return self.vae.decode(z0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """eps prediction (whatever the teacher's prediction type), in float32."""
        return unet_eps(self.unet, self.schedule, z_t, t, text_embeddings)

    @torch.no_grad()
    def eps_cond_uncond(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) from one batched forward of 2B samples."""
        batch = z_t.shape[0]
        uncond = uncond.expand(batch, -1, -1) if uncond.shape[0] == 1 else uncond
        eps = self.eps(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        return eps[:batch], eps[batch:]


def load_unet(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The UNet of a StableDiffusionPipeline folder, from local files only."""
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)


def quiet_library_progress() -> None:
    """Our own progress bars say what is happening; the libraries' per-file loading bars only add noise."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_teacher(
    teacher: str | os.PathLike, dtype: str = "fp32", device: str | torch.device = "cpu", with_unet_and_vae: bool = True,
    with_fingerprint: bool = True,
) -> Teacher:
    """Load the components from local files only; a missing file is one clear UserError. Without
    `with_fingerprint` (sampling only) the weights are not hashed and `fingerprint` is ""."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    root = resolve_teacher_dir(teacher)
    check_teacher_files(root)
    quiet_library_progress()
    torch_dtype = DTYPES[dtype]
    kwargs = {"local_files_only": True, "torch_dtype": torch_dtype}
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    unet = vae = None
    if with_unet_and_vae:
        unet = load_unet(root, torch_dtype).to(device)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kwargs).to(device)
    return Teacher(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kwargs).to(device),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
        schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        scheduler_config=scheduler_config,
        fingerprint=teacher_fingerprint(root) if with_fingerprint else "",
        root=root,
    )
