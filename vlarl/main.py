"""Entry point: `python -m vlarl.main [group=option ...] [key=value ...] [--dry-run]` (also under
`ray job submit`). --dry-run prints where every actor would run and stops."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from vlarl.config import ConfigError, help_text
    from vlarl.preflight import load_run_config

    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        cfg = load_run_config(argv)
    except ConfigError as e:
        print(f"vlarl: config error: {e}", file=sys.stderr)
        return 2
    if dry_run:  # the placement only: nothing is started, nothing written
        from vlarl.placement import PlacementError, dry_run_report

        try:
            print(dry_run_report(cfg))
        except PlacementError as e:
            print(f"vlarl: {e}", file=sys.stderr)
            return 2
        return 0
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
