"""Export a vlarl checkpoint as Hugging Face folders: LoRA adapters merged into the base weights.

    python tools/merge_adapters.py --checkpoint runs/default/best_return --out exports/policy

writes exports/policy (the token or flow VLA: AutoModel.from_pretrained after `import vlarl.models`)
and, for a token VLA, exports/policy/decoder (the decoder alone, a LlamaForCausalLM folder vLLM
loads). See vlarl/export.py.
Bad input stops with one sentence and exit code 2; a failed write leaves no output folder.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's best_return or checkpoints/step_NNNNNN folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype of the export (default: the run's model.dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--base-model", default=None,
                   help="the model folder the run started from (default: the run's model.path or run_dir/base_model)")
    p.add_argument("--max-shard-size", default="5GB", help="split weight files above this size (default 5GB)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vlarl.export import ExportError, ExportWriteError, export

    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, force=args.force, base_model=args.base_model,
                     max_shard_size=args.max_shard_size)
    except ExportError as e:
        print(f"merge_adapters: {e}", file=sys.stderr)
        return 2
    except ExportWriteError as e:
        print(f"merge_adapters: {e}", file=sys.stderr)
        return 1
    print(f"merge_adapters: wrote {out} and {out}/decoder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
