"""Checkpoints that let an interrupted run continue exactly where it stopped.

``<run dir>/checkpoints/step_000010/`` holds the model and tokenizer in HF format
(``model/``), the optimizer, scheduler and RNG states, the step and the MLflow run id
(``state.pt``; RNG and engine states one per rank), the resolved config (``config.yaml``)
and the size of every file (``manifest.json``). A checkpoint is written to a temporary
folder, flushed to disk (fsync) and only then renamed into place, so neither a crash while
saving nor a power loss after it leaves a partial one under a checkpoint's name. A resume
still checks the checkpoint it reads (``latest_intact``): a file that was cut short or does
not load (a full disk, a lost write, a copy gone wrong) makes it fall back to the newest
checkpoint before it that is whole, and say so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from nanovppo.errors import NanovppoError

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"

log = logging.getLogger("nanovppo")


class CheckpointWriteError(NanovppoError):
    """A checkpoint could not be written (a full disk, a quota): the run stops with this
    message, its earlier checkpoints intact."""


def _write_failure(e: BaseException) -> str | None:
    """What an exception says about a failed write, or None if it is not one: an OSError
    itself, or the error torch.save or safetensors raise around it (their message holds
    the OS's: "No space left on device (os error 28)", "file write failed")."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    for sign in ("os error", "No space left", "File too large", "file write failed",
                 "Disk quota"):
        if sign in text:
            return text.splitlines()[0]
    return None


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
    try:
        (tmp / "model").mkdir(parents=True)
        model.save_pretrained(tmp / "model", state_dict=model_state)
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"step": step, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), **extra},
                   tmp / "state.pt")
        OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                 if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
        _fsync_tree(tmp)
    except Exception as e:  # a full disk, a quota, a file-size limit
        # torch.save and safetensors report a failed write as RuntimeError or their own
        # error around the OSError; either way nothing partial stays behind.
        reason = _write_failure(e)
        if not reason:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} to {root} ({reason}); the "
            f"checkpoints before it are intact: free space (or lower "
            f"trainer.keep_checkpoints), then continue the run with resume={Path(run_dir)}"
        ) from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)  # the rename itself
    if keep > 0:  # the RL start (step 0) is kept too: resume and evaluation read it
        for old in list_checkpoints(run_dir)[:-keep]:
            if old.name != "step_000000":
                shutil.rmtree(old)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then the folders that name them."""
    folders = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            folders.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for folder in folders:
        _fsync_dir(folder)


def load_intact(path: str | Path) -> tuple[dict | None, str | None]:
    """(``state.pt``'s contents, None) if the checkpoint at ``path`` is whole; else (None,
    what is wrong with it): a file missing or of another size than when it was written, a
    ``state.pt`` or weights file that does not load. A weights file is opened, not read:
    opening checks that its header is whole and that its data covers the file, which is
    what a cut-short file fails (the model loader reads the tensors afterwards)."""
    from safetensors import safe_open

    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():  # checkpoints written before manifests existed skip this check
        try:
            sizes = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            return None, f"{MANIFEST} does not load ({e})"
        for name, size in sizes.items():
            f = path / name
            if not f.is_file():
                return None, f"{name} is missing"
            if f.stat().st_size != size:
                return None, f"{name} holds {f.stat().st_size} bytes, {size} were written"
    weights = sorted((path / "model").glob("*.safetensors"))
    if not weights:
        return None, "model/ holds no *.safetensors weights"
    for w in weights:
        try:
            with safe_open(str(w), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any failure to load is damage
            return None, f"model/{w.name} does not load ({_first_line(e)})"
    try:
        return load_state(path), None
    except Exception as e:  # noqa: BLE001
        return None, f"state.pt does not load ({_first_line(e)})"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def latest_intact(run_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of ``run_dir`` that is whole and its state; each newer damaged
    one is named in a warning with what is wrong with it."""
    for path in reversed(list_checkpoints(run_dir)):
        state, why = load_intact(path)
        if why is None:
            return path, state
        log.warning("checkpoint %s is damaged: %s; trying the one before it", path, why)
    return None, None


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
