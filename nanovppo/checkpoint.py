"""Checkpoints that let an interrupted run continue exactly where it stopped.

``<run dir>/checkpoints/step_000010/`` holds the model and tokenizer in HF format
(``model/``), the optimizer, scheduler and RNG states, the step and the MLflow run id
(``state.pt``; RNG and engine states one per rank), and the resolved config (``config.yaml``). A checkpoint is written to a
temporary folder and renamed into place, so a crash while saving never leaves a partial
one that a resume would pick up.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, cfg, model, tokenizer, optimizer_state: dict,
                    scheduler, extra: dict, keep: int = 2, model_state: dict | None = None) -> Path:
    """Write step ``step``'s checkpoint; ``model_state`` replaces ``model``'s own tensors
    (the whole tensors gathered from a sharded model)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "model").mkdir(parents=True)
    model.save_pretrained(tmp / "model", state_dict=model_state)
    tokenizer.save_pretrained(tmp / "model")
    torch.save({"step": step, "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(), **extra},
               tmp / "state.pt")
    OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:  # the RL start (step 0) is kept too: resume and evaluation read it
        for old in list_checkpoints(run_dir)[:-keep]:
            if old.name != "step_000000":
                shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", weights_only=False)
