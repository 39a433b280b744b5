"""LoRA through peft: what trains, the reference, the merged weights the engines get, and
the command line (warm start, resume, evaluation, export loaded by vLLM, torchrun DDP)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nanovppo.logprobs import GroupLogprobs, pad_groups
from nanovppo.lora import AdapterOffLogprobs, add_adapters, base_name, engine_weights, merged_model
from nanovppo.rollout import Sample
from nanovppo.update import update
from tests.conftest import TINY, compose_cfg, make_algo

ROOT = Path(__file__).resolve().parent.parent
LORA = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
BATCH = ([[5, 6, 7], [11, 12]], [[[8, 9], [10]], [[13, 14, 15], [16, 17]]])


def lora_policy(tiny):
    base, tok = tiny
    policy = add_adapters(copy.deepcopy(base), LORA)
    for n, p in policy.named_parameters():  # peft starts B at 0; move it so the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return base, policy, tok


@pytest.mark.parametrize("path", ["GroupLogprobs", "PackedLogprobs"])
def test_the_reference_is_the_base_with_adapters_off(tiny, path):
    """Through either forward: the trainer gives the reference the one-pass module in one
    process and under DDP (``nanovppo.fast.logprob_module``), the two-pass one elsewhere."""
    from nanovppo.packed import PackedLogprobs

    module = {"GroupLogprobs": GroupLogprobs, "PackedLogprobs": PackedLogprobs}[path]
    base, policy, tok = lora_policy(tiny)
    batch = pad_groups(*BATCH, tok.pad_token_id)
    want = module(base)(batch)
    ref = AdapterOffLogprobs(module(policy))(batch)
    assert torch.equal(ref, want)
    assert not torch.allclose(module(policy)(batch), want)  # the adapters do change it


def test_only_the_adapters_train_and_reach_the_optimizer(tiny):
    base, policy, tok = lora_policy(tiny)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model = GroupLogprobs(policy)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    samples = [Sample(p, c, adv, 0.0, False, g)
               for g, (p, cs) in enumerate(zip(*BATCH)) for c, adv in zip(cs, (1.0, -1.0))]
    cfg = compose_cfg([*TINY, "hardware.compute_dtype=float32"])
    update(model, None, make_algo("grpo"), samples, cfg, optimizer, tok.pad_token_id, step=1)
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert len(optimizer.param_groups[0]["params"]) == len(trainable)


def test_engines_get_the_merged_weights_under_the_base_names(tiny):
    base, policy, tok = lora_policy(tiny)
    merged = dict(merged_model(policy).named_parameters())
    batch = pad_groups(*BATCH, tok.pad_token_id)
    before = GroupLogprobs(policy)(batch)
    with engine_weights(policy) as named:
        pushed = {n: p.detach().clone() for n, p in named}
    assert set(pushed) == set(dict(base.named_parameters()))
    for n, p in pushed.items():
        torch.testing.assert_close(p, merged[n])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pushed[q], dict(base.named_parameters())[q])  # W + scale * B A
    torch.testing.assert_close(GroupLogprobs(policy)(batch), before)  # unmerged afterwards
    assert base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == q


def run_cli(tmp_path, *args, module="nanovppo.train", base=TINY):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", module, *base, f"paths.outputs={tmp_path}", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# vLLM's CPU attention wants head_dim 32 or more: 2 heads of the tiny model's 64.
VLLM_SIZES = ["model.sizes.num_attention_heads=2", "model.sizes.num_key_value_heads=1"]
LORA_ARGS = [*VLLM_SIZES, "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
             # a length bonus gives the tiny random model's samples different rewards
             "task._target_=my_tasks.ConciseCountdown", "+task.length_bonus=1.0", "algo.lr=1e-2",
             "algo.kl_coef=0.1"]


def test_a_lora_run_warm_starts_resumes_evaluates_and_exports_a_model_vllm_loads(tmp_path):
    from mlflow.tracking import MlflowClient

    run_cli(tmp_path, *LORA_ARGS, "trainer.max_steps=2", "trainer.checkpoint_every=1",
            "warm_start.steps=2", "warm_start.batch_size=4")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nanovppo").experiment_id])
    run_dir = Path(run.data.tags["nanovppo.run_dir"])
    step2 = run_dir / "checkpoints" / "step_000002"
    # the RL start is whole (the warm start's adapters merged in); RL checkpoints hold
    # only adapters and their optimizer state
    assert (run_dir / "checkpoints" / "step_000000" / "model" / "model.safetensors").is_file()
    assert not (step2 / "model" / "model.safetensors").exists()
    adapters = (step2 / "model" / "adapter_model.safetensors").stat().st_size
    whole = (run_dir / "checkpoints" / "step_000000" / "model" / "model.safetensors").stat().st_size
    assert adapters < whole / 50
    state = torch.load(step2 / "state.pt", weights_only=False)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "train/grad_norm")) > 0

    run_cli(tmp_path, f"resume={run_dir}", "trainer.max_steps=3", base=[])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean")]
    assert steps == [1, 2, 3]

    out = run_cli(tmp_path, f"eval.checkpoint={run_dir}", "eval.log_to_mlflow=false",
                  "trainer.progress=false", module="nanovppo.evaluate",
                  base=[t for t in TINY if t.startswith(("experiment=", "model=", "task.", "rollout."))]
                  + VLLM_SIZES)
    assert "step_000003" in out.stdout and "greedy_accuracy" in out.stdout

    export = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "nanovppo.export", str(run_dir), str(export)],
                   check=True, cwd=tmp_path, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    pytest.importorskip("vllm")
    from vllm import LLM, SamplingParams

    from nanovppo.models import load_model

    merged, tok = load_model(OmegaConf.create({"source": "dir", "path": str(export)}))
    prompt = tok("Count: 1 2 3", add_special_tokens=False).input_ids
    want = merged.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU
    llm = LLM(model=str(export), dtype="float32", max_model_len=256, enforce_eager=True,
              block_size=32)
    [got] = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert list(got.outputs[0].token_ids) == want.tolist()
