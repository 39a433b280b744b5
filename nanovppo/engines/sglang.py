"""Rollouts on an SGLang server that nanovppo starts, owns and shuts down.

The engine saves the policy (config, tokenizer, weights) into a folder, launches
``python -m sglang.launch_server`` on it as a child process in its own process group,
and talks to the server's native HTTP API with the standard library only:

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

Every request has a timeout, and a server that died or answered with an error status
becomes a ``NanovppoError`` naming its log, never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch

from nanovppo.lora import merged_model
from nanovppo.engines.base import Completion, Sampling, full_tensor
from nanovppo.errors import ConfigError, NanovppoError
from nanovppo.models import to_dtype

LOG_NAME = "sglang-server.log"
# Environment variables that make SGLang return log-probs at temperature 1.
ORIGINAL_LOGPROB_ENV = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")
# The readiness probe: SGLang answers 200 once it can generate a token (503 before).
HEALTH_PATH = "/health_generate"


class SGLangServerError(NanovppoError):
    """The SGLang server died, timed out or answered with an error."""


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _check_port(host: str, port: int) -> None:
    """A clear error now, rather than a server that fails to bind after loading a model."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use (another SGLang server?): "
                    f"stop it, or give this one another port with inference_backend.port=..."
                    f" (0 picks a free one), or use the running server with "
                    f"inference_backend.server_url=http://{_connect_host(host)}:{port}"
                ) from None
            raise ConfigError(f"the SGLang server cannot listen on {host}:{port} ({e}); "
                              f"change inference_backend.host or inference_backend.port"
                              ) from None


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path | None, lines: int = 30, max_bytes: int = 8000) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    tail = "\n".join(text.splitlines()[-lines:])
    return tail or "(the log is empty)"


def _weights_parent(model) -> str | None:
    """/dev/shm (memory-backed, so saving and loading weights is fast) when it exists and
    has room for the weights twice over; None: the system's temporary folder."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        return None
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return shm if shutil.disk_usage(shm).free > 2 * size + (64 << 20) else None


# Runs first in the server's process, then becomes the server (exec keeps the pid): asks
# Linux to send the server SIGTERM when the process that started it dies, so a trainer
# killed without running ``close`` (SIGKILL, the OOM killer) leaves no server holding the
# GPU. Done in a separate program rather than in ``preexec_fn``, which can deadlock in a
# process with threads. The signal comes when the *thread* that started the server ends:
# build the engine in the thread that keeps running (the trainer's main thread).
_PARENT_DEATH_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the process that started the server is gone')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


class _Server:
    """What must be released whatever happens to the engine: the server's process group
    and the folder the engine created. Kept apart from the engine so that an exit hook
    can release it without keeping the engine alive."""

    def __init__(self, shutdown_timeout_s: float):
        self.proc: subprocess.Popen | None = None
        self.log_file = None
        self.own_dir: Path | None = None  # a temporary folder we made, removed at the end
        self.keep_log = False  # a failure: the folder goes, its log stays for the user
        self.shutdown_timeout_s = shutdown_timeout_s
        self.released = False

    def stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # the server leads its own process group
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.shutdown_timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # The leader is gone or did not stop in time: end anything left in the group
            # (SGLang's scheduler and detokenizer processes).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.stop_process()
        if self.own_dir is not None and self.own_dir.exists():
            if self.keep_log:
                for child in self.own_dir.iterdir():
                    if child.name != LOG_NAME:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(self.own_dir, ignore_errors=True)


class SGLangEngine:
    """The ``sglang`` inference backend (see ``conf/inference_backend/sglang.yaml``)."""

    name = "sglang"
    trainer_numerics = False  # its own kernels, in bf16: the mismatch is corrected
    shares_policy = False     # weights are pushed after every update

    def __init__(self, model, tokenizer, seed: int = 0, name: str = "sglang",
                 host: str = "127.0.0.1", port: int = 30000, base_gpu_id: int = 0,
                 dp_size: int = 1, mem_fraction_static: float = 0.5,
                 dtype: str | None = None, startup_timeout_s: float = 600,
                 request_timeout_s: float = 600, shutdown_timeout_s: float = 10,
                 weights_dir: str | None = None, server_url: str | None = None,
                 extra_args: Iterable[str] = (), env: dict | None = None,
                 python: str | None = None, launch_command: list[str] | None = None,
                 max_sequences_per_request: int = 1024, per_request_seeds: bool = False,
                 enable_memory_saver: bool = False, weight_update_session: str = "auto"):
        """Save ``model`` and ``tokenizer`` into ``weights_dir`` and start a server on it,
        or, with ``server_url``, use a server someone else runs (and leave it running)."""
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
        self.log_path: Path | None = None
        # No proxy, even when http_proxy is set: the server is local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._server = _Server(float(shutdown_timeout_s))
        self._finalizer = weakref.finalize(self, self._server.release)

        if server_url is None:
            if not port:
                port = _free_port(host)
            else:
                _check_port(host, int(port))
            self.url = f"http://{_connect_host(host)}:{int(port)}"
        else:
            self.url = server_url.rstrip("/")
        try:
            if weights_dir is None:
                self._server.own_dir = Path(tempfile.mkdtemp(prefix="nanovppo-sglang-",
                                                             dir=_weights_parent(model)))
                self.weights_dir = self._server.own_dir
            else:
                self.weights_dir = Path(weights_dir).resolve()  # the server has its own cwd
                self.weights_dir.mkdir(parents=True, exist_ok=True)
            self._save_policy(model, tokenizer)
            if server_url is None:
                self.log_path = self.weights_dir / LOG_NAME
                command = self.server_command(
                    launch_command or [python or sys.executable, "-m", "sglang.launch_server"],
                    host=host, port=int(port), base_gpu_id=base_gpu_id, dp_size=dp_size,
                    mem_fraction_static=mem_fraction_static, extra_args=extra_args)
                self._launch(command, env or {})
            self._wait_healthy(float(startup_timeout_s))
        except BaseException:
            if self._server.proc is not None or self.log_path is not None:
                self._server.keep_log = True
            self.close()
            raise

    # -- server lifecycle -----------------------------------------------------------------

    def server_command(self, launcher: list[str], host: str, port: int, base_gpu_id: int,
                       dp_size: int, mem_fraction_static: float,
                       extra_args: Iterable[str] = ()) -> list[str]:
        """The command line that starts the server on ``weights_dir``."""
        cmd = [*map(str, launcher), "--model-path", str(self.weights_dir), "--host", host,
               "--port", str(port), "--base-gpu-id", str(base_gpu_id),
               "--dp-size", str(dp_size), "--mem-fraction-static", str(mem_fraction_static),
               "--random-seed", str(self.seed),
               "--dtype", str(self.dtype).removeprefix("torch.")]
        if self.enable_memory_saver:
            cmd.append("--enable-memory-saver")
        return cmd + [str(a) for a in extra_args]

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

    def _launch(self, command: list[str], extra_env: dict) -> None:
        environ = {k: v for k, v in os.environ.items() if k not in ORIGINAL_LOGPROB_ENV}
        environ.update({str(k): str(v) for k, v in extra_env.items()})
        environ.setdefault("PYTHONUNBUFFERED", "1")
        self._server.log_file = open(self.log_path, "ab")
        self._server.log_file.write(("$ " + " ".join(command) + "\n").encode())
        self._server.log_file.flush()
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _PARENT_DEATH_SHIM, str(os.getpid()), *command]
        # Its own session and process group: a Ctrl-C in the terminal reaches the trainer
        # only, whose ``finally`` then closes the engine, which stops the whole group.
        self._server.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._server.log_file,
            stderr=subprocess.STDOUT, env=environ, start_new_session=True)

    @property
    def pid(self) -> int | None:
        """The server's process id (None for a server the engine did not start)."""
        return self._server.proc.pid if self._server.proc is not None else None

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            proc = self._server.proc
            if proc is not None and proc.poll() is not None:
                raise SGLangServerError(
                    f"the SGLang server exited with code {proc.returncode} while starting; "
                    f"last lines of its log ({self.log_path}):\n{_log_tail(self.log_path)}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status, _ = self._http("GET", HEALTH_PATH, timeout=max(0.5, min(left, 30)))
                if status == 200:
                    return
                last = f"{HEALTH_PATH} answered {status}"
            except (OSError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        where = (f"last lines of its log ({self.log_path}):\n{_log_tail(self.log_path)}"
                 if self.log_path else f"last attempt: {last}")
        raise SGLangServerError(
            f"the SGLang server at {self.url} did not become healthy within {timeout:g} s "
            f"(inference_backend.startup_timeout_s; {last}); {where}")

    def close(self) -> None:
        """Stop the server the engine started (SIGTERM to its process group, SIGKILL after
        ``shutdown_timeout_s``) and remove the folder the engine created; safe to call
        more than once. ``weakref.finalize`` also runs it from an ``atexit`` hook, so a
        program that never calls it (or dies of an exception) still stops the server."""
        self._finalizer()

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self, method: str, path: str, payload=None, timeout: float | None = None):
        """(status, body bytes); raises OSError/HTTPException when there is no answer."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout or self.request_timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()

    def _where(self) -> str:
        if self.log_path is None:
            return f"the server at {self.url} is not run by nanovppo"
        return f"last lines of its log ({self.log_path}):\n{_log_tail(self.log_path)}"

    def _check_alive(self, what: str) -> None:
        proc = self._server.proc
        if proc is not None and proc.poll() is not None:
            self._server.keep_log = True
            raise SGLangServerError(
                f"the SGLang server (pid {proc.pid}) died with exit code {proc.returncode}"
                f" {what}; {self._where()}")

    def _call(self, method: str, path: str, payload=None, ok=(200,)) -> tuple[int, bytes]:
        """One request to the server, with every way of failing turned into a clear error.
        ``ok``: the statuses the caller handles itself."""
        what = f"{method} {path}"
        self._check_alive(f"before {what}")
        try:
            status, body = self._http(method, path, payload)
        except (OSError, http.client.HTTPException) as e:
            if self._server.proc is not None:  # a reset connection: did the server die?
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._server.proc.wait(timeout=2)
            self._check_alive(f"while answering {what}")
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise SGLangServerError(
                    f"the SGLang server did not answer {what} within "
                    f"{self.request_timeout_s:g} s (inference_backend.request_timeout_s); "
                    f"{self._where()}") from e
            raise SGLangServerError(
                f"could not reach the SGLang server at {self.url} for {what}: {e}; "
                f"{self._where()}") from e
        if status not in ok:
            text = body.decode("utf-8", errors="replace").strip()
            raise SGLangServerError(
                f"the SGLang server answered {what} with status {status}: {text[:2000]}; "
                f"{self._where()}")
        return status, body

    def _json(self, method: str, path: str, payload=None):
        _, body = self._call(method, path, payload)
        try:
            return json.loads(body) if body.strip() else None
        except json.JSONDecodeError as e:
            raise SGLangServerError(f"the SGLang server answered {method} {path} with "
                                    f"something that is not JSON: {body[:500]!r}") from e

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

