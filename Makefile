# mmgen — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean readme-picture gpu-check

setup: $(STAMP)

# torch is pinned (CPU build, 2.13.0); see README "GPU install" for a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmgen generate examples/prompts/stories.txt examples/prompts/shapes.jsonl --out out --overwrite

# the picture at the top of the README: a document written by the bundled model
readme-picture: $(STAMP)
	rm -rf docs/example
	$(BIN)/mmgen generate --prompt "A small red circle is on the left." --seed 1 --out docs/example

test: $(STAMP)
	$(BIN)/pytest -q

# the real-scale path on a CUDA machine with the torch it already has (not the CPU pins): < 8 minutes
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/mmfs.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf $(VENV) out
