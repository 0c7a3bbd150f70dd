# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The local CPU wheel; installed before the project so `torch>=2.4` is already met and no CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
# The GPU machines' Triton (torch 2.11's); on a CPU box the tests run the fused loss kernels in its interpreter.
TRITON_SPEC ?= triton==3.6.0
DEMO_DIR ?= demo
SERVE ?= 0

.PHONY: install demo test lint proto bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet "$(TRITON_SPEC); sys_platform == 'linux' and platform_machine == 'x86_64'"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m recsys demo --workdir $(DEMO_DIR) $(if $(filter 1,$(SERVE)),--serve,)

lint: install
	$(VENV)/bin/ruff check recsys server tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(PY) -m pytest -q

proto: install
	$(PY) -m recsys.protogen

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
