"""The evaluation protocol's two choices: a fixed prompt list (GigaGAN's 30k COCO captions, as SiD-LSG's Table 1
uses) instead of the seeded COCO draw, and precision/recall on VGG16 fc2 or on the FID's Inception pool3 features
(as SiD-LSG's metrics code). Tiny extractors and a tiny COCO in the real layout; sockets blocked."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from diffusion.errors import UserError
from evaluation.cli import main
from evaluation.coco30k import EvalConfig, build_evaluators, load_prompt_list, score
from helpers import write_tiny_coco, write_tiny_inception, write_tiny_vgg

CAPTIONS = ["A café on a corner, at night.", 'A sign that says "open"', "two dogs; one cat", "Ünïcode ☕ mug"]
IDS = [1003, 1001, 1007, 9999]  # 9999 is not in the tiny COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return write_tiny_inception(folder / "inception-2015-12-05.pt"), write_tiny_vgg(folder / "vgg16.pt")


def _write(path: Path, kind: str) -> Path:
    """The same captions (and ids) in each accepted layout, with a BOM and CRLF where text allows them."""
    if kind == "txt":
        path.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(CAPTIONS).encode() + b"\r\n")
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8-sig") as handle:
            writer = csv.writer(handle, delimiter="\t" if kind == "tsv" else ",")
            writer.writerows([["image_id", "caption"], *zip(IDS, CAPTIONS)])
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"caption": CAPTIONS, "image_id": IDS}), path)
    else:
        data = {"json-list": CAPTIONS, "json-records": [{"image_id": i, "caption": c} for i, c in zip(IDS, CAPTIONS)],
                "json-prompts": {"prompts": CAPTIONS, "image_ids": IDS}}[kind]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["txt", "csv", "tsv", "parquet", "json-list", "json-records", "json-prompts"])
def test_prompt_list_formats_give_their_captions_in_order(kind, tmp_path):
    from evaluation.prompt_list import read_prompt_list

    path = _write(tmp_path / f"list.{kind.split('-')[0]}", kind)
    prompts, source = load_prompt_list(EvalConfig(model="m", out="o", prompts=str(path)))
    assert prompts == CAPTIONS and source == str(path)
    selection = read_prompt_list(path)
    assert selection.image_ids == (None if kind in ("txt", "json-list") else IDS)
    assert selection.info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert selection.info["count"] == 4 and selection.info["empty_skipped"] == (3 if kind == "txt" else 0)


def test_default_stays_the_seed_2014_draw_and_a_list_takes_its_first_n(coco, tmp_path):
    annotations = sorted(json.loads((coco / "annotations" / "captions_val2014.json").read_text())["annotations"],
                         key=lambda a: a["id"])
    expected = [a["caption"].strip() for a in random.Random(2014).sample(annotations, 5)]
    assert load_prompt_list(EvalConfig(model="m", out="o", coco=str(coco), num_images=5))[0] == expected
    path = _write(tmp_path / "list.csv", "csv")
    assert load_prompt_list(EvalConfig(model="m", out="o", prompts=str(path), num_images=2))[0] == CAPTIONS[:2]


@pytest.mark.parametrize("num", [0, -3])
def test_num_images_below_one_is_refused(coco, tmp_path, num):
    path = _write(tmp_path / "list.csv", "csv")
    for source in ({"coco": str(coco)}, {"prompts": str(path)}):  # never 30000 draws, never the file minus 3
        with pytest.raises(UserError, match=f"--num-images must be at least 1, got {num}"):
            load_prompt_list(EvalConfig(model="m", out="o", num_images=num, **source))


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "no such file"),
    ("\n  \n", [], "holds no prompts"),
    ("a\nb\n", ["--num-images", "3"], "holds 2 prompts, fewer than --num-images 3"),
    ("image_id,text\n1,a\n", [], "has no column 'caption' (columns: image_id, text); pick one with --prompt-column"),
    ("image_id,caption\n1,a\n,b\n", [], "1 of 2 captions have no image_id"),
    ("image_id,caption\nx,a\n", [], "image_id 'x' of entry 0 is not an integer"),
    (b"caf\xe9\n", [], "is neither UTF-8 nor UTF-16 text"),
])
def test_bad_prompt_lists_are_one_line_errors(teacher_dir, tmp_path, capsys, content, extra, message):
    path = tmp_path / ("list.csv" if isinstance(content, str) and "," in content else "list.txt")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code = main(["render", "--model", str(teacher_dir), "--prompts", str(path), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and str(path) in err
    assert not (tmp_path / "o" / "images").exists()


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(count)]


def _count_calls(monkeypatch, extractor) -> list[int]:
    calls, inner = [], extractor.features
    monkeypatch.setattr(extractor, "features", lambda images: calls.append(len(images)) or inner(images))
    return calls


def test_pr_on_inception_uses_the_fid_features_and_its_own_cache(coco, weights, tmp_path, monkeypatch):
    from evaluation.coco import load_prepared, reference_images
    from evaluation.metrics import precision_recall
    from evaluation.reference import reference_subset

    inception, vgg = weights
    cache, images = tmp_path / "cache", _images(6)
    cfg = EvalConfig(model="m", out="o", coco=str(coco), inception_weights=str(inception), vgg_weights=str(vgg),
                     pr_features="inception")
    evaluators = build_evaluators(cfg, ["fid", "pr"], "cpu")
    assert evaluators["pr"] is evaluators["fid"]
    monkeypatch.setattr("evaluation.coco30k.frechet_distance", lambda *stats: 0.0)  # sqrtm of 2048x2048: slow
    calls = _count_calls(monkeypatch, evaluators["fid"])
    result = score(images, [""] * 6, evaluators, coco, cache, ["fid", "pr"])
    assert calls == [6, 12, 6]  # the generated images once, the FID reference (12 images), the PR reference subset
    (stored,) = cache.glob("inception-features-*.npz")
    real = np.load(stored)["features"]
    fake = evaluators["fid"].features(images)
    subset = load_prepared(reference_subset(reference_images(coco), 6))
    np.testing.assert_allclose(real, evaluators["fid"].features(subset))
    assert (result["precision"], result["recall"]) == pytest.approx(precision_recall(real, fake, k=3))

    vgg_evaluators = build_evaluators(dataclasses.replace(cfg, pr_features="vgg16"), ["pr"], "cpu")
    vgg_result = score(images, [""] * 6, vgg_evaluators, coco, cache, ["pr"])
    (vgg_stored,) = cache.glob("vgg16-fc2-features-*.npz")
    assert np.load(vgg_stored)["features"].shape == (6, 32) and real.shape == (6, 2048)
    assert (vgg_result["precision"], vgg_result["recall"]) == pytest.approx(
        precision_recall(np.load(vgg_stored)["features"], vgg_evaluators["pr"].features(images), k=3))
    assert sorted(p.name.split("-features")[0] for p in cache.glob("*-features-*.npz")) == ["inception", "vgg16-fc2"]


def test_coco30k_records_pr_features_and_the_prompt_list(teacher_dir, coco, weights, tmp_path):
    from evaluation.coco import prepare_256, reference_images
    from evaluation.extractors import InceptionFeatures
    from evaluation.metrics import precision_recall
    from PIL import Image

    listing = tmp_path / "captions.csv"
    with open(listing, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["caption", "image_id"], ["a red circle", 1000], ["A round green shape.", 1001],
                                      ["a purple square", 1002], ["a pink circle", 5], ["unused", 6]])
    out, cache = tmp_path / "eval", tmp_path / "cache"
    assert main(["coco30k", "--model", str(teacher_dir), "--coco", str(coco), "--prompts", str(listing),
                 "--num-images", "4", "--metrics", "pr", "--pr-features", "inception", "--inception-weights",
                 str(weights[0]), "--num-inference-steps", "2", "--cache-dir", str(cache), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    protocol = metrics["protocol"]
    inception_sha256 = hashlib.sha256(weights[0].read_bytes()).hexdigest()
    assert protocol["pr_features"] == "inception" and protocol["weights_sha256"] == {"pr": inception_sha256}
    assert protocol["prompt_list"] == {
        "kind": "file", "path": str(listing), "format": "csv", "sha256": hashlib.sha256(listing.read_bytes()).hexdigest(),
        "count": 5, "empty_skipped": 0, "undecodable_skipped": 0, "image_ids": True, "captions_in_coco": 2,
        "image_ids_in_coco": 3}
    assert "val2014" in protocol["reference_images"] and protocol["num_images"] == 4
    assert json.loads((out / "prompts.json").read_text())["image_ids"] == [1000, 1001, 1002, 5]
    extractor = InceptionFeatures(weights[0])
    fake = extractor.features([prepare_256(Image.open(out / "images" / f"{i:05d}.png")) for i in range(4)])
    (stored,) = cache.glob("inception-features-*.npz")
    assert (metrics["precision"], metrics["recall"]) == pytest.approx(
        precision_recall(np.load(stored)["features"], fake, k=3))
    assert len(reference_images(coco)) == 12  # FID still against every val2014 image, not the listed ids


def test_default_protocol_records_vgg16_and_the_coco_draw(coco, weights):
    from evaluation.coco30k import prompt_selection, protocol

    cfg = EvalConfig(model="m", out="o", coco=str(coco), num_images=4, vgg_weights=str(weights[1]))
    record = protocol(cfg, prompt_selection(cfg), build_evaluators(cfg, ["pr"], "cpu"))
    assert record["pr_features"] == "vgg16" and record["prompt_list"]["seed"] == 2014
    assert record["prompt_list"]["kind"] == "coco-draw"
    with pytest.raises(UserError, match="unknown --pr-features"):
        build_evaluators(EvalConfig(model="m", out="o", pr_features="clip"), ["pr"], "cpu")
