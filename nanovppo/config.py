"""Building the run's parts from their config nodes, and checking those nodes.

``build(node, **extra)`` instantiates a node's ``_target_`` with Hydra. Before it does, the
node's keys are checked against the target's parameters: a key the target does not take
(a typo, or a knob of another algorithm) is a ``ConfigError`` that names it and the
closest valid keys, and a parameter the node leaves out is one too. Where the target
itself refuses a value, its own ``ConfigError`` is raised, not Hydra's wrapper around it.
"""

from __future__ import annotations

import difflib
import inspect
import random
from pathlib import Path

import numpy as np
import torch

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from nanovppo.errors import ConfigError, NanovppoError

# The config tree (conf/config.yaml and its groups) that every entry point composes.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def target_parameters(target: str) -> tuple[set[str], set[str], bool]:
    """(all parameter names, the required ones, whether it takes **kwargs) of a target."""
    obj = get_class(target) if "." in target else None
    sig = inspect.signature(obj)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    required = {n for n, p in params.items() if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, required, any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_node(node: DictConfig, where: str, extra=()) -> None:
    """Raise a ``ConfigError`` if ``node``'s keys (and ``extra``, the arguments the caller
    passes itself, such as the engine's model) and its ``_target_``'s parameters differ."""
    target = node.get("_target_")
    if not target:
        return
    try:
        names, required, var_kw = target_parameters(str(target))
    except Exception as e:  # noqa: BLE001 - an unimportable target: say which
        raise ConfigError(f"{where}._target_={target}: cannot import it ({e})") from None
    keys = {k for k in node.keys() if not str(k).startswith("_")} | set(extra)
    unknown = sorted(keys - names) if not var_kw else []
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(names - set(extra)), n=3, cutoff=0.6)
            hints.append(f"{where}.{k}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"{target} does not take {'; '.join(hints)}. Its keys are: "
                          f"{', '.join(sorted(names - set(extra)))}")
    missing = sorted(required - keys)
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}, which {target} needs")


def build(node, where: str = "config", **extra):
    """``instantiate(node, **extra)`` after ``check_node``; a ``NanovppoError`` raised
    inside the target is re-raised as is."""
    check_node(node, where, extra=[k for k in extra if not k.startswith("_")])
    try:
        return instantiate(node, **extra)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, NanovppoError):
            raise cause from None
        raise


def compose_config(overrides=()) -> DictConfig:
    """conf/config.yaml composed with ``overrides`` (Hydra's syntax), without the default
    recipe unless they name one (``experiment=...``): for scripts, notebooks and tests (a
    run gets its config from Hydra's command line)."""
    from hydra import compose, initialize_config_dir

    bare = [] if any(str(o).startswith("experiment=") for o in overrides) else ["experiment=bare"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*bare, *overrides])


def load_task(name: str, **overrides):
    """The task ``conf/task/NAME.yaml`` describes, with ``overrides`` replacing some of its
    values (see ``compose_config``).

    >>> load_task("countdown_small", n_train=3, n_test=2).user_template[:20]
    'Make {target} from {'
    """
    return build(compose_config([f"task={name}"]).task, "task", **overrides)
