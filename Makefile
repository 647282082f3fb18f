# mmgen — the two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-oldest bench clean readme-picture gpu-check gpu-wheels

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

# the oldest libraries we support, as GPU images ship them: the tests of the code that calls them
# (model building and loading, the LLM, low memory, training, FSDP/DDP, generation)
OLDEST = transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0
test-oldest:
	$(PYTHON) -m venv $(VENV)-oldest
	$(VENV)-oldest/bin/pip install --quiet torch==2.13.0
	$(VENV)-oldest/bin/pip install --quiet -e '.[test]' $(OLDEST)
	$(VENV)-oldest/bin/pytest -q tests/test_scale.py tests/test_llm.py tests/test_model.py tests/test_distributed.py \
	  tests/test_train.py tests/test_generate.py --deselect tests/test_generate.py::test_a_real_browser_shows_the_gallery

# the real-scale path on a CUDA machine with the torch it already has (not the CPU pins): < 8 minutes
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# wheels that gpu-check installs on a GPU machine that lacks them and has no network (x86-64, Python 3.12):
# diffusers and its importlib_metadata, bitsandbytes (8-bit AdamW, 4/8-bit LLM); ~50 MB in .whl/
GPU_WHEELS = "diffusers>=0.42,<0.43" importlib_metadata "bitsandbytes>=0.49"
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform any -d .whl $(GPU_WHEELS)

bench: $(STAMP)
	$(BIN)/python benchmarks/mmfs.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf $(VENV) out
