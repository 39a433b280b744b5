import os
from pathlib import Path

import pytest
import torch

from nanovppo.config import compose_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# make test runs the suite in parallel (pytest-xdist, one worker a core): each worker, and
# the runs it starts as subprocesses, gets its share of the cores instead of all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)

ROOT = Path(__file__).resolve().parent.parent
# Small settings for runs on the tiny random model. Its tokenizer, read from SmolLM2's GGUF
# file, is saved once in the repository's model cache (as `make train`'s model is) and
# shared by every test and the runs they start.
# The update's compiled kernels (trainer.fused_kernels, on by default) are off here: loading
# them costs a run ~4 s (torch.compile's start, the cached code) and the tiny runs test other
# things. tests/test_kernels.py, test_update_reference.py (every algorithm against the plain
# reference) and the bench's smoke runs (bench/, on the default configuration) run them.
TINY = ["experiment=bare", "model=tiny-random", "trainer.prompts_per_step=2", "algo.group_size=2",
        "rollout.max_new_tokens=6", "trainer.eval_examples=2", "trainer.progress=false",
        "task.n_train=50", "task.n_test=4", f"model.cache_dir={ROOT / 'outputs' / 'cache' / 'models'}",
        "trainer.fused_kernels=false"]


def compose_cfg(overrides=(), tmp_path: Path | None = None):
    """``nanovppo.config.compose_config`` (no recipe unless one is named), with the run
    folders under ``tmp_path`` when given."""
    extra = [f"paths.outputs={tmp_path}"] if tmp_path else []
    return compose_config([*extra, *overrides])


def make_engine(name: str, model, tok, seed: int = 0, **options):
    """An engine built as the trainer builds it: ``conf/inference_backend/NAME.yaml``
    (composed with the CPU hardware) with ``options`` replacing some of its values."""
    from nanovppo.config import build

    cfg = compose_cfg([f"inference_backend={name}"]).inference_backend
    return build(cfg, "inference_backend", model=model, tokenizer=tok, seed=seed,
                 _convert_="partial", **options)


def hf_engine(model, tok, seed: int = 0, **options):
    """The hf engine sampling from ``model`` itself, as the tests mostly want it: the YAML's
    values but no bf16 copy (``dtype=None``) and the model's attention left as it is."""
    return make_engine("hf", model, tok, seed, **{"dtype": None, "attn_implementation": None,
                                                   **options})



def kept_bytes(module, run):
    """Bytes of the distinct storages autograd keeps for the backward while ``run()`` builds
    the graph, ``module``'s parameters (and views of them) left out, and ``run()``'s
    result (``tests/test_packed.py``, ``bench/packed_update.py``)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(kept.values()), out

@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Llama, loaded once."""
    from nanovppo.models import load_model

    cfg = compose_cfg([o for o in TINY if o.startswith("model")])
    return load_model(cfg.model, dtype="float32")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub and an empty dataset cache: every hub dataset is out of reach."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def make_algo(name: str, **overrides):
    """The algorithm a user gets from ``algo=<name>`` (its YAML), with keys overridden."""
    from nanovppo.config import build

    return build(compose_cfg([f"algo={name}"]).algo, "algo", **overrides)
