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

.PHONY: install test test-oldest style quality check demo clean

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

demo: install $(FASHION_MNIST)
	$(PY) examples/demo.py --output-dir demo_output

clean:
	rm -rf $(VENV) $(OLDEST_VENV) demo_output .mypy_cache .ruff_cache .pytest_cache
