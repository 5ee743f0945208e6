# deidflow: the two set-up commands are `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CORES  ?= 2
LINT_DIR := $(shell mktemp -u -d /tmp/deidflow-lint-XXXXXX)
# The SLURM executor plugins (the `slurm` extra for users), without their dependencies, which are in
# the test extra. (A private folder for them saved nothing measurable: docs/design-notes.md.)
SLURM_PLUGINS := snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1

# Exact versions of everything installed: constraints.txt (pyproject.toml keeps ranges).
PIP    := $(BIN)/python -m pip install --progress-bar on -c constraints.txt
ALL_STAMP := $(VENV)/.installed-all-stamp

.PHONY: install install-all demo test test-fast fuzz bench bench-face-registration lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	$(PIP) -e .
	touch $(STAMP)

# Everything the test-suite exercises: the test extra, deepbet with the CPU build of torch (the
# tests of the deepbet/quickshear backends skip without it, so CI must install it; constraints.txt pins
# the CPU build), the SLURM plugins.
$(ALL_STAMP): $(STAMP)
	$(PIP) -e ".[test,deepbet]"
	$(PIP) --no-deps $(SLURM_PLUGINS)
	touch $(ALL_STAMP)

install: $(STAMP)  ## .venv with deidflow (editable) and what `make demo` needs; no torch (default backend: ants)

install-all: $(ALL_STAMP)  ## install, plus the test extra, deepbet/torch (CPU) and the SLURM plugins

demo: install  ## generate the demo patients and de-identify them (ephemeral key)
	$(BIN)/deidflow demo --cores $(CORES)

# The suite runs in $(CORES) pytest-xdist workers, one test file per worker at a time (module fixtures
# such as test_slurm's one-node SLURM start once); `make test CORES=1` runs it in one process.
XDIST = $(if $(filter 1,$(CORES)),,-n $(CORES) --dist loadfile)

test: install-all  ## the whole suite, real-data and slow tests included (what CI runs)
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

test-fast: install-all  ## skip the slow and real-data tests
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not realdata"

fuzz: install-all  ## long fuzz run of the DICOM de-identification (20000 random examples per strategy)
	DEIDFLOW_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/test_fuzz_dicom.py tests/test_fuzz_formats.py -p no:cacheprovider

bench: install-all  ## throughput and overhead benchmarks, printed as tables
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/pixels.py
	$(BIN)/python benchmarks/face.py
	$(BIN)/python benchmarks/publish.py
	$(BIN)/python benchmarks/startup.py

bench-face-registration: install-all  ## ants registration options on the real heads: CPU and eye/brow corner movement (needs ../shared/data)
	$(BIN)/python benchmarks/face_registration.py

lint: install
	rm -rf $(LINT_DIR) && $(BIN)/python -c "from deidflow.demo import make_demo_input; make_demo_input('$(LINT_DIR)/input')"
	DEIDFLOW_KEY=lint-only-key-0123456789 $(BIN)/snakemake --lint --config input=$(LINT_DIR)/input output=$(LINT_DIR)/release

clean:
	rm -rf $(VENV) demo .snakemake .pytest_cache build dist
