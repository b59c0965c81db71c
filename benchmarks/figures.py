"""What every benchmark script does with its figures: print them aligned, and optionally write them as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def emit(figures: dict, json_out: str | None) -> None:
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:>{width}}: {value:.3f}" if isinstance(value, float) else f"{name:>{width}}: {value}")
    if json_out:
        Path(json_out).write_text(json.dumps(figures, indent=2))
