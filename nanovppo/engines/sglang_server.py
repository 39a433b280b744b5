"""The SGLang server behind ``engines/sglang.py``: the process nanovppo starts, owns and
shuts down, and the HTTP calls to it.

``SGLangServer`` launches ``python -m sglang.launch_server`` on a folder of weights as a
child process in its own process group (or talks to a server given by URL and leaves it
running), waits until ``/health_generate`` answers, and sends every request with a timeout
through the standard library only. A server that died, timed out or answered with an error
status becomes a ``SGLangServerError`` naming its log, never a hang. ``close`` (also run at
exit) stops the whole process group and removes the folder the engine made; a server whose
trainer was killed without closing it gets SIGTERM from Linux (``_PARENT_DEATH_SHIM``).
"""

from __future__ import annotations

import contextlib
import errno
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
from pathlib import Path
from typing import Iterable

from nanovppo.errors import ConfigError, NanovppoError

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


class SGLangServer:
    """A running SGLang server and the calls to it; ``SGLangEngine`` builds on it: its
    ``__init__`` opens the connection, writes the weights folder, then starts the server."""

    weights_dir: Path
    dtype: object
    seed: int
    enable_memory_saver: bool
    request_timeout_s: float

    def _open_connection(self, host: str, port: int, server_url: str | None,
                         shutdown_timeout_s: float) -> None:
        """The server's address (a free port when ``port`` is 0) and what ``close`` releases."""
        self.log_path: Path | None = None
        # No proxy, even when http_proxy is set: the server is local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._server = _Server(float(shutdown_timeout_s))
        self._finalizer = weakref.finalize(self, self._server.release)
        self.port = None
        if server_url is None:
            if not port:
                port = _free_port(host)
            else:
                _check_port(host, int(port))
            self.port = int(port)
            self.url = f"http://{_connect_host(host)}:{int(port)}"
        else:
            self.url = server_url.rstrip("/")

    def _weights_folder(self, weights_dir: str | None, model) -> Path:
        """``weights_dir``, or a temporary folder the engine owns (removed by ``close``)."""
        if weights_dir is None:
            self._server.own_dir = Path(tempfile.mkdtemp(prefix="nanovppo-sglang-",
                                                         dir=_weights_parent(model)))
            return self._server.own_dir
        folder = Path(weights_dir).resolve()  # the server has its own cwd
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _failed_start(self) -> None:
        """Stop what started; keep the server's log for the user if there is one."""
        if self._server.proc is not None or self.log_path is not None:
            self._server.keep_log = True
        self.close()

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
