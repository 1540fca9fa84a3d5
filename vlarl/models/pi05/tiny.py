"""Tiny random pi0.5 folders in the real layouts (vlarl/models/pi0/tiny.py writes both kinds), for tests.

    python -m vlarl.models.pi05.tiny OUT --format lerobot|openpi [--tokenizer DIR]
"""

from __future__ import annotations

from pathlib import Path

from vlarl.models.pi0.tiny import main, write_tiny_pi0


def write_tiny_pi05(out: str | Path, format: str = "lerobot", seed: int = 0, **sizes) -> Path:
    return write_tiny_pi0(out, format, seed, kind="pi05", **sizes)


if __name__ == "__main__":
    main("pi05")
