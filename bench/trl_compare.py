"""nanovppo against TRL's GRPOTrainer on the same GRPO work, side by side.

    pip install -e .[bench]                      # TRL, pinned
    python bench/trl_compare.py                  # bf16 and fp32, 48 and 96 new tokens
    python bench/trl_compare.py --dtypes bf16 --new-tokens 48 --steps 4
    python bench/trl_compare.py --dtypes bf16 --new-tokens 48 96 256 512 --groups 4 8 16 \
        --frameworks nanovppo-default trl --trl-max-tokens 256   # how cost grows
    python bench/trl_compare.py --smoke          # the tiny random model, seconds (the suite)

Workload (both frameworks): SmolLM2-135M-Instruct, Countdown prompts rendered the same
way, 8 prompts x 4 samples per step (``--groups``: other group sizes), T=1, top-p 1, no stop string (completions run to EOS
or the token limit), one optimizer step per rollout batch in micro-batches of 8, no
reference model (KL 0), lr 2e-5, AdamW. bf16 means bf16 autocast over fp32 weights in both
(TRL: ``bf16=True, use_cpu=True``; nanovppo's default setting); fp32 means fp32 throughout.
The reward is the same function on both sides, ``bench/bench_tasks.py``: the completion's
length in characters over 8 x the token limit (it does not saturate as the limit grows).
It varies within every group, so every sample carries a gradient on both sides (with the
task's own reward an untrained model scores 0 everywhere, every advantage is 0, and
nanovppo skips work TRL does); the share of
samples with a non-zero advantage is printed for each. nanovppo is driven through its
configuration only (the bench task is loaded like a user's own task).

Each (framework, dtype, length, group size) runs in its own process, nanovppo and TRL alternating, so
peak RSS is that process's own. Reported per run: median over steps 2..N of the step
time and its phases (generation, log-prob + loss forward, backward, optimizer, weight
sync), peak RSS, generated tokens/s, and each phase's FLOP/s as a share of this
machine's matmul FLOP/s in that dtype, measured in the same process after its steps.
Forward FLOPs = 2 x (the decoder's matmul parameters x the tokens it ran + the output
head's parameters x the positions it scored), forward + backward 3x that; attention's own
FLOPs and recomputation are left out.
nanovppo's head scores the real completion tokens; TRL's fused head, on a CPU, scores
every position of the sequence.
nanovppo runs in several settings (``VARIANTS`` below); the second table gives each one's
ratios to TRL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Prompts a step, micro-batch size, learning rate; the group size (samples a prompt) is
# --groups' (4 unless given).
PROMPTS, MICRO, LR = 8, 8, 2e-5
# The reward both frameworks optimise (see the module's docstring).
BENCH_TASK = "bench.bench_tasks.LengthRewardCountdown"


def bench_task(new_tokens: int) -> list[str]:
    """The overrides that load the bench's task for a token limit."""
    return [f"task._target_={BENCH_TASK}", f"+task.max_new_tokens={new_tokens}"]

# nanovppo's settings compared (each a list of Hydra overrides). "nanovppo" is the
# default configuration; "-bf16w" keeps weights, gradients and AdamW moments in bf16
# (stochastic rounding; bf16 rows only), "-ckpt" recomputes activations in the backward
# pass (as TRL's GRPOConfig does by default), "-lowmem" adds that and hands freed memory
# back after every micro-batch, "-vllm" samples with the vllm engine.
LOWMEM = ["hardware.gradient_checkpointing=true", "hardware.low_memory=true"]
VARIANTS = {
    "nanovppo": [],
    "nanovppo-ckpt": ["hardware.gradient_checkpointing=true"],
    "nanovppo-lowmem": LOWMEM,
    "nanovppo-bf16w": ["hardware.param_dtype=bfloat16"],
    "nanovppo-bf16w-lowmem": ["hardware.param_dtype=bfloat16", *LOWMEM],
    "nanovppo-bf16w-ckpt": ["hardware.param_dtype=bfloat16",
                            "hardware.gradient_checkpointing=true"],
    "nanovppo-vllm": ["inference_backend=vllm"],
    # make train's recipe (conf/experiment/countdown_cpu.yaml: vllm engine, its dtypes),
    # on the bench's prompts and workload
    "nanovppo-default": ["experiment=countdown_cpu", "task=countdown"],
    # the same with each op of the update a pass of its own (trainer.fused_kernels off)
    "nanovppo-default-unfused": ["experiment=countdown_cpu", "task=countdown",
                                 "trainer.fused_kernels=false"],
    # the same with fp32 master weights (the recipe's before it took bf16 weights)
    "nanovppo-default-fp32w": ["experiment=countdown_cpu", "task=countdown",
                               "hardware.param_dtype=float32"],
    # the same with activation checkpointing (TRL's default), for long completions
    "nanovppo-default-ckpt": ["experiment=countdown_cpu", "task=countdown",
                              "hardware.gradient_checkpointing=true"],
    # the same handing freed memory back after every micro-batch (hardware.low_memory)
    "nanovppo-default-lowmem": ["experiment=countdown_cpu", "task=countdown",
                                "hardware.low_memory=true"],
    # the same with VinePPO, K = 4 continuations per state (its value estimation is the
    # step's experience phase: perf/experience_s)
    "nanovppo-default-vppo": ["experiment=countdown_cpu", "task=countdown", "algo=vppo",
                              "algo.mc_rollouts=4"],
    # the same with V(prompt) the mean score of the group's other responses (no
    # continuations from the prompt state)
    "nanovppo-default-vppo-group": ["experiment=countdown_cpu", "task=countdown", "algo=vppo",
                                    "algo.mc_rollouts=4", "algo.prompt_value=group"],
    # the same training LoRA adapters (rank 16 on every linear layer of the blocks) instead
    # of every weight
    "nanovppo-default-lora": ["experiment=countdown_cpu", "task=countdown",
                              "model.lora={r: 16, alpha: 32, dropout: 0.0, target_modules: "
                              "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}"],
}


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """Sustained FLOP/s of an n x n matmul in ``dtype`` on this machine: the median of
    ``trials`` timings of ``reps`` matmuls (one timing can read 2-3x off on a busy CPU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        rates.append(2 * n ** 3 * reps / (time.perf_counter() - t0))
    return statistics.median(rates)


# --smoke times one small matmul (its figures mean nothing at the tiny model's size anyway).
SMOKE_MATMUL = dict(n=256, reps=1, trials=1)


def matmul_params(model) -> tuple[int, int]:
    """Parameters that take part in matmuls per token: (the decoder's linear weights, the
    output head's)."""
    head = model.get_output_embeddings()
    decoder = sum(m.weight.numel() for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not head)
    return decoder, head.weight.numel()


# The model's overrides: SmolLM2 with its dequantised copy cached in outputs/; --smoke:
# the tiny random model (with a few tokens and steps: that the bench still runs).
MODEL = [f"model.cache_dir={ROOT}/outputs/cache/models"]
SMOKE_MODEL = ["model=tiny-random"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


# ----------------------------------------------------------------------------------------
# Workers (one process each)
# ----------------------------------------------------------------------------------------

def run_nanovppo(dtype: str, new_tokens: int, group: int, steps: int, variant: str,
                 model: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    from nanovppo.train import train
    from tests.conftest import compose_cfg

    # The run folder (its MLflow store and two checkpoints of ~1.6 GB) goes when it is read.
    with tempfile.TemporaryDirectory(prefix="nanovppo-bench-",
                                     ignore_cleanup_errors=True) as tmp:
        compute = "bfloat16" if dtype == "bf16" else "float32"
        cfg = compose_cfg([*VARIANTS[variant], *model, *bench_task(new_tokens),
                           f"trainer.max_steps={steps}", f"rollout.max_new_tokens={new_tokens}",
                           f"trainer.prompts_per_step={PROMPTS}", f"algo.group_size={group}",
                           f"trainer.micro_batch_size={MICRO}", f"algo.lr={LR}",
                           "warm_start.steps=0", "trainer.eval_every=0", "trainer.eval_examples=0",
                           "trainer.eval_pass_k=0", "trainer.checkpoint_every=0",
                           "trainer.samples_every=0", "trainer.progress=false",
                           f"hardware.compute_dtype={compute}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                           f"paths.outputs={tmp}"])
        # The checkpoints of step 0 and of the last step are saved outside the steps' timings.
        summary = train(cfg, run_dir=Path(tmp) / "run")
        c = MlflowClient(summary["tracking_uri"])
        hist = lambda k: [m.value for m in sorted(c.get_metric_history(summary["mlflow_run_id"], k),  # noqa: E731
                                                  key=lambda m: m.step)]
        per_step = {
            "step": hist("perf/step_s"), "generation": hist("perf/rollout_s"),
            "forward": hist("perf/update_forward_s"), "backward": hist("perf/update_backward_s"),
            "optimizer": hist("perf/update_optimizer_s"), "weight_sync": hist("perf/weight_sync_s"),
            "experience": hist("perf/experience_s"),
            # VinePPO: the states valued and the continuations sampled for their values
            "states": hist("train/states_valued"), "continuations": hist("train/continuations"),
            # generated tokens, and the tokens the update's forwards ran (each prompt once)
            "gen_tokens": [n * PROMPTS * group for n in hist("train/response_length")],
            "update_tokens": hist("perf/update_tokens"),
            "head_tokens": hist("perf/update_head_tokens"),
            # samples whose advantage is not 0 on every token (the others are skipped)
            "gradient_share": [1 - x for x in hist("train/skipped_samples_frac")]}
    return {"steps": per_step, "peak_rss_gb": peak_rss_gb()}


def run_trl(dtype: str, new_tokens: int, group: int, steps: int, model: list[str]) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanovppo.models import load_model
    from nanovppo.rollout import render_prompt
    from tests.conftest import compose_cfg
    from hydra.utils import instantiate

    cfg = compose_cfg([*model, *bench_task(new_tokens), "task.n_train=2000"])
    task = instantiate(cfg.task)
    model, tok = load_model(cfg.model, dtype="float32")
    rows = [{"prompt": tok.decode(render_prompt(task, tok, ex)), "example": json.dumps(ex)}
            for ex in task.train_examples[: PROMPTS * (steps + 1)]]

    def reward(completions, example, **_):
        return [task.reward(task.prefill + c, json.loads(e)).total
                for c, e in zip(completions, example)]

    timing = {k: [] for k in ("step", "generation", "forward", "backward", "optimizer",
                              "gen_tokens", "update_tokens", "head_tokens", "gradient_share")}
    cur = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            cur.clear()
            cur.update({k: 0.0 for k in timing}, scoring=0.0, t0=time.perf_counter())

        def on_pre_optimizer_step(self, args, state, control, **kw):
            cur["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            cur["optimizer"] += time.perf_counter() - cur["t_opt"]

        def on_step_end(self, args, state, control, **kw):
            cur["step"] = time.perf_counter() - cur["t0"]
            for k in timing:
                timing[k].append(cur[k])

    # removed when the worker exits
    out = tempfile.TemporaryDirectory(prefix="trl-bench-", ignore_cleanup_errors=True)
    args = GRPOConfig(output_dir=out.name, use_cpu=True,
                      bf16=(dtype == "bf16"), fp16=False, per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=PROMPTS * group // MICRO,
                      num_generations=group, max_completion_length=new_tokens,
                      temperature=1.0, top_p=1.0, learning_rate=LR, beta=0.0,
                      max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                      num_iterations=1, seed=0, disable_tqdm=True, loss_type="dapo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok,
                          callbacks=[Clock()])

    def timed(fn, key, count=None):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if cur:
                cur[key] += time.perf_counter() - t0
                if count:
                    count(a, k, out)
            return out
        return wrapper

    def count_gen(a, k, out):
        # _generate returns prompt ids, completion ids, ... : count generated tokens
        completion_ids = out[1]
        cur["gen_tokens"] += sum(len(c) for c in completion_ids)

    def count_fwd(a, k, out):
        ids = k.get("input_ids", a[1] if len(a) > 1 else None)
        cur["update_tokens"] += ids.numel()
        # Off Triton devices TRL's fused head scores every position but the last of each
        # sequence (trl.trainer.utils.add_fused_lm_head).
        cur["head_tokens"] += ids.numel() - ids.shape[0]

    def count_advantages(a, k, out):  # the batch TRL trains on: its samples' advantages
        adv = out["advantages"]
        cur["gradient_share"] = (adv != 0).float().mean().item()

    trainer._generate = timed(trainer._generate, "generation", count_gen)
    trainer._generate_and_score_completions = timed(
        trainer._generate_and_score_completions, "scoring", count_advantages)
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, "forward", count_fwd)
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    trainer.train()
    # The forward wrapper also ran inside generation scoring (old log-probs), if any.
    return {"steps": timing, "peak_rss_gb": peak_rss_gb()}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

def summarise(result: dict, dtype: str, peak: dict, params: tuple[int, int]) -> dict:
    s = result["steps"]
    med = lambda k: statistics.median(s[k][1:]) if s.get(k) else 0.0  # noqa: E731
    out = {k: med(k) for k in ("step", "generation", "forward", "backward", "optimizer",
                               "weight_sync", "experience")}
    out["peak_rss_gb"] = result["peak_rss_gb"]
    out["tok_s"] = med("gen_tokens") / max(out["generation"], 1e-9)
    (decoder, head), limit = params, result.get("matmul_flops") or peak[dtype]
    out["limit_gflops"] = limit / 1e9
    fwd_flops = 2 * (decoder * med("update_tokens") + head * med("head_tokens"))
    out["fwd_share"] = fwd_flops / max(out["forward"], 1e-9) / limit
    out["bwd_share"] = 2 * fwd_flops / max(out["backward"], 1e-9) / limit
    out["update_share"] = 3 * fwd_flops / max(out["forward"] + out["backward"], 1e-9) / limit
    out["gradient_share"] = statistics.mean(s["gradient_share"]) if s.get("gradient_share") else 0.0
    out["states"], out["continuations"] = med("states"), med("continuations")
    return out


def worker_main(framework: str, dtype: str, new_tokens: int, group: int, steps: int,
                smoke: bool) -> None:
    torch.manual_seed(0)
    model = SMOKE_MODEL if smoke else MODEL
    if framework == "trl":
        result = run_trl(dtype, new_tokens, group, steps, model)
    else:
        result = run_nanovppo(dtype, new_tokens, group, steps, framework, model)
    # The limit as this process sees it, right after its steps: this machine's speed drifts
    # by 10-20% over minutes (generation, whose code did not change, too), and a phase's
    # share should not count that drift.
    result["matmul_flops"] = matmul_flops(torch.bfloat16 if dtype == "bf16" else torch.float32,
                                          **(SMOKE_MATMUL if smoke else {}))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[48, 96])
    ap.add_argument("--groups", nargs="+", type=int, default=[4],
                    help="group sizes (samples a prompt; 8 prompts a step)")
    ap.add_argument("--trl-max-tokens", type=int, default=None,
                    help="run TRL only up to this many new tokens (it is slow at 512)")
    ap.add_argument("--steps", type=int, default=4, help="the median is over steps 2..N")
    ap.add_argument("--frameworks", nargs="+",
                    default=["nanovppo", "nanovppo-bf16w", "nanovppo-bf16w-ckpt",
                             "nanovppo-bf16w-lowmem", "nanovppo-lowmem", "trl"],
                    help=f"trl and any of {', '.join(VARIANTS)}")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny random model, 8 tokens, 2 steps, bf16, nanovppo (and TRL "
                         "if installed): that the bench runs, not figures")
    ap.add_argument("--worker", nargs=4, metavar=("FRAMEWORK", "DTYPE", "TOKENS", "GROUP"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.dtypes, args.new_tokens, args.steps = ["bf16"], [8], 2
        args.frameworks = ["nanovppo"] + (["trl"] if importlib.util.find_spec("trl") else [])
    if args.worker:
        fw, dtype, tokens, group = args.worker
        worker_main(fw, dtype, int(tokens), int(group), args.steps, args.smoke)
        return 0

    from nanovppo.models import load_model
    from tests.conftest import compose_cfg

    model, _ = load_model(compose_cfg(SMOKE_MODEL if args.smoke else MODEL).model)
    params = matmul_params(model)
    del model
    size = SMOKE_MATMUL if args.smoke else {}
    peak = {"bf16": matmul_flops(torch.bfloat16, **size),
            "fp32": matmul_flops(torch.float32, **size)}
    print(f"matmul (2048^3, {torch.get_num_threads()} threads): bf16 "
          f"{peak['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s", flush=True)
    rows, failed = {}, False
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # A workload: (dtype, new tokens, group size); rows are keyed (framework, *workload).
    workloads = [(dtype, tokens, group) for dtype in args.dtypes for tokens in args.new_tokens
                 for group in args.groups]
    for dtype, tokens, group in workloads:
        for fw in args.frameworks:  # alternating, so drift hits both alike
            if "bf16w" in fw and dtype != "bf16":
                continue
            if fw == "trl" and args.trl_max_tokens and tokens > args.trl_max_tokens:
                print(f"trl {dtype} {tokens} tok g{group}: not run (--trl-max-tokens "
                      f"{args.trl_max_tokens})", flush=True)
                continue
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                   *(["--smoke"] if args.smoke else []),
                                   "--worker", fw, dtype, str(tokens), str(group)], env=env,
                                  cwd=ROOT, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            key = (fw, dtype, tokens, group)
            if proc.returncode or not line:
                print(f"{fw} {dtype} {tokens} g{group}: failed\n{proc.stderr[-3000:]}", flush=True)
                failed = True
                continue
            rows[key] = summarise(json.loads(line[0][7:]), dtype, peak, params)
            print(f"{fw:19s} {dtype} {tokens:3d} tok g{group}: {rows[key]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print_tables(rows, workloads, args.frameworks)
    return 1 if failed or not rows else 0


def print_tables(rows: dict, workloads: list, frameworks: list[str]) -> None:
    """Where each run's step goes, VinePPO's value estimation, and each nanovppo setting
    against TRL on the same workload."""
    name = lambda dtype, tokens, group: f"{dtype} {tokens} tok g{group}"  # noqa: E731
    cols = ["step", "generation", "experience", "forward", "backward", "optimizer", "weight_sync"]
    print("\n| run | step s | gen s | experience s | fwd s | bwd s | opt s | sync s | peak RSS GB | gen tok/s"
          " | matmul GFLOP/s | fwd % peak | bwd % peak | update % peak | samples with gradient |")
    print("|---" * 15 + "|")
    for (fw, *w), r in rows.items():
        print(f"| {fw} {name(*w)} | " + " | ".join(f"{r[c]:.2f}" for c in cols)
              + f" | {r['peak_rss_gb']:.2f} | {r['tok_s']:.0f} | {r['limit_gflops']:.0f}"
              f" | {100 * r['fwd_share']:.0f}% | {100 * r['bwd_share']:.0f}%"
              f" | {100 * r['update_share']:.0f}% | {100 * r['gradient_share']:.0f}% |")
    for (fw, *w), r in rows.items():
        if r["states"]:
            base = fw.split("-vppo")[0]  # the same setting with GRPO
            grpo = rows.get((base, *w))
            print(f"\n{fw} {name(*w)}: {r['states']:.0f} states x K continuations = "
                  f"{r['continuations']:.0f}, value estimation {r['experience']:.2f} s a step"
                  + (f", step {r['step'] / grpo['step']:.2f}x {base}'s" if grpo else ""))
    print("\n| workload | nanovppo setting | step / TRL's | generation | update (fwd+bwd+opt)"
          " | peak RSS |")
    print("|---|---|---|---|---|---|")
    upd = lambda r: r["forward"] + r["backward"] + r["optimizer"]  # noqa: E731
    for w in workloads:
        b = rows.get(("trl", *w))
        for fw in frameworks:
            a = rows.get((fw, *w))
            if fw == "trl" or not (a and b):
                continue
            print(f"| {name(*w)} | {fw} | {a['step'] / b['step']:.2f}x | "
                  f"{a['generation'] / b['generation']:.2f}x | {upd(a) / upd(b):.2f}x | "
                  f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
