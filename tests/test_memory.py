"""The trainer's host-memory policy (nanovppo/memory.py) on this process's real malloc."""

import sys

import pytest
import torch

from nanovppo.memory import keep_freed_memory, release_free_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def touch_and_free(mb: int) -> None:
    x = torch.ones(mb * 2 ** 18)  # mb MiB of float32, every page written
    del x


def test_freed_blocks_are_kept_for_reuse_until_released():
    try:
        assert keep_freed_memory(True)
        release_free_memory()
        base = rss_mb()
        touch_and_free(256)
        kept = rss_mb() - base
        release_free_memory()
        released = rss_mb() - base
        assert kept > 200, kept        # the freed block stays resident, ready for reuse
        assert released < 50, released  # and goes back to the OS when asked

        assert keep_freed_memory(False)
        base = rss_mb()
        touch_and_free(256)
        assert rss_mb() - base < 50     # glibc's default: big blocks unmapped at once
    finally:
        keep_freed_memory(True)


def test_release_pages_hands_a_tensors_pages_back_and_keeps_the_tensor():
    """64 MiB of ones: after release_pages the whole pages read as zeros and are no longer
    resident; the tensor stays usable (written pages come back)."""
    from nanovppo.memory import release_pages

    x = torch.ones(16 * 2 ** 20)  # 64 MiB of float32, every page written
    base = rss_mb()
    released = release_pages([x, x[10:]])  # a view of the same storage counts once
    assert 63 * 2 ** 20 <= released <= 64 * 2 ** 20
    assert base - rss_mb() > 60
    assert x.sum().item() < 4096  # at most the two partial pages at the ends keep their ones
    x.fill_(2.0)
    assert x.sum().item() == 2.0 * x.numel() and rss_mb() - base > -4


ONEDNN_PROBE = """
import sys, torch
from nanovppo.memory import limit_onednn_cache
print("set", limit_onednn_cache(int(sys.argv[1])), flush=True)
a = torch.randn(8, 64, dtype=torch.bfloat16)
ws = [torch.randn(64, n, dtype=torch.bfloat16) for n in (32, 48)]
for _ in range(3):      # two shapes, taking turns: A B A B A B
    for w in ws:
        a @ w
"""


def _onednn_creates(capacity: int, env_cap: str | None = None) -> tuple[str, dict]:
    import os
    import subprocess

    from tests.test_cli import ROOT

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env["ONEDNN_VERBOSE"] = "profile_create"  # oneDNN prints each primitive's creation
    if env_cap is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = env_cap
    out = subprocess.run([sys.executable, "-c", ONEDNN_PROBE, str(capacity)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    counts = {k: text.count(f"create:cache_{k}") for k in ("hit", "miss")}
    if not sum(counts.values()):
        pytest.skip("torch does not run bf16 matmuls through oneDNN on this CPU")
    return text.splitlines()[0], counts


def test_onednn_cache_cap_applies_before_the_first_matmul():
    """Two matmul shapes taking turns, three times each (six creations). With a cap of 1
    (hardware.onednn_cache=1) each shape evicts the other: 6 misses. With 32, oneDNN
    creates each shape once: 2 misses, 4 hits. A cap already in the environment wins."""
    first, counts = _onednn_creates(1)
    assert first == "set True" and counts == {"hit": 0, "miss": 6}
    first, counts = _onednn_creates(32)
    assert first == "set True" and counts == {"hit": 4, "miss": 2}
    first, counts = _onednn_creates(1, env_cap="32")
    assert first == "set False" and counts == {"hit": 4, "miss": 2}


def test_onednn_cache_cap_refuses_what_is_not_a_count():
    """What the CLI of nanovppo.evaluate (which runs this key's schema rule alone, not
    check_config) could pass."""
    from omegaconf import OmegaConf

    from nanovppo.errors import ConfigError
    from nanovppo.schema import check_keys

    for bad in (0, -3, "32", 2.5, True):
        cfg = OmegaConf.create({"hardware": {"onednn_cache": bad}})
        with pytest.raises(ConfigError, match="hardware.onednn_cache"):
            check_keys(cfg, ["hardware.onednn_cache"])
