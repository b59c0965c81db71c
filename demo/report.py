"""The demo's report.md: the seed's Table 5 for the digits world, the sweep plot, blue-tone before and after,
LoRA students against full ones and as an acceleration module on a fine-tune, time and memory, and image grids
with the same prompts and seeds for every model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

from evaluation.metrics import paired_mse
from evaluation.render import load_images
from evaluation.report import markdown_table
from evaluation.sweep import slug
from students.lora import LORA_FILE

GRID_COLUMNS = 8


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def labelled_grid(rows: list[tuple[str, Path]], path: Path, side: int = 64) -> None:
    """One row per model: its first GRID_COLUMNS images (the same prompts and seeds), with the label on the left."""
    label_width = 230
    grid = Image.new("RGB", (label_width + GRID_COLUMNS * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, folder) in enumerate(rows):
        draw.text((4, r * side + side // 2 - 6), label, fill="black")
        for c in range(GRID_COLUMNS):
            image_path = folder / "images" / f"{c:05d}.png"
            if image_path.is_file():
                with Image.open(image_path) as image:
                    grid.paste(image.convert("RGB").resize((side, side), Image.NEAREST),
                               (label_width + c * side, r * side))
    grid.save(path)


def _clip_fid(folder: Path) -> list:
    """[digit-CLIP, digit-FID] of one coco30k run, or two empty cells when it did not run."""
    path = folder / "metrics.json"
    return [_json(path)["clip_score"], _json(path)["fid"]] if path.is_file() else [None, None]


def _distance(folder: Path, reference: Path, count: int) -> float | None:
    """paired_mse of a run's images against the reference run's (same prompts and seeds)."""
    if not (folder / "images").is_dir():
        return None
    return paired_mse(load_images(folder, count), load_images(reference, count))


def few_step_section(root: Path, settings) -> list[str]:
    """Progressive distillation against the w-student it came from, both on the same trailing DDIM grid."""
    folder = root / "eval" / "few-step"
    record = _json(root / "student-progressive" / f"round-{settings.few_steps[0]:02d}steps" / "distillation.json")
    start, count = settings.progressive_start_steps, settings.eval_images
    rows = [[n, _distance(folder / f"w-{n}", folder / "reference", count), *_clip_fid(folder / f"w-{n}"),
             _distance(folder / f"progressive-{n}", folder / "reference", count),
             *_clip_fid(folder / f"progressive-{n}"), *_clip_fid(folder / f"stochastic-{n}")]
            for n in settings.few_steps]
    return [
        f"## Fewer steps: progressive distillation (w = {settings.alpha:g})", "",
        f"`trainer fit --method progressive` halves the w-student's {settings.progressive_start_steps} steps "
        f"{record['rounds']} times ({settings.progressive_iters} iterations a round, batch "
        f"{record['global_batch_size']}), each round from the previous one. Every column samples on the same "
        "trailing DDIM grid (t = 999 first, the clean sample last); the stochastic sampler is Meng et al.'s "
        f"(N - 1 rounds of two steps forward, one back, then a last step: N passes). *Distance* is the mean squared pixel difference (in [0, 1] units) to "
        f"the w-student's own {start}-step images with the same prompts and seeds: what progressive distillation "
        "optimises. In this world digit-FID and digit-CLIP favour the smooth images of very few steps, so they "
        "rank samplers poorly here; the distance is the measure to read.", "",
        *markdown_table(["steps", "w-student, not distilled: distance", "digit-CLIP", "digit-FID",
                         "progressive student: distance", "digit-CLIP", "digit-FID",
                         "progressive, stochastic: digit-CLIP", "digit-FID"], rows, ".4g"),
        "",
    ]


def w_loss_section(root: Path, settings) -> list[str]:
    """--compare-w-loss: the w-student and its progressive rounds on seed 001's x loss against the eps loss."""
    folder, few = root / "eval" / "w-loss", root / "eval" / "few-step"
    header = ["w-distill loss"] + [f"{name} at w = {w:g}" for w in settings.w_loss_scales
                                   for name in ("digit-CLIP", "digit-FID")]
    rows = [[label, *[v for w in settings.w_loss_scales for v in _clip_fid(folder / f"{loss}-w{w:g}")]]
            for label, loss in (("x0, max(SNR, 1) (default)", "x0"), ("eps, unweighted", "eps"))]
    progressive = [[n, *_clip_fid(few / f"progressive-{n}"), *_clip_fid(folder / f"eps-progressive-{n}")]
                   for n in settings.few_steps]
    return [
        "## w-distill's loss: seed 001's x loss against the unweighted eps loss", "",
        "Stage 1 as the seed writes it, max(SNR, 1) ||x_student - x_teacher^w||^2 (the weighting progressive "
        "uses), against the earlier unweighted eps-MSE (the x loss weighted by SNR with no floor). Same data, "
        f"steps, lr and seed; {settings.sample_steps} DDIM steps.", "",
        *markdown_table(header, rows, ".4g"), "",
        f"The progressive students built on each (w = {settings.alpha:g}, their own trailing grid):", "",
        *markdown_table(["steps", "from the x0 w-student: digit-CLIP", "digit-FID",
                         "from the eps w-student: digit-CLIP", "digit-FID"], progressive, ".4g"), "",
    ]


def inputs_section(root: Path) -> list[str]:
    """What the build made of every kind of bad input (counted by reason), and a truncated shard refused."""
    check = _json(root / "inputs-check.json")
    info = check["dataset"]
    skipped = [[reason, n] for reason, n in info["skipped"].items()]
    converted = ", ".join(f"{mode} {n}" for mode, n in info["converted_image_modes"].items()) or "none"
    return [
        "## Bad inputs and damaged files", "",
        "`pipeline build-shards` over a source that holds every kind of bad input users bring (broken images, "
        "captions missing, empty, Latin-1 or UTF-16; empty, random-byte, cut and repeated-key tars; an image above "
        f"the pixel limit; a 16-bit PNG) with the digits teacher: **{info['samples']} records**, `pipeline inspect` "
        f"valid, image modes converted: {converted}. Every entry that gave no record is counted by reason "
        "(docs/pipeline.md lists each with an example):", "",
        *markdown_table(["skip reason", "count"], skipped), "",
        f"Then `{check['truncated_shard']}` of a copy is cut in half: `pipeline inspect` finds it "
        f"({'valid' if check['inspect_valid'] else 'INVALID'}: {'; '.join(check['inspect_problems'][:2])}) and "
        f"`trainer fit` refuses it before any step (exit code {check['fit_exit_code']}): "
        f"`{' '.join(check['fit_error'])}`", "",
    ]


def sdxl_section(root: Path) -> list[str]:
    """The SDXL-layout chain (demo/sdxl.py): records, recompute, training loss, stock pipeline passes."""
    check = _json(root / "sdxl-check.json")
    micro = "; ".join(str(m) for m in check["micro"][:3])
    return [
        "## SDXL teachers: the same commands", "",
        "`pipeline build-shards` -> `torchrun --nproc_per_node 2 -m trainer.cli fit --method cfg-distill --fsdp` "
        "(the student sharded over two CPU processes) -> `StableDiffusionXLPipeline`, on an "
        "SDXL-layout teacher: two CLIP text encoders (the second's projection is the pooled embedding), a UNet with "
        "SDXL's micro-conditioning. There is no trained SDXL digits teacher, so this one is tiny with random weights: "
        "the row proves the chain, not quality (`demo/sdxl.py`).", "",
        *markdown_table(["check", "result"], [
            ["records (schema version)", f"{check['samples']} ({check['schema_version']})"],
            ["micro-conditioning recorded [orig h, w, crop top, left, target h, w]", micro],
            [f"a fresh teacher pass on {check['checked_records']} records: max abs error of the stored eps",
             f"{check['recompute_max_abs_error']:.1e} (float16 storage)"],
            ["training: processes, sharding, global batch",
             f"{check['fit_processes']}, {'FSDP2 (FULL_SHARD)' if check['fit_fsdp'] else 'DDP'}, "
             f"{check['global_batch_size']}"],
            [f"cfg-distill loss, first -> last tenth of {check['fit_steps']} steps",
             f"{check['loss_first']:.4f} -> {check['loss_last']:.4f}"],
            [f"{check['pipeline']}: UNet batch per call, 4 steps", str(check["unet_batches_4_steps"])],
            ["image", " x ".join(map(str, check["image_shape"][1:]))],
        ]), "",
    ]


def _mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _share(part: float, whole: float) -> str:
    """part / whole as a percentage, or n/a when whole is 0."""
    return f"{part / whole:.0%}" if whole else "n/a"


def lora_section(root: Path, settings, by_label: dict) -> list[str]:
    """The LoRA students beside the full students they repeat with the same settings: quality, and what ships."""
    rows = []
    for method, name in (("cfg-distill", "cfg"), ("sid-lsg", "sid")):
        full, lora = by_label[f"student-{name} ({method})"], by_label[f"student-{name}-lora ({method})"]
        rows.append([method, float(full["clip_score"]), float(lora["clip_score"]), float(full["fid"]),
                     float(lora["fid"]), _mb(root / f"student-{name}" / "unet" / "diffusion_pytorch_model.safetensors"),
                     _mb(root / f"student-{name}-lora" / LORA_FILE)])
    return [
        f"## LoRA students against full ones (rank {settings.lora_rank})", "",
        f"`trainer fit ... --lora-rank {settings.lora_rank} --merge`: an adapter (alpha = rank, on the attention and "
        "feed-forward projections) on the frozen teacher UNet instead of the whole UNet, every other setting the "
        "full student's. The full student ships its UNet; the LoRA student its adapter (diffusers' file; the kohya "
        "file is the same size). Training memory of sid-lsg with LoRA against the full method is measured by "
        "`benchmarks/sid.py` (lsg_lora).", "",
        *markdown_table(["method", "digit-CLIP: full", "LoRA", "digit-FID: full", "LoRA", "UNet file MB",
                         "adapter file MB"], rows, ".4g"), "",
    ]


def lora_module_section(root: Path, teacher: Path, settings) -> list[str]:
    """The cfg LoRA learnt on the base teacher, folded into a fine-tune in a style the base lacks (red ink):
    does the fine-tune keep its style, and does it get the guidance, in one pass per step?"""
    models = settings.lora_module_models(teacher, root)
    scores = {name: _json(root / "eval" / "lora-module" / name / "metrics.json") for name in models}
    rows = [[label, scores[name]["clip_score"], scores[name]["fid"], scores[name]["red_fraction"], passes]
            for name, (label, _, passes) in models.items()]
    cond, cfg, lora = scores["variant-cond"], scores["variant-cfg"], scores["variant-lora"]
    base, base_lora = scores["teacher-cfg"], scores["teacher-lora"]
    style_kept = _share(lora["red_fraction"] - base_lora["red_fraction"], cfg["red_fraction"] - base["red_fraction"])
    guidance_kept = _share(lora["clip_score"] - cond["clip_score"], cfg["clip_score"] - cond["clip_score"])
    variant = _json(root / "variant-red" / "variant.json")
    recipe = variant["recipe"]
    return [
        "## LoRA as an acceleration module", "",
        f"The teacher fine-tuned on the train split in one red ink (`digits/variant.py`: {recipe['steps']} steps of "
        f"batch {recipe['batch_size']}, lr {recipe['lr']:g}, UNet only, the teacher's VAE and text encoder; "
        f"{variant['seconds'] / 60:.1f} min) stands in for a community fine-tune. The cfg-distill LoRA learnt on "
        "the base teacher is folded into it (`trainer export student-cfg-lora --base variant-red --to "
        "student-cfg-lora-on-variant`) and sampled at guidance 1. Red fraction: the share of pixels whose red "
        "channel exceeds green and blue by 25/255.", "",
        *markdown_table(["model", "digit-CLIP", "digit-FID", "red fraction", "UNet passes per step"], rows, ".4g"), "",
        f"Of the red fraction the fine-tune adds to the base with CFG ({base['red_fraction']:.3f} -> "
        f"{cfg['red_fraction']:.3f}), the LoRA keeps {style_kept} on the variant (measured against the base with "
        f"the same LoRA); of the digit-CLIP gain CFG gives the variant over its unguided samples it gives "
        f"{guidance_kept}, at half the UNet passes.", "",
    ]


def time_ratio(timing: dict, field: str) -> str | None:
    """A time ratio of `evaluation speed` as 'ratio [min-max]' over its interleaved turns."""
    if field not in timing:
        return None
    spread = f" [{timing[field + '_min']:.3f}-{timing[field + '_max']:.3f}]" if field + "_min" in timing else ""
    return f"{timing[field]:.3f}{spread}"


def write_report(root: Path, world, settings, seconds: float, compare_w_loss: bool = False,
                 lora: bool = False) -> Path:
    evals = root / "eval"
    info = _json(world.root / "world.json")
    sweep = list(csv.DictReader(open(evals / "sweep" / "sweep.csv")))
    speed = {r["label"]: r for r in _json(evals / "speed" / "speed.json")["results"]}
    alpha = settings.alpha
    blue = {name: _json(evals / name / "metrics.json") for name in settings.blue_models(world.teacher, root)}
    by_label = {r["label"]: r for r in sweep}
    teacher_1, teacher_a = by_label["teacher no guidance"], by_label[f"teacher cfg {alpha:g}"]
    student = by_label["student-cfg (cfg-distill)"]
    w_student = next(r for r in sweep if r["kind"] == "w-distill")
    one_step = by_label["student-sid (sid-lsg)"]
    sid = _json(root / "student-sid" / "distillation.json")

    def table5_row(name: str, row: dict) -> list:
        timing = speed.get(row["label"], {})  # evaluation labels a model the same way in sweep and speed
        steps = timing.get("steps")
        passes = None if steps is None else timing["unet_passes_per_step"] * steps
        return [name, steps, float(row["clip_score"]), float(row["fid"]), passes, timing.get("seconds_per_image"),
                timing.get("peak_memory_mb"), time_ratio(timing, "time_over_cfg_teacher")]

    table5 = [table5_row("teacher, no guidance", teacher_1), table5_row("student-cfg (distilled, no guidance)", student)]
    if lora:
        table5.append(table5_row(f"student-cfg-lora (LoRA rank {settings.lora_rank}, merged; no guidance)",
                                 by_label["student-cfg-lora (cfg-distill)"]))
    table5 += [table5_row(f"teacher, CFG {alpha:g}", teacher_a), table5_row(f"student-w at w = {alpha:g}", w_student),
               table5_row(f"student-sid, one step (SiD-LSG, kappa {settings.sid_kappa:g})", one_step)]
    lines = [
        "# The digits world: guidance distillation end to end", "",
        f"Whole demo: {seconds / 60:.1f} min on this machine (world reused when cached).", "",
        "## The world", "",
        f"- scikit-learn digits, {info['data']['train_images']} train / {info['data']['eval_images']} evaluation "
        f"images (disjoint, stratified), 32 px RGB; {info['data']['train_records']} captioned records in "
        "img2dataset tars, and a COCO-2014-style evaluation folder.",
        f"- Teacher: StableDiffusionPipeline layout (VAE factor 4, CLIP text encoder with the real tokenizer, "
        f"cross-attention UNet, SD's scheduler), trained here in {info['teacher']['seconds'] / 60:.1f} min.",
        f"- Digit classifier: held-out accuracy **{info['classifier']['heldout_accuracy']:.3f}**; its features give "
        "digit-FID (and PR), its probability of the prompted digit gives digit-CLIP.", "",
        f"## Table 5 of the seed, for this world (CFG scale {alpha:g}, {settings.sample_steps} DDIM steps, "
        f"{settings.eval_images} evaluation captions)", "",
        *markdown_table(["model", "steps", "digit-CLIP (higher is better)", "digit-FID (lower is better)",
                         "UNet passes per image", "s per image", "peak MiB", "time per image / CFG teacher"],
                table5), "",
        "Time per image is per batch of the speed run, divided by the batch; the one-step generator runs one "
        "UNet pass and one VAE decode per image. The models take turns batch by batch in rotating order "
        "(`evaluation speed`), so a load on the machine hits all alike; the ratio is of median times, with "
        "[min-max] of the per-turn ratios.", "",
        "## One-step generation from prompts alone (SiD-LSG)", "",
        f"`trainer fit --method sid-lsg` on {sid['prompts']['count']} prompts (no images), kappa1..4 = "
        f"{settings.sid_kappa:g} ({sid['guidance']['strategy']}), {sid['kimg']:g} thousand generated images "
        f"({sid['iterations']} iterations of batch {sid['global_batch_size']}), EMA half-life {settings.sid_ema_kimg:g} "
        f"kimg. The generator starts as the teacher's UNet read at t = {sid['t_init']}; its samples on fixed prompts "
        "and seeds during training (left to right: start, then every quarter):", "",
        *[f"![{p.stem}](student-sid/samples/{p.name})" for p in sorted((root / "student-sid" / "samples").glob("*.png"))],
        "",
        *few_step_section(root, settings),
        *(lora_section(root, settings, by_label) + lora_module_section(root, world.teacher, settings) if lora else []),
        *inputs_section(root),
        *sdxl_section(root),
        *(w_loss_section(root, settings) if compare_w_loss else []),
        "## The teacher across CFG scales, and the students", "", "![sweep](eval/sweep/sweep.png)", "",
        *markdown_table(["point", "digit-CLIP", "digit-FID"], [[r["label"], float(r["clip_score"]), float(r["fid"])] for r in sweep]),
        "",
        f"## Blue-tone guidance (gamma = {settings.gamma:g})", "",
        "Share of pixels whose blue channel exceeds red and green by 25/255, and digit-CLIP.", "",
        *markdown_table(["model", "blue fraction", "digit-CLIP"],
                [[name, blue[name]["blue_fraction"], blue[name]["clip_score"]] for name in blue]),
        "",
        f"## Time and memory (`evaluation speed`, batch {settings.speed_batch}, {settings.sample_steps} steps)", "",
        *(evals / "speed" / "speed.md").read_text().splitlines(), "",
        "## Samples: the same prompts and seeds in every row", "", "![grids](grids.png)", "",
    ]
    prompts = _json(evals / "sweep" / slug(teacher_1["label"]) / "prompts.json")["prompts"][:GRID_COLUMNS]
    lines += [f"Columns: {'; '.join(prompts)}.", ""]
    rows = [(r["label"], evals / "sweep" / slug(r["label"])) for r in sweep]
    rows += [(name, evals / name) for name in blue]
    rows += [(f"progressive, {n} step{'s' * (n > 1)}", evals / "few-step" / f"progressive-{n}") for n in settings.few_steps]
    rows += [(settings.lora_module_models(world.teacher, root)[name][0], evals / "lora-module" / name)
             for name in ("variant-cond", "variant-cfg", "variant-lora") if lora]
    labelled_grid(rows, root / "grids.png")
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
