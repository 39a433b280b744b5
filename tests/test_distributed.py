"""torch.distributed on gloo: real torchrun processes, compared with one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_update_worker.py"
# Several micro-batches per minibatch, two minibatches, two epochs and a KL term: every
# path of the update (no_sync, padding with empty micro-batches, old and ref log-probs).
# The update's compiled kernels on (the default; off in TINY): under DDP the one pass's
# norms and head run them, under FSDP2 the two-pass forward's head.
HARD = ["algo.ppo_epochs=2", "algo.num_minibatches=2", "algo.kl_coef=0.05",
        "trainer.micro_batch_size=2", "algo.mask_truncated=true", "trainer.fused_kernels=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.pop("WORLD_SIZE", None)
    return e


def run_update(tmp_path, strategy: str, nproc: int, overrides=()) -> dict:
    out = tmp_path / f"{strategy}-{nproc}.pt"
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(WORKER)]
    res = subprocess.run([*cmd, str(out), strategy, *overrides], env=env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("strategy,checkpointing", [("ddp", False), ("fsdp2", True)])
def test_two_ranks_on_half_the_batch_match_one_process_on_all_of_it(tmp_path, strategy,
                                                                   checkpointing):
    """FSDP2 runs with activation checkpointing (as conf/hardware/node.yaml does), against
    one process without it."""
    one = run_update(tmp_path, "ddp", 1, HARD)
    two = run_update(tmp_path, strategy, 2,
                     [*HARD, f"hardware.gradient_checkpointing={str(checkpointing).lower()}"])
    # the module each side trained (nanovppo.fast.logprob_module): one pass over prompt and
    # completion tokens, except under FSDP2
    assert one["module"] == "PackedLogprobs"
    assert two["module"] == {"ddp": "PackedLogprobs", "fsdp2": "GroupLogprobs"}[strategy]
    assert one["kernels_fell_back"] == two["kernels_fell_back"] == []
    moved = max_param_diff(one["params"], one["initial"])
    diff = max_param_diff(one["params"], two["params"])
    print(f"{strategy}: largest parameter difference {diff:.3g} (the update moved them by up "
          f"to {moved:.3g}), loss "
          f"{one['metrics']['train/loss']:.6f} vs {two['metrics']['train/loss']:.6f}")
    assert moved > 1e-3
    assert diff < 1e-5
    for key in ("train/loss", "train/kl", "train/clip_frac", "train/entropy"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key


LORA = ["model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"]


def test_lora_under_ddp_takes_the_one_process_step_and_moves_only_adapters(tmp_path):
    """LoRA adapters under DDP (the KL reference: the same module, adapters off): two ranks
    on half the batch each end where one process on all of it does, and only lora_*
    parameters change (B starts at 0, so the first of HARD's four optimizer steps moves only
    B; the later ones move A too), never a base weight."""
    one = run_update(tmp_path, "ddp", 1, [*HARD, *LORA])
    two = run_update(tmp_path, "ddp", 2, [*HARD, *LORA])
    moved = {k for k in one["params"] if (one["params"][k] - one["initial"][k]).abs().max() > 0}
    assert moved and all(".lora_" in k for k in moved), sorted(moved)[:5]
    assert any("lora_B" in k for k in moved)
    assert max_param_diff(one["params"], one["initial"]) > 1e-3
    assert max_param_diff(one["params"], two["params"]) < 1e-5
    for key in ("train/loss", "train/kl"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key


# -- the command line under torchrun --------------------------------------------------

def launch(script: str, tmp_path: Path, run_dir: Path, overrides, extra_env=None, wait=True):
    from tests.conftest import TINY

    e = dict(env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RUN_DIR=str(run_dir),
             PYTHON=sys.executable, **(extra_env or {}))
    e.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["bash", str(ROOT / "launch" / script), *(["2"] if script == "torchrun.sh" else []),
           *TINY, f"paths.outputs={tmp_path}", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("nanovppo").experiment_id])
    assert len(runs) == 1, "one MLflow run for all ranks"
    return c, runs[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_trains_checkpoints_and_resumes_at_the_same_world_size(tmp_path, strategy):
    run_dir = tmp_path / "run"
    rc, out = launch("torchrun.sh", tmp_path, run_dir,
                     ["trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=2",
                      f"hardware.strategy={strategy}", "trainer.ema=0.5"])
    assert rc == 0, out[-4000:]
    c, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    history = c.get_metric_history(run.info.run_id, "train/reward_mean")
    assert [m.step for m in history] == [1, 2]  # rank 0 logs, once per step
    assert "eval/reward_mean" in run.data.metrics and "eval/accuracy_ema" in run.data.metrics
    ckpt = run_dir / "checkpoints" / "step_000002"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # The EMA (decay 0.5, one optimizer step a step): 0.25 w0 + 0.25 w1 + 0.5 w2. Under DDP
    # rank 0 saves the whole average; under FSDP2 each rank its shard (rows split in two).
    from safetensors.torch import load_file

    name = "model.layers.0.mlp.down_proj.weight"
    w = [load_file(run_dir / "checkpoints" / f"step_00000{k}" / "model" / "model.safetensors")[name]
         for k in range(3)]
    if strategy == "ddp":
        assert all("ema" not in r for r in state["ranks"])
        average = state["ema"]["average"][name]
    else:
        assert "ema" not in state
        shards = [r["ema"]["average"][name] for r in state["ranks"]]
        assert [len(x) for x in shards] == [len(w[0]) // 2] * 2
        average = torch.cat(shards)
    torch.testing.assert_close(average, 0.25 * w[0] + 0.25 * w[1] + 0.5 * w[2], rtol=0, atol=1e-6)
    # The checkpoint holds whole tensors (gathered from FSDP2 shards), loadable alone.
    from nanovppo.models import load_model
    from omegaconf import OmegaConf

    model, _ = load_model(OmegaConf.create({"source": "dir", "path": str(ckpt / "model")}))
    assert model.model.embed_tokens.weight.shape[0] > 1000

    rc, out = launch("torchrun.sh", tmp_path, run_dir,
                     [f"resume={run_dir}", "trainer.max_steps=3"])
    assert rc == 0, out[-4000:]
    c, run2 = mlflow_run(tmp_path)
    assert run2.info.run_id == run.info.run_id
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/reward_mean")]
    assert steps == [1, 2, 3]


def test_resume_with_another_world_size_is_a_clear_error(tmp_path):
    from tests.test_cli import run_cli

    run_cli(tmp_path, "trainer.max_steps=1", "hydra.run.dir=" + str(tmp_path / "run"))
    rc, out = launch("torchrun.sh", tmp_path, tmp_path / "run",
                     [f"resume={tmp_path / 'run'}", "trainer.max_steps=2"])
    assert rc != 0
    assert "resume it with the same number" in out


def test_two_nodes_on_loopback_complete_two_steps(tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    common = {"NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    nodes = [launch("multinode.sh", tmp_path, run_dir, ["trainer.max_steps=2"],
                    dict(common, NODE_RANK=str(r)), wait=False) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    c, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2]
