"""ShardStream: every record once per epoch, equal counts per rank on uneven shards, worker split, refusals."""

import json
from collections import Counter

import pytest
import torch

from diffusion.errors import UserError
from shards.manifest import read_dataset_info
from shards.reader import ShardStream


def _keys(stream) -> list[str]:
    return [item["key"] for item in stream]


def test_one_rank_epoch_yields_every_record_once(cfg_shards):
    stream = ShardStream(cfg_shards, resampled=False, shuffle_buffer=8, kind="cfg")
    items = list(stream)
    assert len(items) == read_dataset_info(cfg_shards)["samples"]
    assert len({i["key"] for i in items}) == len(items)
    first = items[0]
    assert first["zt"].dtype == torch.float16 and first["eps_cond"].shape == (4, 16, 16)
    assert isinstance(first["caption"], str) and first["t"].dtype == torch.int64


def test_ranks_get_equal_counts_and_disjoint_shards_when_uneven(cfg_shards):
    total = read_dataset_info(cfg_shards)["samples"]  # 29 samples in 9 shards: uneven over 2 or 4 ranks
    for world in (2, 4):
        per_rank = [_keys(ShardStream(cfg_shards, rank=r, world_size=world, resampled=False, shuffle_buffer=1))
                    for r in range(world)]
        assert {len(keys) for keys in per_rank} == {total // world}
        covered = Counter(k for keys in per_rank for k in keys)
        assert len(covered) >= total - world * 5  # all but what the epoch boundary cuts


def test_dataloader_workers_split_the_rank_stream(cfg_shards):
    stream = ShardStream(cfg_shards, resampled=False, shuffle_buffer=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    keys = [item["key"] for item in loader]
    assert len(keys) == read_dataset_info(cfg_shards)["samples"]
    assert len(set(keys)) == len(keys)


def test_resampled_stream_is_endless_and_seeded(cfg_shards):
    take = lambda seed: [i["key"] for _, i in zip(range(50), ShardStream(cfg_shards, seed=seed, shuffle_buffer=4))]
    assert take(1) == take(1) and take(1) != take(2)
    assert len(take(1)) == 50


def test_mismatched_teacher_kind_or_schema_is_refused_saying_what_differs(cfg_shards, tmp_path):
    with pytest.raises(UserError, match=r"teacher fingerprint [0-9a-f]{12} \(this run's teacher is 000000000000\)"):
        ShardStream(cfg_shards, teacher_fingerprint="0" * 64)
    with pytest.raises(UserError, match="kind 'cfg' \\(expected 'classifier'\\)"):
        ShardStream(cfg_shards, kind="classifier")
    info = read_dataset_info(cfg_shards)
    (tmp_path / "dataset.json").write_text(json.dumps({**info, "schema_version": 99}))
    with pytest.raises(UserError, match="schema_version 99"):
        ShardStream(tmp_path)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_damaged_after_start_up_is_one_line_naming_it(cfg_shards, tmp_path, workers):
    import shutil

    from shards.manifest import read_manifest

    copy = tmp_path / "copy"
    shutil.copytree(cfg_shards, copy)
    stream = ShardStream(copy, resampled=False, shuffle_buffer=4)
    shard = read_manifest(copy)[0]
    (copy / shard.file).write_bytes((copy / shard.file).read_bytes()[:30000])  # replaced after start-up
    with pytest.raises(UserError) as error:
        list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
    assert str(error.value) == (f"shard {copy / shard.file} is unreadable (ReadError: unexpected end of data); "
                                f"run `pipeline inspect {copy}`")
