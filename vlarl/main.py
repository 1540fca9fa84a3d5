"""Entry point: `python -m vlarl.main [group=option ...] [key=value ...]` (also under `ray job submit`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from vlarl.config import ConfigError, help_text
    from vlarl.preflight import load_run_config

    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = load_run_config(argv)
    except ConfigError as e:
        print(f"vlarl: config error: {e}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from vlarl.cluster import SetupError
    from vlarl.trainer import train

    try:
        train(cfg)
    except SetupError as e:
        print(f"vlarl: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
