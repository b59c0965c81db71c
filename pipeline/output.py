"""The output folder of a build: its run identity, per-unit completion markers, and the final merge.

Layout: `UNIT-NNNN.tar` shards, `.build/run.json` (what determines the records), `.build/units/UNIT.json`
(written after all of a unit's shards are in place: a unit with a marker is complete, one without is
redone from scratch), and at the end `dataset.json` + `manifest.parquet`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusion.errors import UserError
from shards.manifest import write_dataset_info, write_manifest
from shards.writer import TMP_SUFFIX, ShardInfo, atomic_write_json

BUILD_DIR = ".build"


class OutputFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.build_dir = self.root / BUILD_DIR
        self.units_dir = self.build_dir / "units"
        self.run_json = self.build_dir / "run.json"

    def claim(self, identity: dict[str, Any]) -> None:
        """Create the folder for this run, or accept it if it holds this same run; refuse anything else."""
        if self.run_json.is_file():
            previous = json.loads(self.run_json.read_text())
            differs = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
            if differs:
                detail = ", ".join(f"{k}: {previous.get(k)!r} there vs {identity.get(k)!r} now" for k in differs[:3])
                raise UserError(f"{self.root} holds shards of another run ({detail}); use another --out or remove it")
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise UserError(f"{self.root} is not empty and holds no build of this run; use another --out or empty it")
        self.units_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_json, identity)

    def check_claimed(self, identity: dict[str, Any]) -> None:
        if not self.run_json.is_file() or json.loads(self.run_json.read_text()) != identity:
            raise UserError(f"{self.run_json} is missing or differs from this run's settings")

    def marker(self, unit: str) -> Path:
        return self.units_dir / f"{unit}.json"

    def is_done(self, unit: str) -> bool:
        marker = self.marker(unit)
        if not marker.is_file():
            return False
        shards = json.loads(marker.read_text())["shards"]
        return all((self.root / s["file"]).is_file() and (self.root / s["file"]).stat().st_size == s["bytes"]
                   for s in shards)

    def clear_unit(self, unit: str) -> None:
        """Remove what a killed or crashed earlier attempt left of this unit."""
        self.marker(unit).unlink(missing_ok=True)
        for leftover in list(self.root.glob(f"{unit}-*.tar")) + list(self.root.glob(f"{unit}-*.tar{TMP_SUFFIX}")):
            leftover.unlink()

    def shard_path(self, unit: str, index: int) -> Path:
        return self.root / f"{unit}-{index:04d}.tar"

    def finish_unit(self, unit: str, shards: list[ShardInfo], skipped: Counter, converted: Counter) -> None:
        atomic_write_json(self.marker(unit), {
            "shards": [asdict(s) for s in shards], "skipped": dict(skipped), "converted": dict(converted),
        })

    def missing_units(self, units: list[str]) -> list[str]:
        return [u for u in units if not self.marker(u).is_file()]

    def merge(self, units: list[str], dataset_info: dict[str, Any]) -> None:
        """Write manifest.parquet and dataset.json from the unit markers."""
        shards, skipped, converted = [], Counter(), Counter()
        for unit in units:
            part = json.loads(self.marker(unit).read_text())
            shards += [ShardInfo(**s) for s in part["shards"]]
            skipped.update(part["skipped"])
            converted.update(part["converted"])
        info = {
            **dataset_info,
            "samples": sum(s.samples for s in shards),
            "shards": len(shards),
            "skipped": dict(sorted(skipped.items())),
            "converted_image_modes": dict(sorted(converted.items())),
        }
        write_manifest(self.root, shards)
        write_dataset_info(self.root, info)
