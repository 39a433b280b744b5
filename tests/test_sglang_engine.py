"""The sglang rollout engine against a fake SGLang server (tests/sglang_fake_server.py):
in this process, and started by the engine as its server process."""

import importlib.util
import inspect
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanovppo.engines.base import Sampling
from nanovppo.engines.sglang import SGLangEngine, SGLangServerError
from nanovppo.errors import ConfigError, NanovppoError
from tests.conftest import compose_cfg, make_engine
from tests.sglang_fake_server import FakeSGLang, tensor_summary

FAKE_SCRIPT = str(Path(__file__).with_name("sglang_fake_server.py"))
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture
def fake(tiny):
    servers = []

    def make(**kw):
        server = FakeSGLang(tiny[1], **kw).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def connect(tiny, server, tmp_path, **kw):
    model, tok = tiny
    return make_engine("sglang", model, tok, server_url=server.url, weights_dir=tmp_path / "w", **kw)


def gone(pid: int) -> bool:
    """True once no process is left in the group that ``pid`` led."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_groups_follow_prompts_with_their_budgets(tiny, fake, tmp_path):
    server = fake()
    engine = connect(tiny, server, tmp_path)
    sp = Sampling(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5)
    groups = engine.generate(PROMPTS, sp, max_new_tokens=[2, 9, 4])
    assert [len(g) for g in groups] == [2, 2, 2]
    for p, (prompt, group, budget) in enumerate(zip(PROMPTS, groups, [2, 5, 4])):
        for j, c in enumerate(group):
            assert c.prompt_ids == prompt
            # the fake answers [last prompt token, 1000 + sequence index, ...]
            assert c.token_ids[:2] == [prompt[-1], 1000 + 2 * p + j][:budget]
            assert len(c.token_ids) == budget and c.finish_reason == "length"
            assert len(c.logprobs) == len(c.token_ids)
            assert c.text == tiny[1].decode(c.token_ids, skip_special_tokens=True)
    [request] = server.state["generate"]
    # one copy of a prompt per sample, prompt-major, each with its own budget (capped)
    assert request["input_ids"] == [p for p in PROMPTS for _ in range(2)]
    params = request["sampling_params"]
    assert [s["max_new_tokens"] for s in params] == [2, 2, 5, 5, 4, 4]
    assert all(s["temperature"] == 0.7 and s["top_p"] == 0.9 and s["no_stop_trim"]
               and "n" not in s for s in params)
    assert request["return_logprob"] is True
    engine.close()


def test_greedy_and_chunked_requests(tiny, fake, tmp_path):
    server = fake()
    engine = connect(tiny, server, tmp_path, max_sequences_per_request=4)
    groups = engine.generate(PROMPTS, Sampling(n=3, temperature=0.0, top_p=0.5,
                                               max_new_tokens=3))
    requests = server.state["generate"]
    # 9 sequences in chunks of at most 4, sent concurrently (so in any order)
    assert sorted(len(r["input_ids"]) for r in requests) == [1, 4, 4]
    assert all(r["sampling_params"]["temperature"] == 0.0
               and r["sampling_params"]["top_p"] == 1.0 for r in requests)
    # chunks come back in order: group p holds prompt p's completions
    assert [[c.token_ids[0] for c in g] for g in groups] == [[p[-1]] * 3 for p in PROMPTS]
    assert engine.generate([], Sampling()) == []
    engine.close()


def test_stop_string_and_eos_stay_in_the_completion(tiny, fake, tmp_path):
    tok = tiny[1]
    script = tok("ab</answer> tail", add_special_tokens=False).input_ids + [tok.eos_token_id]
    server = fake(scripts={(4, 5, 6): script})
    engine = connect(tiny, server, tmp_path)
    [[c]] = engine.generate([[4, 5, 6]], Sampling(max_new_tokens=30, stop=("</answer>",)))
    assert c.finish_reason == "stop"
    assert c.text.endswith("</answer>") and "tail" not in c.text
    assert c.token_ids == script[:4] and len(c.logprobs) == 4
    assert server.state["generate"][-1]["sampling_params"]["stop"] == ["</answer>"]
    [[c]] = engine.generate([[4, 5, 6]], Sampling(max_new_tokens=30))
    assert c.finish_reason == "stop" and c.token_ids == script  # EOS kept, like hf
    assert c.text.endswith(" tail")
    [[c]] = engine.generate([[4, 5, 6]], Sampling(max_new_tokens=3))
    assert c.finish_reason == "length" and c.token_ids == script[:3]
    engine.close()


def test_update_weights_writes_safetensors_the_server_loads(tiny, fake, tmp_path):
    model, _ = tiny
    server = fake()
    engine = connect(tiny, server, tmp_path, dtype="bfloat16")
    w = tmp_path / "w"
    assert (w / "config.json").is_file() and (w / "tokenizer_config.json").is_file()
    assert next(model.parameters()).dtype == torch.float32  # saving in bf16 left it alone
    changed = {n: (p + 1.0 if "q_proj" in n else p) for n, p in model.named_parameters()}
    engine.update_weights(changed.items())
    [update] = server.state["updates"]
    assert update["model_path"] == str(w)
    want = {n: tensor_summary(t.to(torch.bfloat16)) for n, t in changed.items()}
    assert update["weights"] == want
    assert server.state["events"][-2:] == ["/update_weights_from_disk", "/flush_cache"]
    assert "/begin_weight_update" in server.state["events"]  # probed once: 404, no session
    assert "/end_weight_update" not in server.state["events"]
    engine.update_weights(changed.items())
    assert server.state["events"].count("/begin_weight_update") == 1
    # the next rollout sees the new weights (the fake counts versions)
    [[c]] = engine.generate([[4, 5]], Sampling(max_new_tokens=3))
    assert c.token_ids[2] == 2002
    assert sorted(p.name for p in w.glob("*.safetensors")) == ["model.safetensors"]
    engine.close()
    assert w.is_dir()  # a folder the user gave is kept


def test_score_reads_the_servers_input_logprobs_and_follows_a_push(tiny, fake, tmp_path):
    """The sync check's probe on sglang: the engine asks for input log-probs from position
    0 and returns those of tokens 1..; the fake serves them from a real copy of the model,
    which each pushed folder is loaded into. A push of changed weights changes them."""
    import copy

    from tests.test_logprobs import naive_logprobs

    model, _ = tiny
    served = copy.deepcopy(model).eval()
    server = fake(score_model=served)
    engine = connect(tiny, server, tmp_path, dtype="float32")
    ids = [1, 5, 9, 200, 31, 44]
    want, _ = naive_logprobs(model, ids[:1], ids[1:], 1.0)
    before = torch.tensor(engine.score(ids))
    assert (before - want).abs().max().item() < 1e-5
    changed = {n: (p * 1.5 if "o_proj" in n else p) for n, p in model.named_parameters()}
    engine.update_weights(changed.items())
    after = torch.tensor(engine.score(ids))
    assert (after - before).abs().max().item() > 1e-3
    body = server.state["generate"][-1]
    assert body["logprob_start_len"] == 0 and body["input_ids"] == ids
    engine.close()


def test_weight_update_session_brackets_the_update(tiny, fake, tmp_path):
    server = fake(session_routes=True)
    engine = connect(tiny, server, tmp_path)
    engine.update_weights(tiny[0].named_parameters())
    engine.update_weights(tiny[0].named_parameters())
    events = [e for e in server.state["events"] if e not in ("/health_generate",)]
    assert events == ["/begin_weight_update", "/update_weights_from_disk",
                      "/end_weight_update", "/flush_cache"] * 2
    engine.close()


def test_failed_update_is_a_clear_error_and_closes_the_session(tiny, fake, tmp_path):
    server = fake(session_routes=True, fail_update=True)
    engine = connect(tiny, server, tmp_path)
    with pytest.raises(NanovppoError, match="could not load the updated weights.*fake load"):
        engine.update_weights(tiny[0].named_parameters())
    assert server.state["events"][-1] == "/end_weight_update"
    assert not server.session_open
    engine.close()


def test_error_status_and_timeout_are_errors_not_hangs(tiny, fake, tmp_path):
    server = fake(error_token=777)
    engine = connect(tiny, server, tmp_path)
    with pytest.raises(NanovppoError, match="answered POST /generate with status 400.*fake"):
        engine.generate([[777, 1]], Sampling(max_new_tokens=2))
    slow = fake(hang_s=30)
    engine = connect(tiny, slow, tmp_path, request_timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(NanovppoError, match="did not answer POST /generate within 1 s"):
        engine.generate([[3, 4]], Sampling(max_new_tokens=2))
    assert time.monotonic() - t0 < 10


def test_dropped_connection_is_an_error(tiny, fake, tmp_path):
    server = fake(die_token=666)
    engine = connect(tiny, server, tmp_path)
    with pytest.raises(NanovppoError, match="could not reach the SGLang server"):
        engine.generate([[666]], Sampling(max_new_tokens=2))


def test_server_url_that_never_answers(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    t0 = time.monotonic()
    with pytest.raises(NanovppoError, match="did not become healthy within 1 s"):
        make_engine("sglang", *tiny, server_url=f"http://127.0.0.1:{port}", startup_timeout_s=1,
                     weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 5


def test_seeds_per_request_continue_after_resume(tiny, fake, tmp_path):
    server = fake()
    sp = Sampling(n=2, temperature=1.0, max_new_tokens=3)
    a = connect(tiny, server, tmp_path, seed=7, per_request_seeds=True)
    a.generate(PROMPTS[:1], sp)
    state = a.state_dict()
    a.generate(PROMPTS[:1], sp)
    b = connect(tiny, server, tmp_path, seed=7, per_request_seeds=True)
    b.load_state_dict(state)
    b.generate(PROMPTS[:1], sp)
    c = connect(tiny, server, tmp_path, seed=8, per_request_seeds=True)
    c.generate(PROMPTS[:1], sp)
    seeds = [[s["sampling_seed"] for s in r["sampling_params"]]
             for r in server.state["generate"]]
    assert len(set(seeds[0])) == 2 and seeds[0] != seeds[1]  # per sample, per call
    assert seeds[2] == seeds[1]  # the resumed engine continues where the first left off
    assert seeds[3] != seeds[0]
    connect(tiny, server, tmp_path).generate(PROMPTS[:1], sp)
    assert all("sampling_seed" not in s for s in server.state["generate"][-1]["sampling_params"])


def test_memory_saver(tiny, fake, tmp_path):
    server = fake()
    engine = connect(tiny, server, tmp_path)
    engine.sleep()
    engine.wake_up()
    assert "/release_memory_occupation" not in server.state["events"]
    engine = connect(tiny, server, tmp_path, enable_memory_saver=True)
    engine.sleep()
    engine.wake_up()
    assert server.state["events"][-2:] == ["/release_memory_occupation",
                                           "/resume_memory_occupation"]
    assert "--enable-memory-saver" in engine.server_command(["x"], "h", 1, 0, 1, 0.5)


def test_busy_port_is_a_config_error(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"port {port}.*inference_backend.port="):
            make_engine("sglang", *tiny, port=port, launch_command=[sys.executable, FAKE_SCRIPT])
        assert time.monotonic() - t0 < 2


def test_server_that_exits_at_startup(tiny, tmp_path):
    launch = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    t0 = time.monotonic()
    with pytest.raises(NanovppoError, match=r"(?s)exited with code 3 while starting.*boom"):
        make_engine("sglang", *tiny, port=0, launch_command=launch, weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 10


def test_server_that_never_becomes_healthy_is_killed(tiny, tmp_path, monkeypatch):
    pids = []
    real_popen = subprocess.Popen

    def recording_popen(*a, **kw):
        proc = real_popen(*a, **kw)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr("nanovppo.engines.sglang_server.subprocess.Popen", recording_popen)
    launch = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    with pytest.raises(NanovppoError, match=r"(?s)did not become healthy within 2 s.*loading"):
        make_engine("sglang", *tiny, port=0, launch_command=launch, startup_timeout_s=2,
                     weights_dir=tmp_path / "w")
    assert time.monotonic() - t0 < 10
    assert pids and gone(pids[0])


def test_launched_server_end_to_end(tiny):
    model, tok = tiny
    engine = make_engine("sglang", model, tok, seed=3, port=0, dtype="bfloat16", startup_timeout_s=60,
                          launch_command=[sys.executable, FAKE_SCRIPT],
                          extra_args=["--health-delay", "0.5"])
    try:
        pid, w = engine.pid, engine.weights_dir
        state = engine._json("GET", "/_fake/state")
        assert state["health_calls"] >= 2  # it waited through the 503s
        argv = state["argv"]
        assert argv[argv.index("--model-path") + 1] == str(w)
        assert argv[argv.index("--random-seed") + 1] == "3"
        assert argv[argv.index("--dtype") + 1] == "bfloat16"
        assert {"--base-gpu-id", "--dp-size", "--mem-fraction-static"} <= set(argv)
        # the server started on the policy, saved in bf16
        sd = {n: p for n, p in model.named_parameters()}
        assert state["initial_weights"]["model.norm.weight"] == tensor_summary(
            sd["model.norm.weight"].to(torch.bfloat16))
        groups = engine.generate(PROMPTS[:2], Sampling(n=2, max_new_tokens=4), [3, 4])
        assert [[len(c.token_ids) for c in g] for g in groups] == [[3, 3], [4, 4]]
        assert groups[1][1].token_ids[:2] == [PROMPTS[1][-1], 1003]
        engine.update_weights((n, p * 2) for n, p in model.named_parameters())
        state = engine._json("GET", "/_fake/state")
        assert state["updates"][0]["weights"]["model.norm.weight"] == tensor_summary(
            (sd["model.norm.weight"] * 2).to(torch.bfloat16))
        assert (w / "sglang-server.log").is_file()
    finally:
        engine.close()
    assert gone(pid)
    assert not w.exists()  # the temporary folder went with the server
    engine.close()  # twice is fine


def test_server_dying_mid_request(tiny):
    model, tok = tiny
    engine = make_engine("sglang", model, tok, port=0, startup_timeout_s=60,
                          launch_command=[sys.executable, FAKE_SCRIPT],
                          extra_args=["--die-token", "666"])
    pid = engine.pid
    try:
        t0 = time.monotonic()
        died = r"(?s)died with exit code 3 while answering POST /generate.*sglang-server.log"
        with pytest.raises(SGLangServerError, match=died):
            engine.generate([[5, 666]], Sampling(max_new_tokens=2))
        with pytest.raises(SGLangServerError, match="died with exit code 3 before"):
            engine.generate([[5, 6]], Sampling(max_new_tokens=2))
        assert time.monotonic() - t0 < 10
        log = engine.log_path
    finally:
        engine.close()
    assert gone(pid)
    assert log.is_file() and list(log.parent.iterdir()) == [log]  # only the log is kept
    log.unlink(), log.parent.rmdir()


HEALTH_SERVER = """
import http.server, sys

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
# A server that ignores SIGTERM and has a child process that ignores it too.
STUBBORN_SERVER = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("child", child.pid, flush=True)
""" + HEALTH_SERVER
# A trainer that starts an engine (on stand-in model and tokenizer objects) and waits.
TRAINER = """
import sys, time
from pathlib import Path
import torch
from tests.conftest import make_engine

class Model(torch.nn.Linear):
    def save_pretrained(self, folder, state_dict=None):
        (Path(folder) / "config.json").write_text("{}")

class Tokenizer:
    def save_pretrained(self, folder):
        pass

engine = make_engine("sglang", Model(2, 2), Tokenizer(), port=0, weights_dir=sys.argv[1],
                      launch_command=[sys.executable, "-c", sys.argv[2]])
print("server", engine.pid, flush=True)
time.sleep(60)
"""


def dead(pid: int, wait_s: float = 5.0) -> bool:
    """True once ``pid`` is gone or a zombie (killed, waiting for its parent to reap it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def test_close_kills_a_server_group_that_ignores_sigterm(tiny, tmp_path):
    engine = make_engine("sglang", *tiny, port=0, shutdown_timeout_s=1, weights_dir=tmp_path / "w",
                          launch_command=[sys.executable, "-c", STUBBORN_SERVER])
    deadline = time.monotonic() + 10
    while not (found := re.search(r"^child (\d+)$", engine.log_path.read_text(), re.M)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(found.group(1))
    pid = engine.pid
    t0 = time.monotonic()
    engine.close()
    assert time.monotonic() - t0 < 5
    assert gone(pid) or dead(pid)
    assert dead(child)  # the server's own child process went with the group


def test_server_stops_when_the_trainer_is_killed(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux only")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path), HEALTH_SERVER],
                               stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[1])
    try:
        line = trainer.stdout.readline()
        assert line.startswith("server "), line
        server = int(line.split()[1])
        assert not dead(server, wait_s=0.2)
    finally:
        trainer.kill()  # no finally, no atexit: only the kernel can tell the server
        trainer.wait()
        trainer.stdout.close()
    assert dead(server)


def test_config_matches_the_engine():
    cfg = compose_cfg(["inference_backend=sglang"]).inference_backend
    assert cfg._target_ == "nanovppo.engines.sglang.SGLangEngine" and cfg.name == "sglang"
    params = set(inspect.signature(SGLangEngine.__init__).parameters)
    keys = set(cfg) - {"_target_"}
    assert keys <= params
    assert params - keys == {"self", "model", "tokenizer", "seed"}  # every option is in yaml


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None
                    or not torch.cuda.is_available(),
                    reason="needs SGLang installed (pip install -e .[sglang]) and a CUDA GPU")
def test_real_sglang_server(tiny):
    model, tok = tiny
    engine = make_engine("sglang", model, tok, port=0, dtype="bfloat16", mem_fraction_static=0.2,
                          extra_args=["--attention-backend", "triton", "--disable-cuda-graph"])
    try:
        sp = Sampling(n=2, temperature=1.0, max_new_tokens=8)
        groups = engine.generate(PROMPTS, sp, max_new_tokens=[8, 3, 5])
        for prompt, group, budget in zip(PROMPTS, groups, [8, 3, 5]):
            for c in group:
                assert c.prompt_ids == prompt and 0 < len(c.token_ids) <= budget
                assert len(c.logprobs) == len(c.token_ids)
                assert all(lp <= 0 for lp in c.logprobs)
                assert c.finish_reason == "length" or c.token_ids[-1] == tok.eos_token_id
        engine.update_weights((n, torch.zeros_like(p)) for n, p in model.named_parameters())
        [[zeroed]] = engine.generate([PROMPTS[0]], Sampling(temperature=0, max_new_tokens=6))
        # zero weights make every logit equal: each token has log-prob -log(vocab size)
        uniform = -torch.log(torch.tensor(float(model.config.vocab_size))).item()
        assert all(abs(lp - uniform) < 0.05 for lp in zeroed.logprobs)
    finally:
        pid = engine.pid
        engine.close()
    assert gone(pid)
