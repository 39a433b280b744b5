"""A stand-in for an SGLang server: the native HTTP routes nanovppo uses, on loopback.

It speaks the request and response shapes of SGLang's ``/generate`` (``input_ids``,
``sampling_params`` as one dict or one per sequence, ``n``, ``stop``, ``no_stop_trim``,
``return_logprob`` -> ``meta_info.output_token_logprobs`` as ``[logprob, id, text]``,
``finish_reason`` ``{"type": "stop"|"length", ...}``), ``/health_generate``,
``/update_weights_from_disk`` (which reads the safetensors files it is pointed at and
records what they hold), ``/flush_cache``, the weight-update session routes and the
memory routes. Completions are fixed functions of the request, so tests can predict them:

    default: [last prompt token, 1000 + k, 2000 + weights version, 3000, 3001, ...]

where ``k`` is the sequence's index in the request (or its ``sampling_seed`` mod 1000),
unless ``scripts`` gives the tokens for a prompt. ``GET /_fake/state`` returns what it
saw. Run it as a script (``python tests/sglang_fake_server.py --port P --model-path DIR``,
SGLang's other flags are accepted and recorded) to stand in for ``sglang.launch_server``;
it serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def tensor_summary(tensor) -> list:
    """[shape, dtype, sum]: enough to tell whether two tensors hold the same values."""
    return [list(tensor.shape), str(tensor.dtype).removeprefix("torch."),
            float(tensor.detach().double().sum())]


def read_weights(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update({k: tensor_summary(v) for k, v in load_file(str(path)).items()})
    return out


class FolderTokenizer:
    """Decoding with the ``tokenizers`` library from a saved model folder: what the fake
    needs of a tokenizer, without the seconds that importing transformers takes."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        config = json.loads((Path(folder) / "config.json").read_text())
        self.eos_token_id = config.get("eos_token_id")

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class FakeSGLang:
    def __init__(self, tokenizer=None, eos_id: int | None = None, scripts: dict | None = None,
                 health_delay_s: float = 0.0, session_routes: bool = False,
                 fail_update: bool = False, hang_s: float = 0.0,
                 die_token: int | None = None, error_token: int | None = None,
                 die_hard: bool = False, argv: list[str] | None = None, score_model=None):
        self.tokenizer = tokenizer
        eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.scripts = {tuple(k): list(v) for k, v in (scripts or {}).items()}
        self.health_delay_s = health_delay_s
        self.session_routes = session_routes
        self.fail_update = fail_update
        self.hang_s = hang_s
        self.die_token, self.error_token, self.die_hard = die_token, error_token, die_hard
        # A transformers model that answers input_token_logprobs (logprob_start_len 0) for
        # real; the weights of each /update_weights_from_disk are loaded into it.
        self.score_model = score_model
        self.started = time.monotonic()
        self.release = threading.Event()  # ends a hanging request
        self.lock = threading.Lock()
        self.session_open = False
        self.state = {"argv": argv or [], "generate": [], "updates": [], "events": [],
                      "health_calls": 0, "version": 0, "initial_weights": {}}
        self.httpd: ThreadingHTTPServer | None = None

    # -- serving --------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null") if n else None

            def _send(self, status, obj=None, text=None):
                data = text.encode() if text is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type",
                                 "text/plain" if text is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.route(self, "GET", self.path, None)

            def do_POST(self):
                fake.route(self, "POST", self.path, self._body())

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        return self.httpd

    def start(self) -> "FakeSGLang":
        """Serve from a background thread on a free loopback port (see ``url``)."""
        httpd = self.serve()
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.release.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def route(self, h, method: str, path: str, body) -> None:
        with self.lock:
            self.state["events"].append(path)
        if path in ("/health", "/health_generate"):
            with self.lock:
                self.state["health_calls"] += 1
            ready = time.monotonic() - self.started >= self.health_delay_s
            return h._send(200 if ready else 503, text="" if ready else "starting")
        if path == "/_fake/state":
            with self.lock:
                return h._send(200, self.state)
        if method != "POST":
            return h._send(405, {"detail": "Method Not Allowed"})
        if path == "/generate":
            return self.generate(h, body)
        if path == "/update_weights_from_disk":
            return self.update_weights(h, body)
        if path == "/flush_cache":
            return h._send(200, text="Cache flushed.\n")
        if path in ("/begin_weight_update", "/end_weight_update"):
            if not self.session_routes:
                return h._send(404, {"detail": "Not Found"})
            opening = path == "/begin_weight_update"
            if self.session_open == opening:
                return h._send(400, {"success": False, "message": "session already "
                                     + ("open" if opening else "closed")})
            self.session_open = opening
            return h._send(200, {"success": True, "message": "ok"})
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return h._send(200, None)
        return h._send(404, {"detail": "Not Found"})

    # -- routes ---------------------------------------------------------------------------

    def update_weights(self, h, body) -> None:
        path = (body or {}).get("model_path", "")
        if self.session_routes and not self.session_open:
            return h._send(400, {"success": False, "message":
                                 "update_weights_from_disk needs an open weight-update session"})
        if self.fail_update:
            return h._send(400, {"success": False, "message": "fake load failure"})
        if not (Path(path) / "config.json").is_file():
            return h._send(400, {"success": False, "message": f"no config.json in {path}"})
        weights = read_weights(path)
        if self.score_model is not None:
            from safetensors.torch import load_file

            loaded = {}
            for f in sorted(Path(path).glob("*.safetensors")):
                loaded.update(load_file(str(f)))
            self.score_model.load_state_dict(loaded, strict=False)
        with self.lock:
            self.state["version"] += 1
            self.state["updates"].append({"model_path": path, "weights": weights})
        h._send(200, {"success": True, "message": "Succeeded to update model weights.",
                      "num_paused_requests": 0})

    def generate(self, h, body) -> None:
        with self.lock:
            self.state["generate"].append(body)
        ids = body["input_ids"]
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [ids] if single else ids
        params = body.get("sampling_params") or {}
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            return h._send(400, {"object": "error", "message": "sampling_params length",
                                 "code": 400})
        n = per_prompt[0].get("n", 1) if per_prompt else 1
        flat = [p for p in prompts for _ in range(n)]  # prompt-major, like SGLang's fan-out
        flat_params = [sp for sp in per_prompt for _ in range(n)]
        if self.die_token is not None and any(self.die_token in p for p in prompts):
            if self.die_hard:
                os._exit(3)
            h.close_connection = True  # drop the connection without an answer
            return
        if self.error_token is not None and any(self.error_token in p for p in prompts):
            return h._send(400, {"object": "error", "message": "fake failure", "code": 400})
        if self.hang_s:
            self.release.wait(self.hang_s)
        outs = [self.complete(p, sp, k, body.get("return_logprob"),
                              body.get("logprob_start_len", -1))
                for k, (p, sp) in enumerate(zip(flat, flat_params))]
        h._send(200, outs[0] if single and n == 1 else outs)

    def tokens_for(self, prompt: list[int], index: int, seed) -> list[int]:
        if tuple(prompt) in self.scripts:
            return self.scripts[tuple(prompt)]
        k = seed % 1000 if seed is not None else index
        return [prompt[-1], 1000 + k, 2000 + self.state["version"]]

    def input_logprobs(self, prompt) -> list:
        """SGLang's ``input_token_logprobs`` from position 0: ``[logprob, id, text]`` per
        prompt token, the first with no log-prob."""
        import torch

        if self.score_model is None:
            return []
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = self.score_model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return [[None, prompt[0], None]] + [[float(v), t, None]
                                            for v, t in zip(logp.tolist(), prompt[1:])]

    def complete(self, prompt, sp, index, return_logprob, logprob_start_len=-1) -> dict:
        budget = sp.get("max_new_tokens", 128)
        script = self.tokens_for(prompt, index, sp.get("sampling_seed"))
        stops = sp.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        out, entries, reason = [], [], None
        while reason is None:
            k = len(out)
            tok = script[k] if k < len(script) else 3000 + k - len(script)
            out.append(tok)
            entries.append([-0.01 * (k + 1) - 0.001 * (index % 100), tok, None])
            text = self.decode(out, skip_special_tokens=False)
            hit = next((s for s in stops if s in text), None)
            if tok in self.eos_ids and not sp.get("ignore_eos"):
                reason = {"type": "stop", "matched": tok}
            elif hit is not None:
                reason = {"type": "stop", "matched": hit}
            elif len(out) >= budget:
                reason = {"type": "length", "length": budget}
        keep = sp.get("no_stop_trim", False)
        ids = out[:-1] if isinstance(reason.get("matched"), int) and not keep else out
        text = self.decode(ids, skip_special_tokens=sp.get("skip_special_tokens", True))
        if isinstance(reason.get("matched"), str) and reason["matched"] in text:
            pos = text.find(reason["matched"])
            text = text[:pos + len(reason["matched"])] if keep else text[:pos]
        meta = {"id": f"fake-{index}", "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(out), "cached_tokens": 0}
        if return_logprob:
            meta["output_token_logprobs"] = entries
            meta["input_token_logprobs"] = (self.input_logprobs(prompt)
                                            if logprob_start_len == 0 else [])
        return {"text": text, "output_ids": ids, "meta_info": meta}

    def decode(self, ids, skip_special_tokens=True) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--health-delay", type=float, default=0.0)
    parser.add_argument("--die-token", type=int, default=None)
    args, _unknown = parser.parse_known_args(argv)  # SGLang's other flags: recorded only
    fake = FakeSGLang(FolderTokenizer(args.model_path), health_delay_s=args.health_delay,
                      die_token=args.die_token, die_hard=True, argv=argv)
    fake.state["initial_weights"] = read_weights(args.model_path)
    fake.started = time.monotonic()
    httpd = fake.serve(args.host, args.port)
    print(f"fake SGLang server on {args.host}:{args.port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
