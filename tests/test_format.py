"""Record format: round trips, keys, and no pickle."""

import json
import tarfile

import torch

from shards.format import STORED_DTYPE, Record, record_key, tensor_names
from shards.writer import ShardWriter


def test_record_round_trip_is_float16_and_exact_for_float16_values(tmp_path):
    tensors = {"zt": torch.randn(4, 2, 2).half(), "eps_cond": torch.randn(4, 2, 2), "eps_uncond": torch.zeros(4, 2, 2)}
    record = Record("k_1", tensors, 417, "un caf\u00e9", {"source_key": "a/k.1"})
    back = Record.decode(record.encode())
    assert back.key == "k_1" and back.t == 417 and back.caption == "un caf\u00e9"
    assert back.meta == {"source_key": "a/k.1"}
    assert all(v.dtype == STORED_DTYPE for v in back.tensors.values())
    torch.testing.assert_close(back.tensors["zt"], tensors["zt"], rtol=0, atol=0)
    torch.testing.assert_close(back.tensors["eps_cond"], tensors["eps_cond"].half(), rtol=0, atol=0)


def test_record_keys_are_stable_safe_and_distinct():
    assert record_key("00001_000000123") == "00001_000000123"
    a, b = record_key("shard/x.y"), record_key("shard/x_y")
    assert "." not in a and "/" not in a and a != b and a == record_key("shard/x.y")


def test_tensor_names_by_kind():
    assert tensor_names("cfg", False) == ("zt", "eps_cond", "eps_uncond")
    assert tensor_names("classifier", True) == ("zt", "eps", "grad", "z0", "noise")


def test_shard_is_reproducible_and_holds_no_pickle(tmp_path):
    record = Record("key", {"zt": torch.ones(1, 1, 1)}, 3, "a caption")
    infos = []
    for name in ("a.tar", "b.tar"):
        writer = ShardWriter(tmp_path / name)
        writer.write(record)
        infos.append(writer.finish())
    assert infos[0].sha256 == infos[1].sha256 and infos[0].samples == 1
    assert infos[0].bytes == (tmp_path / "a.tar").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("key.json"))
    assert names == ["key.json", "key.safetensors", "key.txt"]
    assert meta == {"t": 3, "caption": "a caption"}


def test_aborted_shard_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path / "x.tar")
    writer.write(Record("k", {"zt": torch.ones(1)}, 0, "c"))
    assert (tmp_path / "x.tar.tmp").exists() and not (tmp_path / "x.tar").exists()
    writer.abort()
    assert not list(tmp_path.iterdir())
