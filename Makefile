# Two commands on a fresh machine: `make demo` and `make test`. Both create (or reuse) the virtual environment in
# .venv and install what they need; the install is redone when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHECKED := hf_clip conversion examples tests
# The oldest transformers pyproject.toml allows; `make test-oldest` runs the suite against it.
OLDEST_TRANSFORMERS := $(shell grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d= -f2)
OLDEST_VENV := .venv-oldest

# The GPU machine (Python 3.12, torch 2.11, torchvision, accelerate, tensorboard, timm, pyarrow preinstalled; no
# network) lacks these; `make gpu-wheels` fetches them here into $(GPU_WHEELS), which travels with the check.
GPU_WHEELS := .gpu/wheels
GPU_PACKAGES := transformers==5.24.0 open_clip_torch==3.3.0 inf-cl==1.2.1 ftfy==6.3.1 wcwidth datasets==5.2.0 dill multiprocess
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_SITE := /tmp/hf_clip_site

.PHONY: install test test-oldest style quality check demo clean gpu-wheels gpu-check gpu-check-dry finetune-study

install: $(STAMP)

# open_clip (a test reference) imports torchvision, which only loads beside torch 2.14.1; hf_clip itself needs
# neither that pin nor torchvision.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

style: install
	$(PY) -m ruff check --fix $(CHECKED)
	$(PY) -m ruff format $(CHECKED)

quality: install
	$(PY) -m ruff check $(CHECKED)
	$(PY) -m ruff format --check $(CHECKED)
	$(PY) -m mypy hf_clip conversion examples

test: quality
	$(PY) -m pytest -n 2 --durations=15 -q

check: test

# Not part of `make test` (a second environment doubles the install time): run it when the bound moves.
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pytest -n 2 -q

$(FASHION_MNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $(GPU_PACKAGES)

# On the GPU machine, with $(GPU_WHEELS) carried: the one command of a lent session. Results: $$OUT/gpu_check.jsonl.
gpu-check:
	python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 python3 examples/benchmarks/gpu_check.py --output $${OUT:-gpu_check}

# The same stages on CPU with tiny configurations (what tests/examples/test_gpu_check.py runs).
gpu-check-dry: install
	$(PY) examples/benchmarks/gpu_check.py --device cpu --output gpu_check_dry

demo: install $(FASHION_MNIST)
	$(PY) examples/demo.py --output-dir demo_output

clean:
	rm -rf $(VENV) $(OLDEST_VENV) demo_output gpu_check_dry finetune_study_output .mypy_cache .ruff_cache .pytest_cache

# The fine-tuning study (examples/finetune_study.py): pretrain on icon themes' captions, fine-tune on Fashion-MNIST's,
# compare full fine-tuning, a locked image tower and WiSE-FT; figure and results.json in finetune_study_output.
ICON_THEMES := /usr/share/icons/Adwaita/index.theme /usr/share/icons/Tango/index.theme /usr/share/icons/oxygen/index.theme

$(ICON_THEMES) &:
	apt-get update -qq && apt-get install -y -qq adwaita-icon-theme tango-icon-theme oxygen-icon-theme

finetune-study: install $(FASHION_MNIST) $(ICON_THEMES)
	$(PY) examples/finetune_study.py --output-dir finetune_study_output
