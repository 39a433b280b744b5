"""Rollouts on an SGLang server that nanovppo starts, owns and shuts down.

The engine saves the policy (config, tokenizer, weights) into a folder, starts a server
on it (``engines/sglang_server.py``) and talks to the server's native HTTP API:

* ``POST /generate`` with ``input_ids`` (a list of token-id lists) and one
  ``sampling_params`` dict per sequence. ``n`` samples of a prompt are sent as ``n``
  copies of the prompt rather than with SGLang's ``n``: one output per input, in input
  order, so grouping by prompt cannot depend on how a server version orders parallel
  samples (SGLang itself advises duplicating prompts for large batches, and its radix
  cache still prefills a shared prompt once). ``return_logprob`` gives
  ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]`` per sampled
  token; those ids are the completion, so ids and log-probs always line up.
  ``no_stop_trim`` keeps a stop string and the EOS token in the output, as the ``hf``
  engine does, and the text is decoded here from the ids, as the ``hf`` engine does.
* Log-probs: SGLang returns ``log softmax(logits / temperature)`` of the sampled token
  (before top-p/top-k renormalisation), the convention of ``Completion.logprobs``,
  unless the server's environment sets ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (older
  releases: ``RETURN_ORIGINAL_LOGPROB``), which returns temperature-1 log-probs; the
  engine removes both from the server's environment. Greedy (temperature 0) returns
  temperature-1 log-probs, as the ``hf`` engine does.
* Weights: ``update_weights`` writes the trained tensors as safetensors over the
  folder's weight files and posts ``/update_weights_from_disk``, then ``/flush_cache``.
  Recent SGLang brackets weight updates in a session, ``/begin_weight_update`` ...
  ``/end_weight_update`` (sgl-project/sglang PR #28001, whose description says the
  ``update_weights_from_*`` calls assert an open session); with
  ``weight_update_session: auto`` the engine opens one when the server has the route
  and goes without on a server that answers 404. The faster tensor/NCCL update routes
  need a process group shared with the server and are not used.
* ``sleep``/``wake_up`` post ``/release_memory_occupation`` and
  ``/resume_memory_occupation`` when ``enable_memory_saver`` (which also starts the
  server with ``--enable-memory-saver``); otherwise they do nothing.

The server's process and the HTTP calls to it live in ``engines/sglang_server.py``: every
request has a timeout, and a server that died or answered with an error status becomes a
``SGLangServerError`` naming its log, never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from nanovppo.engines.base import Completion, Sampling, full_tensor
from nanovppo.engines.sglang_server import LOG_NAME, SGLangServer, SGLangServerError
from nanovppo.errors import ConfigError
from nanovppo.lora import merged_model
from nanovppo.models import to_dtype

__all__ = ["SGLangEngine", "SGLangServerError"]


class SGLangEngine(SGLangServer):
    """The ``sglang`` inference backend (see ``conf/inference_backend/sglang.yaml``)."""

    name = "sglang"
    trainer_numerics = False  # its own kernels, in bf16: the mismatch is corrected
    shares_policy = False     # weights are pushed after every update

    def __init__(self, model, tokenizer, seed: int, *, name: str, host: str, port: int,
                 base_gpu_id: int, dp_size: int, mem_fraction_static: float,
                 dtype: str | None, startup_timeout_s: float, request_timeout_s: float,
                 shutdown_timeout_s: float, weights_dir: str | None, server_url: str | None,
                 extra_args: Iterable[str], env: dict, python: str | None,
                 launch_command: list[str] | None, max_sequences_per_request: int,
                 per_request_seeds: bool, enable_memory_saver: bool,
                 weight_update_session: str):
        """Save ``model`` and ``tokenizer`` into ``weights_dir`` and start a server on it,
        or, with ``server_url``, use a server someone else runs (and leave it running).
        Every option comes from ``conf/inference_backend/sglang.yaml`` (no defaults here)."""
        if weight_update_session not in ("auto", "always", "never"):
            raise ConfigError("inference_backend.weight_update_session must be auto, always "
                              f"or never, not {weight_update_session!r}")
        if max_sequences_per_request < 1:
            raise ConfigError("inference_backend.max_sequences_per_request must be >= 1")
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.calls = 0  # generate calls so far: per-request seeds continue after a resume
        self.progress = False  # set by the trainer; a server call has no progress to show
        self.request_timeout_s = float(request_timeout_s)
        self.max_sequences_per_request = int(max_sequences_per_request)
        self.per_request_seeds = bool(per_request_seeds)
        self.enable_memory_saver = bool(enable_memory_saver)
        self.weight_update_session = weight_update_session
        self._session_supported: bool | None = {"always": True, "never": False}.get(
            weight_update_session)
        self.dtype = to_dtype(dtype) if dtype else next(model.parameters()).dtype
        self._open_connection(host, port, server_url, shutdown_timeout_s)
        try:
            self.weights_dir = self._weights_folder(weights_dir, model)
            self._save_policy(model, tokenizer)
            if server_url is None:
                self.log_path = self.weights_dir / LOG_NAME
                command = self.server_command(
                    launch_command or [python or sys.executable, "-m", "sglang.launch_server"],
                    host=host, port=self.port, base_gpu_id=base_gpu_id, dp_size=dp_size,
                    mem_fraction_static=mem_fraction_static, extra_args=extra_args)
                self._launch(command, env or {})
            self._wait_healthy(float(startup_timeout_s))
        except BaseException:
            self._failed_start()
            raise

    @torch.no_grad()
    def _save_policy(self, model, tokenizer) -> None:
        model = merged_model(model)  # with LoRA: the adapters folded into a plain model
        state = None
        if next(model.parameters()).dtype != self.dtype:
            # A converted copy, one per storage so that tied weights stay tied; the policy
            # itself is not touched (a round trip through bf16 would round its weights).
            copies: dict[int, torch.Tensor] = {}
            state = {}
            for key, value in model.state_dict().items():
                ptr = value.data_ptr()
                if ptr not in copies:
                    copies[ptr] = value.to(self.dtype) if value.is_floating_point() else value
                state[key] = copies[ptr]
        model.save_pretrained(self.weights_dir, state_dict=state)
        tokenizer.save_pretrained(self.weights_dir)


    # -- protocol -------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 max_new_tokens: list[int] | None = None) -> list[list[Completion]]:
        """``sampling.n`` completions of each prompt, grouped by prompt; ``max_new_tokens``
        optionally gives each prompt its own budget (at most ``sampling.max_new_tokens``)."""
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
        call = self.calls
        self.calls += 1
        rows = [(list(map(int, p)), max(1, min(int(b), sampling.max_new_tokens)))
                for p, b in zip(prompts, budgets) for _ in range(sampling.n)]
        if not rows:
            return [[] for _ in prompts]
        params = [self._sampling_params(sampling, budget, call, i)
                  for i, (_, budget) in enumerate(rows)]
        size = self.max_sequences_per_request
        chunks = [(rows[i:i + size], params[i:i + size]) for i in range(0, len(rows), size)]
        if len(chunks) == 1:
            outputs = self._generate_chunk(*chunks[0])
        else:  # in parallel, so the server schedules them together
            with ThreadPoolExecutor(max_workers=min(len(chunks), 16)) as pool:
                outputs = [o for part in pool.map(lambda c: self._generate_chunk(*c), chunks)
                           for o in part]
        done = [self._completion(prompt, out) for (prompt, _), out in zip(rows, outputs)]
        n = sampling.n
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _sampling_params(self, sampling: Sampling, budget: int, call: int, row: int) -> dict:
        greedy = sampling.temperature == 0
        params = {"max_new_tokens": budget,
                  "temperature": 0.0 if greedy else float(sampling.temperature),
                  "top_p": 1.0 if greedy else float(sampling.top_p),
                  "no_stop_trim": True, "skip_special_tokens": True}
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        if self.per_request_seeds and not greedy:
            digest = hashlib.blake2b(f"{self.seed}:{call}:{row}".encode(), digest_size=8)
            params["sampling_seed"] = int.from_bytes(digest.digest(), "big") >> 33
        return params

    def _generate_chunk(self, rows, params) -> list[dict]:
        same = all(p == params[0] for p in params)
        payload = {"input_ids": [prompt for prompt, _ in rows],
                   "sampling_params": params[0] if same else params,
                   "return_logprob": True, "logprob_start_len": -1, "stream": False}
        out = self._json("POST", "/generate", payload)
        if isinstance(out, dict):
            out = [out]
        if not isinstance(out, list) or len(out) != len(rows):
            got = len(out) if isinstance(out, list) else type(out).__name__
            raise SGLangServerError(f"the SGLang server answered {len(rows)} sequences with "
                                    f"{got} outputs")
        return out

    def _completion(self, prompt: list[int], out: dict) -> Completion:
        meta = out.get("meta_info") or {}
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in ("stop", "length"):
            detail = reason.get("message", reason) if isinstance(reason, dict) else reason
            raise SGLangServerError(f"the SGLang server did not finish a completion "
                                    f"(finish_reason {kind!r}: {detail})")
        entries = meta.get("output_token_logprobs")
        if entries is not None:
            token_ids = [int(e[1]) for e in entries]
            logprobs = [float(e[0]) for e in entries]
        elif out.get("output_ids") is not None:
            token_ids, logprobs = [int(t) for t in out["output_ids"]], None
        else:
            raise SGLangServerError("the SGLang server returned neither "
                                    "output_token_logprobs nor output_ids")
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(token_ids=token_ids, text=text, finish_reason=kind,
                          logprobs=logprobs, prompt_ids=prompt)

    def score(self, token_ids: list[int]) -> list[float]:
        """Log-probs at temperature 1 of ``token_ids[1:]``, each given the ones before it
        (the server's ``input_token_logprobs``; the first token has none)."""
        ids = [int(t) for t in token_ids]
        out = self._json("POST", "/generate", {
            "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True, "logprob_start_len": 0, "stream": False})
        entries = ((out or {}).get("meta_info") or {}).get("input_token_logprobs") or []
        if len(entries) != len(ids) or [int(e[1]) for e in entries] != ids:
            raise SGLangServerError(f"the SGLang server scored {len(entries)} tokens, not "
                                    f"the {len(ids)} it was sent")
        return [float(e[0]) for e in entries[1:]]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the tensors over the folder's weight files (config and tokenizer stay) and
        have the server load them."""
        from safetensors.torch import save_file

        tensors = {}
        for name, tensor in named_tensors:
            whole = full_tensor(tensor)  # gathers a sharded FSDP2 parameter (on every rank)
            t = whole.to("cpu", self.dtype)
            if t.data_ptr() == whole.data_ptr():
                t = t.clone()  # safetensors refuses tensors that share memory
            tensors[name] = t.contiguous()
        if not tensors:
            return
        tmp = self.weights_dir / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        for old in [*self.weights_dir.glob("*.safetensors"),
                    *self.weights_dir.glob("*.safetensors.index.json")]:
            old.unlink()
        tmp.replace(self.weights_dir / "model.safetensors")
        del tensors

        session = self._begin_session()
        try:
            status, body = self._call("POST", "/update_weights_from_disk",
                                      {"model_path": str(self.weights_dir)}, ok=(200, 400))
            try:
                answer = json.loads(body)
            except json.JSONDecodeError:
                answer = {"message": body.decode("utf-8", errors="replace")[:2000]}
            if status != 200 or not isinstance(answer, dict) or not answer.get("success"):
                message = answer.get("message", answer) if isinstance(answer, dict) else answer
                raise SGLangServerError(f"the SGLang server could not load the updated weights"
                                        f" from {self.weights_dir}: {message}")
        except BaseException:
            if session:  # close the session, but report the error that came first
                with contextlib.suppress(SGLangServerError):
                    self._end_session()
            raise
        if session:
            self._end_session()
        self._call("POST", "/flush_cache")

    def _begin_session(self) -> bool:
        if self._session_supported is False:
            return False
        status, body = self._call("POST", "/begin_weight_update", {}, ok=(200, 404))
        if status == 404:
            if self._session_supported:
                raise SGLangServerError(
                    "the SGLang server has no /begin_weight_update route; use "
                    "inference_backend.weight_update_session=auto or never")
            self._session_supported = False
            return False
        self._session_supported = True
        self._check_success("POST /begin_weight_update", body)
        return True

    def _end_session(self) -> None:
        _, body = self._call("POST", "/end_weight_update", {})
        self._check_success("POST /end_weight_update", body)

    @staticmethod
    def _check_success(what: str, body: bytes) -> None:
        with contextlib.suppress(json.JSONDecodeError):
            answer = json.loads(body) if body.strip() else None
            if isinstance(answer, dict) and answer.get("success") is False:
                raise SGLangServerError(f"the SGLang server refused {what}: "
                                        f"{answer.get('message', answer)}")

    def sleep(self) -> None:
        """Release the server's GPU memory (weights and KV cache) while the trainer works."""
        if self.enable_memory_saver:
            self._call("POST", "/release_memory_occupation", {})

    def wake_up(self) -> None:
        if self.enable_memory_saver:
            self._call("POST", "/resume_memory_occupation", {})

    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))
