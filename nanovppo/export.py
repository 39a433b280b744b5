"""Export a checkpoint as a plain Hugging Face model folder (LoRA adapters merged in),
which transformers, vLLM and SGLang load as they load any model.

    python -m nanovppo.export outputs/runs/DATE/TIME out/model      # a run's latest checkpoint
    python -m nanovppo.export outputs/runs/DATE/TIME/checkpoints/step_000030 out/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanovppo.errors import NanovppoError
from nanovppo.evaluate import checkpoint_model_config, load_with_adapters


def export(checkpoint: str | Path, out: str | Path) -> Path:
    model, tokenizer = load_with_adapters(*checkpoint_model_config(Path(checkpoint), "export"),
                                          dtype="float32")
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a step_N checkpoint or a run folder (its latest)")
    ap.add_argument("out", help="the folder to write")
    args = ap.parse_args(argv)
    try:
        print(f"wrote {export(args.checkpoint, args.out)}")
    except NanovppoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
