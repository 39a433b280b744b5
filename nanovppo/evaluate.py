"""Evaluate a model on a task's test set: pass@k, maj@k, mean reward, response length.

    python -m nanovppo.evaluate model=smollm2-135m task=countdown            # greedy, n=1
    python -m nanovppo.evaluate task=gsm8k task.data_files=train.jsonl \\
        task.test_files=test.jsonl eval.n=16 eval.temperature=0.6
    python -m nanovppo.evaluate eval.checkpoint=outputs/runs/DATE/TIME       # a run's latest checkpoint
    python -m nanovppo.evaluate eval.checkpoint=models:/<id>                 # a checkpoint logged in MLflow
    python -m nanovppo.evaluate eval.run_id=<MLflow run id>                  # the model of that run

pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021) for
k = 1, 2, 4, ... up to n; maj@k takes the most common final answer among the first k
samples. Results are printed as a table and logged to MLflow as a run tagged
``nanovppo.kind=eval``.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from nanovppo import checkpoint as ckpt
from nanovppo import distributed as dd
from nanovppo import memory
from nanovppo.config import CONF_DIR, build, seed_everything
from nanovppo.engines.base import Sampling
from nanovppo.errors import ConfigError, NanovppoError
from nanovppo.lora import ADAPTER_CONFIG, load_adapters
from nanovppo.models import load_model
from nanovppo.progress import bar
from nanovppo.rollout import RolloutSource, context_length, drop_over_context
from nanovppo.schema import check_keys
from nanovppo.tracking import Tracker, checkpoint_of_model, default_tracking_uri, flatten

log = logging.getLogger("nanovppo")


def evaluate(engine, task, tokenizer, cfg, d: dd.Dist = dd.Dist(), pass_k: int = 0) -> dict:
    """The trainer's held-out evaluation: greedy decoding on the first
    ``trainer.eval_examples`` test prompts (each rank takes its share), the task's accuracy
    and mean reward. With ``pass_k``, also ``pass_k`` samples per prompt at the rollout
    temperature: ``eval/pass@k``, the share of prompts with a correct one among them (n = k,
    so the unbiased estimator below is exactly that)."""
    examples = task.test_examples[: cfg.trainer.eval_examples]
    if not examples:
        return {}
    mine = examples[d.rank::d.world]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                      stop=task.stop, logprobs=False)  # evaluations score text only
    sums = [0.0, 0.0, 0.0]  # reward, correct (greedy), prompts solved in k samples
    if mine:
        ro = RolloutSource(task, tokenizer, engine, greedy).collect(mine)
        sums[0] = ro.rewards.sum().item()
        sums[1] = ro.correct.float().sum().item()
        if pass_k:
            sampled = Sampling(n=pass_k, temperature=cfg.rollout.temperature,
                               top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                               stop=task.stop, logprobs=False)
            ro = RolloutSource(task, tokenizer, engine, sampled).collect(mine)
            sums[2] = ro.correct.any(dim=1).float().sum().item()
    total = dd.all_reduce_sum(sums, d)
    out = {"eval/reward_mean": total[0] / len(examples), "eval/accuracy": total[1] / len(examples)}
    if pass_k:
        out[f"eval/pass@{pass_k}"] = total[2] / len(examples)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct.

    >>> round(pass_at_k(4, 1, 2), 4)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """Is the most common final answer among the first ``k`` samples a correct one?
    Ties go to the answer seen first; samples without an answer do not vote."""
    votes = [(a, ok) for a, ok in zip(answers[:k], correct[:k]) if a is not None]
    if not votes:
        return False
    counts = Counter(a for a, _ in votes)
    best = max(counts.values())
    winner = next(a for a, _ in votes if counts[a] == best)
    return any(ok for a, ok in votes if a == winner)


def ks_up_to(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def resolve_model(cfg: DictConfig) -> tuple[DictConfig, str | None]:
    """The model config to evaluate (the configured one, a checkpoint's, or an MLflow
    run's) and, for a LoRA checkpoint, the folder of its adapters (else None)."""
    path = None
    if cfg.eval.run_id:
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
        try:
            run = MlflowClient(uri).get_run(cfg.eval.run_id)
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds
            raise ConfigError(f"eval.run_id={cfg.eval.run_id}: no such MLflow run at {uri}") from e
        run_dir = run.data.tags.get("nanovppo.run_dir")
        if not run_dir:
            raise ConfigError(f"MLflow run {cfg.eval.run_id} was not made by nanovppo.train")
        path = Path(run_dir)
    elif str(cfg.eval.checkpoint or "").startswith("models:/"):  # a logged model of a run
        uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
        try:
            path = checkpoint_of_model(uri, str(cfg.eval.checkpoint))
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds
            raise ConfigError(f"eval.checkpoint={cfg.eval.checkpoint}: no such nanovppo "
                              f"logged model at {uri} ({e})") from None
    elif cfg.eval.checkpoint:
        path = Path(str(cfg.eval.checkpoint))
    if path is None:
        return cfg.model, None
    return checkpoint_model_config(path, cfg.model.name)


def checkpoint_model_config(path: Path, name: str) -> tuple[DictConfig, str | None]:
    """The model config of a checkpoint (``step_N``, or a run folder: its latest) and the
    folder of its adapters: its whole weights and None, or for a LoRA checkpoint the base
    the adapters apply to and their folder (merged in by ``evaluate_model``)."""
    if not any((path / "model" / f).is_file() for f in ("config.json", ADAPTER_CONFIG)):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"{path} is neither a checkpoint nor a run folder with one")
        path = latest
    label = f"{name}@{path.name}"
    if (path / "model" / "config.json").is_file():
        return OmegaConf.create({"name": label, "source": "dir", "path": str(path / "model")}), None
    start = path.parent / "step_000000" / "model"  # a warm start merged into the base
    if (start / "config.json").is_file():
        base = OmegaConf.create({"source": "dir", "path": str(start)})
    else:
        base = OmegaConf.load(path / "config.yaml").model
    return OmegaConf.merge(base, {"name": label, "lora": None}), str(path / "model")


def load_with_adapters(model_cfg: DictConfig, adapters: str | None, dtype: str):
    """``load_model``; for a LoRA checkpoint, with its adapters folded into the base."""
    model, tok = load_model(model_cfg, dtype=dtype)
    if adapters:
        model = load_adapters(model, adapters).merge_and_unload()
    return model, tok


def evaluate_model(cfg: DictConfig, select=None) -> dict:
    """Sample ``eval.n`` completions per test example and compute the metrics.
    ``select``, a function of the task, picks other examples to evaluate instead (e.g.
    training problems: bench/seen_unseen.py)."""
    e = cfg.eval
    if e.n > 1 and e.temperature == 0:
        raise ConfigError("eval.n > 1 needs eval.temperature > 0 (greedy samples are identical)")
    seed_everything(cfg.seed)
    check_keys(cfg, ["hardware.onednn_cache"])  # its schema rule (no check_config here)
    memory.limit_onednn_cache(cfg.hardware.onednn_cache)  # before the first matmul
    task = build(cfg.task, "task")
    model_cfg, adapters = resolve_model(cfg)
    model, tok = load_with_adapters(model_cfg, adapters, cfg.hardware.param_dtype)
    model.to(cfg.hardware.device).eval().requires_grad_(False)
    context = context_length(cfg, model)
    dropped = drop_over_context(task, tok, context, e.max_new_tokens)
    if dropped["test"]:
        log.warning("%d test prompts do not fit the %d-token context with eval.max_new_tokens="
                    "%d: dropped (%d remain)", dropped["test"], context,
                    e.max_new_tokens, len(task.test_examples))
    engine = build(cfg.inference_backend, "inference_backend", model=model, tokenizer=tok, seed=cfg.seed,
                         _convert_="partial")
    if select is not None:
        examples = select(task)
    else:
        examples = task.test_examples[: e.examples] if e.examples else task.test_examples
    if not examples:
        raise ConfigError(f"task {task.name} has no test examples")
    sampling = Sampling(n=e.n, temperature=e.temperature, top_p=e.top_p,
                        max_new_tokens=e.max_new_tokens, stop=task.stop, logprobs=False)
    source = RolloutSource(task, tok, engine, sampling)
    ks = ks_up_to(e.n)
    per_k = {k: [] for k in ks}
    maj = {k: [] for k in ks}
    rewards, lengths = [], []
    for i in bar(cfg.trainer.progress, iterable=range(0, len(examples), e.batch_prompts),
                 desc="eval", unit="batch"):
        ro = source.collect(examples[i:i + e.batch_prompts])
        for g, group in enumerate(ro.groups):
            correct = ro.correct[g].tolist()
            finals = [task.final_answer(task.prefill + c.text) for c in group]
            for k in ks:
                per_k[k].append(pass_at_k(e.n, sum(correct), k))
                maj[k].append(float(majority_correct(finals, correct, k)))
            lengths += [len(c.token_ids) for c in group]
        rewards += ro.rewards.flatten().tolist()
    results = {f"pass@{k}": float(np.mean(per_k[k])) for k in ks}
    results.update({f"maj@{k}": float(np.mean(maj[k])) for k in ks})
    results["reward_mean"] = float(np.mean(rewards))
    results["response_length"] = float(np.mean(lengths))
    if e.n == 1 and e.temperature == 0:
        results["greedy_accuracy"] = results["pass@1"]
    results["examples"] = float(len(examples))
    engine.close()
    return {"results": results, "model": model_cfg}


def report(cfg: DictConfig, out: dict) -> str:
    results = out["results"]
    width = max(len(k) for k in results)
    lines = [f"{cfg.task.name} test set, model {out['model'].name}, n={cfg.eval.n}, "
             f"temperature={cfg.eval.temperature}",
             f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {v:.4f}" if k != "examples" else f"{k.ljust(width)}  {int(v)}"
              for k, v in results.items()]
    return "\n".join(lines)


def log_results(cfg: DictConfig, out: dict) -> str:
    uri = cfg.tracking.uri or default_tracking_uri(cfg.paths.outputs)
    tags = {"nanovppo.kind": "eval"}
    if cfg.eval.run_id:
        tags["nanovppo.evaluated_run"] = str(cfg.eval.run_id)
    tracker = Tracker(uri, cfg.tracking.experiment, run_name=f"eval-{out['model'].name}-{cfg.task.name}",
                      tags=tags, artifact_dir=Path(cfg.paths.outputs) / "mlartifacts")
    params = flatten({"eval": OmegaConf.to_container(cfg.eval, resolve=True),
                      "model": OmegaConf.to_container(out["model"], resolve=True),
                      "task.name": cfg.task.name, "seed": cfg.seed})
    tracker.log_params(params)
    tracker.log_metrics({f"eval/{k}": v for k, v in out["results"].items()}, step=1)
    tracker.log_text(report(cfg, out), "eval_results.txt")
    tracker.finish()
    return tracker.run_id


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        out = evaluate_model(cfg)
    except (NanovppoError, InstantiationException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(cfg, out))
    if cfg.eval.log_to_mlflow:
        run_id = log_results(cfg, out)
        print(f"logged to MLflow run {run_id}")


if __name__ == "__main__":
    main()
