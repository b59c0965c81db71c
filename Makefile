# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: demo demo-wloss demo-lora test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo --out $(DEMO_DIR)

demo-wloss: $(STAMP)
	$(BIN)/python -m demo --out $(DEMO_DIR) --compare-w-loss

demo-lora: $(STAMP)
	$(BIN)/python -m demo --out $(DEMO_DIR) --lora

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every benchmark interleaves its contenders; `make bench OFFICIAL=/path/to/SiD-LSG` adds the official SiD-LSG code.
OFFICIAL ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/build_shards.py
	$(BIN)/python benchmarks/fit.py
	$(BIN)/python benchmarks/sid.py $(if $(OFFICIAL),--official $(OFFICIAL))
	$(BIN)/python benchmarks/optim.py
	$(BIN)/python benchmarks/progressive.py
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/memory_plan.py

clean:
	rm -rf $(VENV) runs
