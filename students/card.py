"""A student folder's model card: README.md with Hugging Face Hub front matter (base model, tags, license), then
what the student is, its recipe, how to sample it and its scores. Everything comes from `distillation.json`, so the
card says what the folder holds. `save_student` writes it; `evaluation coco30k` rewrites it with its scores."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from diffusion.errors import UserError
from shards.writer import atomic_write_bytes
from students.folder import pipeline_class, read_distillation

CARD = "README.md"
PROMPT = "a photo of a corgi"
EVALUATION_SCORES = {"fid": "FID", "clip_score": "CLIP score", "precision": "precision", "recall": "recall",
                     "blue_fraction": "blue fraction"}  # metrics.json key -> the card's name


def hub_id(path: str) -> str | None:
    """The hub id of a folder inside an HF cache (`.../models--ORG--NAME/snapshots/REVISION`), else None."""
    parts = Path(path).parts
    for name, following in zip(parts, parts[1:]):
        if name.startswith("models--") and following == "snapshots":
            return name.removeprefix("models--").replace("--", "/")
    return None


def base_model(record: dict[str, Any]) -> str:
    """The teacher as the Hub names it: its hub id when it sits in an HF cache, else its folder's name."""
    path = record["teacher"]["path"]
    return hub_id(path) or Path(path).name


def front_matter(text: str) -> dict[str, Any]:
    """A README's YAML front matter (between its first two `---` lines); {} when it has none or it is not YAML."""
    lines = text.splitlines()
    fences = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if len(fences) < 2 or fences[0] != 0:
        return {}
    try:
        header = yaml.safe_load("\n".join(lines[1:fences[1]]))
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def teacher_license(record: dict[str, Any]) -> str | None:
    """The license the teacher's own README.md declares (a student inherits it), None when it says none."""
    readme = Path(record["teacher"]["path"]) / CARD
    return front_matter(readme.read_text(errors="replace")).get("license") if readme.is_file() else None


def card_header(record: dict[str, Any]) -> dict[str, Any]:
    """The Hub's front matter: base model, library, task, tags, license (when the teacher's is known)."""
    lora = ["lora"] if "adapter" in record else []
    tags = ["text-to-image", "diffusers", "guided-distill", record["method"], *lora]
    header = {"base_model": base_model(record), "library_name": "diffusers", "pipeline_tag": "text-to-image",
              "tags": tags}
    if (license_name := teacher_license(record)) is not None:
        header["license"] = license_name
    return {**header, "inference": True}


def _range(values: list[float]) -> str:
    return f"[{values[0]:g}, {values[1]:g}]"


SUMMARIES = {  # method -> what its student does at sampling time, and what that costs
    "cfg-distill": lambda r: (f"classifier-free guidance at scale {r['guidance_scale']:g} is distilled in, so it "
                              "samples at guidance_scale 1 with one UNet pass per step (the teacher's CFG takes two)"),
    "classifier-distill": lambda r: (f"classifier guidance at gamma {r['guidance_scale']:g} is distilled in, so it "
                                     "samples with one UNet pass per step and no classifier"),
    "w-distill": lambda r: (f"guidance for any w in {_range(r['w_range'])} is distilled in (w reaches the UNet as "
                            "timestep_cond), so it samples at any such w with one UNet pass per step"),
    "progressive": lambda r: (f"it samples in {r['steps']} steps, one UNet pass each, at any w in "
                              f"{_range(r['w_range'])} (round {r['round']} of {r['rounds']}: distilled from "
                              f"{r['teacher_steps']} steps of the student before it)"),
    "sid-lsg": lambda r: "a one-step generator (one UNet pass per image) trained from prompts alone",
}


def summary(record: dict[str, Any]) -> str:
    """What the student is, in a sentence: method, teacher and the UNet passes an image costs."""
    kind = "A LoRA student" if "adapter" in record else "A student"
    what = SUMMARIES.get(record["method"])
    return (f"{kind} of `{base_model(record)}` distilled by guided-distill's `{record['method']}`"
            + (f": {what(record)}." if what else "."))


def guidance_setting(record: dict[str, Any]) -> str:
    """The guidance the student learned: the kappas, the w range or the scale."""
    if record["method"] == "sid-lsg":
        g = record["guidance"]
        return (f"kappa1-4 = {g['kappa1']:g}, {g['kappa2']:g}, {g['kappa3']:g}, {g['kappa4']:g} "
                f"(`{g['strategy']}` strategy, alpha {g['alpha']:g})")
    if record.get("w_range"):
        loss = f", `{record['w_loss']}` loss" if record.get("w_loss") else ""
        return f"w in {_range(record['w_range'])} (diffusers' guidance_scale){loss}"
    if record["method"] == "classifier-distill":
        name = (record.get("guidance") or {}).get("name", "classifier")
        coefficient = record["guidance_coefficient"]
        return f"`{name}` classifier guidance, gamma {record['guidance_scale']:g}, c_t `{coefficient}`"
    return f"classifier-free guidance scale {record['guidance_scale']:g}"


def training_length(record: dict[str, Any]) -> str:
    """How long it trained: kimg (sid-lsg), iterations of a progressive round, or optimiser steps."""
    if "kimg" in record:
        return f"{record['kimg']:g} kimg ({record['iterations']} iterations)"
    if "iters_per_round" in record:
        return (f"{record['iters_per_round']} iterations for this round ({record['teacher_steps']} -> "
                f"{record['steps']} sampling steps)")
    return f"{record['steps']} optimiser steps"


def data_source(record: dict[str, Any]) -> str | None:
    """The shards (fit, progressive) or prompt list (sid-lsg) it trained on."""
    if "prompts" in record:
        return f"{record['prompts']['count']} prompts from `{record['prompts']['path']}`"
    shards = record.get("shards")
    if shards is None:
        return None
    samples = f" ({shards['samples']} samples)" if shards.get("samples") else ""
    return f"shards `{shards['path']}`{samples}"


def ema_setting(record: dict[str, Any]) -> str:
    if record.get("ema_halflife_kimg") is not None:
        return f"half-life {record['ema_halflife_kimg']:g} kimg"
    return f"decay {record['ema_decay']:g}" if record.get("ema_decay") is not None else "off"


def lora_setting(adapter: dict[str, Any] | None) -> str | None:
    if adapter is None:
        return None
    merged = ", plus the merged pipeline" if adapter.get("merged_pipeline") else ""
    return (f"rank {adapter['rank']}, alpha {adapter['alpha']:g}, on {', '.join(adapter['target_modules'])}; "
            f"files {', '.join(f'`{name}`' for name in adapter['files'].values())}{merged}")


def recipe(record: dict[str, Any]) -> list[str]:
    """The training settings as Markdown bullets (the ones the record has)."""
    teacher = record["teacher"]
    fingerprint = f" (fingerprint `{teacher['fingerprint'][:16]}`)" if teacher.get("fingerprint") else ""
    start = record.get("start_student")
    rows = [("teacher", f"`{teacher['path']}`{fingerprint}"), ("started from", start and f"`{start}`"),
            ("guidance", guidance_setting(record)), ("training", training_length(record)),
            ("data", data_source(record)), ("global batch", record.get("global_batch_size")),
            ("mixed precision", record.get("mixed_precision")), ("EMA", ema_setting(record)),
            ("resolution", f"{record['resolution']} px" if record.get("resolution") else None),
            ("LoRA", lora_setting(record.get("adapter")))]
    return [f"- {label}: {value}" for label, value in rows if value is not None]


def imports(code: str) -> list[str]:
    """The import lines a snippet needs: the modules and diffusers classes it names (less those it imports)."""
    import diffusers

    modules = [m for m in ("torch", "safetensors.torch") if re.search(rf"(?<![\w.]){re.escape(m)}\.", code)]
    classes = sorted({name for name in re.findall(r"\b[A-Z]\w+", code) if hasattr(diffusers, name)})
    lines = [f"import {module}" for module in modules]
    lines += [f"from diffusers import {', '.join(classes)}"] if classes else []
    return [line for line in lines if line not in code]


def w_line(inference: dict[str, Any]) -> list[str]:
    """`w = ...`: the middle of a w range, for recipes whose call takes any w in it."""
    if not inference.get("w_range"):
        return []
    low, high = inference["w_range"]
    return [f"w = {(low + high) / 2:g}  # any w in {_range(inference['w_range'])}"]


def pipeline_code(inference: dict[str, Any], folder: str) -> str:
    """The folder's pipeline class (pipeline_class) from the folder, called with the recipe's steps and w (a
    record with no stock code of its own)."""
    arguments = ["prompt"]
    if "steps" in inference:
        arguments.append(f"num_inference_steps={inference['steps']}")
    if inference.get("w_range"):
        arguments.append("guidance_scale=w")
    return "\n".join([f'pipe = {pipeline_class(folder)}.from_pretrained("{folder}")',
                      f"image = pipe({', '.join(arguments)}).images[0]"])


def sid_code(record: dict[str, Any], folder: str) -> str:
    """A one-step generator samples through guided-distill's own function (diffusers' loop is not one-step)."""
    lora = record.get("adapter")
    export = ([f"# a LoRA student: `trainer export {folder}` first writes the merged pipeline this loads"]
              if lora and not lora.get("merged_pipeline") else [])
    return "\n".join([
        *export,
        "from diffusion.samplers import initial_noise, sid_one_step",
        "from diffusion.teacher import load_teacher",
        f'prompt = "{PROMPT}"',
        f'g = load_teacher("{folder}")',
        "side = g.unet.config.sample_size",
        "z = initial_noise([7], (g.unet.config.in_channels, side, side))  # as `evaluation generate --seed 7`",
        f"x_g = sid_one_step(g.unet, g.schedule, z, {record['inference']['t_init']}, g.encode_text([prompt]))",
        "image = g.decode(x_g)  # in [-1, 1]",
    ])


def sampling_code(record: dict[str, Any], folder: str) -> str:
    """The python that samples the student: the record's own diffusers lines when it has them, verbatim."""
    inference = record["inference"]
    if "diffusers" not in inference and inference.get("sampler") == "sid-one-step":
        return sid_code(record, folder)
    body = inference.get("diffusers") or pipeline_code(inference, folder)
    seed = ["seed = 7  # as `evaluation generate --seed 7`"] if re.search(r"\bseed\b", body) else []
    return "\n".join([*imports(body), f'prompt = "{PROMPT}"', *seed, *w_line(inference), body])


def how_to_sample(record: dict[str, Any], folder: str) -> list[str]:
    lines = ["```python", sampling_code(record, folder), "```"]
    if command := record["inference"].get("command"):
        lines += ["", "or from the shell:", "", "```bash",
                  command.replace("--model OUT", f"--model {shlex.quote(folder)}"), "```"]
    return lines


def _cell(value: Any) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def metrics_section(metrics: dict[str, Any] | None, folder: str) -> list[str]:
    if not metrics:
        return [f"None yet: the scores appear here once `evaluation coco30k --model {folder}` has scored this folder."]
    return ["| metric | value |", "|---|---|", *(f"| {name} | {_cell(value)} |" for name, value in metrics.items())]


def model_card(record: dict[str, Any], metrics: dict[str, Any] | None = None, folder: Path | None = None) -> str:
    """README.md for a student from its distillation.json record (and its scores: metric name -> value).
    `folder` is the student folder the sampling code names; without it the code says OUT."""
    where = str(folder) if folder is not None else "OUT"
    header = yaml.safe_dump(card_header(record), sort_keys=False, allow_unicode=True)
    lines = ["---", header.rstrip("\n"), "---", "",
             f"# `{record['method']}` student of {base_model(record)}", "", summary(record), "",
             "## Recipe", "", *recipe(record), "",
             "## How to sample", "", *how_to_sample(record, where), "",
             "## Metrics", "", *metrics_section(metrics, where)]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write FOLDER/README.md from the folder's distillation.json, atomically (a reader never sees half a card)."""
    folder = Path(folder)
    record = read_distillation(folder)
    if record is None:
        raise UserError(f"{folder} has no distillation.json: it is not a student folder")
    path = folder / CARD
    atomic_write_bytes(path, model_card(record, metrics, folder.resolve()).encode())
    return path


def evaluation_scores(result: dict[str, Any]) -> dict[str, Any]:
    """The card's metrics from `evaluation coco30k`'s metrics.json: its protocol in a line, how the model was
    sampled (a w-student's w), and the scores."""
    protocol = result["protocol"]
    return {"protocol": (f"evaluation coco30k, {protocol['evaluator']} evaluator: {protocol['num_images']} images "
                         f"at {protocol['resolution']} px, {protocol['num_inference_steps']} steps, seed "
                         f"{protocol['seed']}, prompts {protocol['prompt_source']}"),
            "sampled as": result["model"]["label"],
            **{name: result[key] for key, name in EVALUATION_SCORES.items() if key in result}}


def write_scored_card(folder: Path, result: dict[str, Any]) -> Path | None:
    """After `evaluation coco30k` scored `folder`: its card rewritten with the scores when it is a student folder
    and something was scored (a teacher's folder, or a run without metrics, is left alone)."""
    if read_distillation(folder) is None or not any(key in result for key in EVALUATION_SCORES):
        return None
    return write_model_card(folder, evaluation_scores(result))
