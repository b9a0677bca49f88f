# Two commands on a fresh machine: `make demo` and `make test`. Both create (or reuse) the virtual environment in
# .venv and install what they need; the install is redone when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHECKED := hf_clip conversion examples tests

.PHONY: install test style quality check demo clean

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

$(FASHION_MNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

demo: install $(FASHION_MNIST)
	$(PY) examples/demo.py --output-dir demo_output

clean:
	rm -rf $(VENV) demo_output .mypy_cache .ruff_cache .pytest_cache
