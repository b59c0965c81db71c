"""Load a frozen text-to-image teacher in diffusers' StableDiffusionPipeline or StableDiffusionXLPipeline layout,
and wrap it once.

Every stage talks to the teacher through `Teacher`: text encoding into what its UNet takes (a `Conditioning`,
with "" as the unconditional prompt), VAE encode/decode in the scaled latent space, and eps predictions (cond and
uncond in one batched forward). What differs between SD 1.x/2.x and SDXL lives here and nowhere else: SDXL's
second text encoder, its pooled embedding, its micro-conditioning and its zero unconditional embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusion.conditioning import Conditioning, square_micro
from diffusion.errors import UserError, one_line
from diffusion.files import sha256_file
from diffusion.resolution import vae_factor
from diffusion.schedule import NoiseSchedule
from diffusion.unet import cond_uncond_eps, unet_eps

# An SD folder has no text_encoder_2 / tokenizer_2, so its fingerprint is what it was before SDXL.
COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "text_encoder_2", "tokenizer_2")
MODEL_CLASSES = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel,
                 "text_encoder_2": CLIPTextModelWithProjection}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WEIGHT_STEM = {"vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model"}
_INDEX = re.compile(r"\.(?:safetensors|bin)\.index(?:\.([^.]+))?\.json$")  # model.safetensors.index[.fp16].json
_SHARD = re.compile(r"-\d+-of-\d+")  # model.fp16-00001-of-00002.safetensors
# What from_pretrained raises for a truncated or foreign weight file, a bad config.json or mismatched shapes.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANT_HELP = ("The teacher's weight variant, e.g. fp16 for *.fp16.safetensors [per component: the plain "
                "weights, else the only variant there is].")
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


def weight_files(folder: Path) -> dict[str | None, list[Path]]:
    """A component folder's weight files by variant, None for the plain ones: `model.safetensors` is plain,
    `model.fp16.safetensors` the fp16 variant (diffusers' `save_pretrained(variant="fp16")`), with shards
    (`model.fp16-00001-of-00002.safetensors`) and their index (`model.safetensors.index.fp16.json`)."""
    found: dict[str | None, list[Path]] = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if index := _INDEX.search(f.name):
            variant = index.group(1)
        elif f.suffix in WEIGHT_SUFFIXES:
            stem = _SHARD.sub("", f.name[: -len(f.suffix)])
            variant = stem.rpartition(".")[2] if "." in stem else None
        else:
            continue
        found.setdefault(variant, []).append(f)
    return found


def component_variant(folder: Path, variant: str | None = None) -> str | None:
    """The variant to load from a component folder: `variant` if given (a missing one is one clear line), else
    the plain weights when present, else the one variant there is (a folder of fp16 weights only)."""
    files = weight_files(folder)
    if variant is not None:
        if variant not in files:
            missing = folder / f"{_WEIGHT_STEM.get(folder.name, 'model')}.{variant}.safetensors"
            have = ", ".join(sorted("plain weights" if v is None else f"variant {v}" for v in files)) or "no weights"
            raise UserError(f"teacher weights missing: {missing} (--variant {variant}); {folder.name} has: {have}")
        return variant
    if None in files:
        return None
    if not files:
        raise UserError(f"teacher weights missing: no *.safetensors in {folder}; {_GET_IT}")
    if len(files) > 1:
        raise UserError(f"{folder} has no plain weights but the variants {', '.join(sorted(files))}; pick one with "
                        "--variant")
    return next(iter(files))


def is_sdxl(root: Path) -> bool:
    """Whether a pipeline folder has SDXL's layout: its model_index.json names a second text encoder."""
    index = root / "model_index.json"
    return index.is_file() and bool((_read_json(index).get("text_encoder_2") or [None])[0])


def check_teacher_files(root: Path, variant: str | None = None) -> dict[str, str | None]:
    """Raise one clear line naming the first missing file of the StableDiffusionPipeline (or SDXL) layout;
    return the variant each weighted component loads (see component_variant)."""
    sdxl = is_sdxl(root)
    components = tuple(c for c in MODEL_CLASSES if c != "text_encoder_2" or sdxl)  # SDXL adds text_encoder_2
    required = [root / "model_index.json"] + [root / c / "config.json" for c in components]
    required.append(root / "scheduler" / "scheduler_config.json")
    for path in required:
        if not path.is_file():
            raise UserError(f"teacher file missing: {path}; {_GET_IT}")
    variants = {component: component_variant(root / component, variant) for component in components}
    for tok in (root / c for c in ("tokenizer", "tokenizer_2")[: 1 + sdxl]):
        if not ((tok / "tokenizer.json").is_file() or (tok / "vocab.json").is_file()):
            raise UserError(f"teacher file missing: {tok / 'tokenizer.json'} (or vocab.json + merges.txt); {_GET_IT}")
    return variants


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {one_line(error)}") from None


def teacher_fingerprint(root: Path, variant: str | None = None) -> str:
    """sha256 over the configs and the full contents of the weight files of the teacher's components: every
    weight file there (the rule before --variant existed, so shards built then still match), or with `variant`
    only that variant's files, so a teacher loaded as its fp16 variant is another teacher than its plain one."""
    digest = hashlib.sha256()
    for component in COMPONENTS:
        folder = root / component
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        chosen = weight_files(folder).get(variant, []) if variant is not None and component in MODEL_CLASSES else None
        for f in files:
            if chosen is not None and (_INDEX.search(f.name) or f.suffix in WEIGHT_SUFFIXES) and f not in chosen:
                continue  # another variant's weights or shard index
            if f.suffix == ".json":
                content = json.dumps(_read_json(f), sort_keys=True).encode()
                digest.update(f"{component}/{f.name}:{hashlib.sha256(content).hexdigest()}\n".encode())
            elif f.suffix in WEIGHT_SUFFIXES or f.name == "merges.txt":
                digest.update(f"{component}/{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


@dataclass
class Teacher:
    """A frozen teacher. `unet` is the wrapped diffusers model (k-diffusion's `inner_model` habit). An SDXL teacher
    also has `text_encoder_2` and `tokenizer_2`; `sample_size` is the pixel side its UNet's config names (the
    default target size of SDXL's micro-conditioning)."""

    unet: UNet2DConditionModel | None  # None when loaded without it (the trainer only needs the text encoder)
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    scheduler_config: dict
    fingerprint: str
    root: Path
    variants: dict[str, str | None] = field(default_factory=dict)  # component -> weight variant (None: plain)
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL's config: "" encodes to zeros (hidden and pooled)
    sample_size: int = 0

    def __post_init__(self) -> None:
        for module in (m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None):
            module.requires_grad_(False)
            module.eval()

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @cached_property
    def vae_scale_factor(self) -> int:
        return vae_factor(self.root)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.vae_scale_factor:
            raise UserError(f"--resolution {resolution} is not a multiple of the VAE's factor {self.vae_scale_factor}")
        side = resolution // self.vae_scale_factor
        return (self.vae.config.latent_channels, side, side)

    def _token_ids(self, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: list[str], size: int | None = None) -> Conditioning:
        """What the UNet takes for these captions, padded to the tokenizer's max length, as the teacher's
        pipeline encodes them. SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
        states concatenated, the second's projected pooled output, and the time ids of an uncropped square
        image of `size` pixels [the UNet's own size] (`Conditioning.with_micro` sets a sample's recorded ones);
        "" (the unconditional prompt) is all zeros when the config says force_zeros_for_empty_prompt."""
        if self.text_encoder_2 is None:
            return Conditioning(hidden=self.text_encoder(self._token_ids(self.tokenizer, captions))[0])
        first = self.text_encoder(self._token_ids(self.tokenizer, captions), output_hidden_states=True)
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, captions), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([c != "" for c in captions], device=hidden.device)
            hidden, pooled = hidden * keep[:, None, None], pooled * keep[:, None]
        time_ids = torch.tensor([square_micro(size or self.sample_size)] * len(captions), device=hidden.device)
        return Conditioning(hidden=hidden, pooled=pooled, time_ids=time_ids.float())

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, vae_noise: torch.Tensor) -> torch.Tensor:
        """Scaled latents z0 = scaling_factor * (mean + std * vae_noise) of pixels in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z0 = dist.mean + dist.std * vae_noise.to(self.device, dist.mean.dtype)
        return z0 * self.vae.config.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (differentiable: used for classifier gradients)."""
        return self.vae.decode(z0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, text: Conditioning | torch.Tensor) -> torch.Tensor:
        """eps prediction (whatever the teacher's prediction type), in float32."""
        return unet_eps(self.unet, self.schedule, z_t, t, text)

    @torch.no_grad()
    def eps_cond_uncond(
        self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor, uncond: Conditioning | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) from one batched forward of 2B samples (`uncond` one row or one per sample)."""
        return cond_uncond_eps(self.unet, self.schedule, z_t, t, cond, uncond)


def _cause(error: BaseException) -> str:
    """The library's first line, and that of the error it wrapped when there is one (a truncated file's)."""
    inner = error
    while (deeper := inner.__cause__ or inner.__context__) is not None:
        inner = deeper
    return one_line(error) if inner is error else f"{one_line(error)} ({one_line(inner)})"


def _from_pretrained(cls, root: Path, component: str, **kwargs):
    """`cls.from_pretrained` of one component folder, local files only; a failure is one line naming it."""
    try:
        return cls.from_pretrained(root, subfolder=component, local_files_only=True, **kwargs)
    except LOAD_ERRORS as error:
        variant = f" (variant {kwargs['variant']})" if kwargs.get("variant") else ""
        raise UserError(f"cannot load {root / component}{variant}: {_cause(error)}") from None


def load_model(root: Path, component: str, dtype: torch.dtype, variant: str | None) -> torch.nn.Module:
    """The vae, text_encoder(_2) or unet of a pipeline folder in `dtype`, whatever dtype its files hold, from the
    given weight variant (None: the plain weights)."""
    return _from_pretrained(MODEL_CLASSES[component], Path(root), component, torch_dtype=dtype, variant=variant)


def load_unet(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
              variant: str | None = None) -> UNet2DConditionModel:
    """The UNet of a StableDiffusionPipeline folder, from local files only: `variant`, or what the folder has
    (see component_variant)."""
    return load_model(Path(folder), "unet", dtype, component_variant(Path(folder) / "unet", variant))


def decoding_vae(root: Path, vae: AutoencoderKL | None) -> AutoencoderKL | None:
    """The VAE as the folder's own pipeline decodes with it: StableDiffusionXLPipeline upcasts a float16 VAE whose
    config says force_upcast (SDXL's overflows in float16), in place; StableDiffusionPipeline decodes in the
    VAE's dtype, so an SD VAE is returned as it is."""
    if vae is not None and is_sdxl(root) and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = vae.float()
    return vae


def quiet_library_progress() -> None:
    """Our own progress bars say what is happening; the libraries' per-file loading bars only add noise."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_teacher(
    teacher: str | os.PathLike, dtype: str = "fp32", device: str | torch.device = "cpu", with_unet_and_vae: bool = True,
    with_fingerprint: bool = True, variant: str | None = None,
) -> Teacher:
    """Load the components from local files only, every one in `dtype`; a missing or unreadable file is one clear
    UserError. `variant` (e.g. "fp16") picks weight files saved with `save_pretrained(variant=...)`; without it
    each component loads its plain weights, or its only variant (see component_variant). Without
    `with_fingerprint` (sampling only) the weights are not hashed and `fingerprint` is ""."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    root = resolve_teacher_dir(teacher)
    variants = check_teacher_files(root, variant)
    quiet_library_progress()
    torch_dtype = DTYPES[dtype]
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")
    unet = vae = None
    if with_unet_and_vae:
        unet = load_model(root, "unet", torch_dtype, variants["unet"]).to(device)
        vae = load_model(root, "vae", torch_dtype, variants["vae"]).to(device)
    sdxl = is_sdxl(root)
    vae = decoding_vae(root, vae)
    return Teacher(
        unet=unet,
        vae=vae,
        text_encoder=load_model(root, "text_encoder", torch_dtype, variants["text_encoder"]).to(device),
        tokenizer=_from_pretrained(CLIPTokenizer, root, "tokenizer"),
        schedule=NoiseSchedule.from_scheduler_config(scheduler_config),
        scheduler_config=scheduler_config,
        fingerprint=teacher_fingerprint(root, variant) if with_fingerprint else "",
        root=root,
        variants=variants,
        text_encoder_2=load_model(root, "text_encoder_2", torch_dtype, variants["text_encoder_2"]).to(device)
        if sdxl else None,
        tokenizer_2=_from_pretrained(CLIPTokenizer, root, "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=bool(_read_json(root / "model_index.json").get("force_zeros_for_empty_prompt",
                                                                                   sdxl)),  # the pipeline's default
        sample_size=_read_json(root / "unet" / "config.json")["sample_size"] * vae_factor(root),
    )
