# deidflow: the two set-up commands are `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CORES  ?= 2
# The SLURM executor plugins (the `slurm` extra for users), without their dependencies, which are in
# the test extra. (A private folder for them saved nothing measurable: docs/design-notes.md.)
SLURM_PLUGINS := snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1

.PHONY: install demo test test-fast fuzz bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,pixels,deepbet]"
	$(BIN)/python -m pip install --quiet --no-deps $(SLURM_PLUGINS)
	touch $(STAMP)

install: $(STAMP)  ## create .venv with deidflow (editable) and the test extras

demo: install  ## generate the demo patients and de-identify them (ephemeral key)
	$(BIN)/deidflow demo --cores $(CORES)

test: install  ## the whole suite, real-data and slow tests included (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: install  ## skip the slow and real-data tests
	$(BIN)/python -m pytest -q -m "not slow and not realdata"

fuzz: install  ## long fuzz run of the DICOM de-identification (20000 random examples per strategy)
	DEIDFLOW_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/test_fuzz_dicom.py tests/test_fuzz_formats.py -p no:cacheprovider

bench: install  ## throughput and overhead benchmarks, printed as tables
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/pixels.py
	$(BIN)/python benchmarks/face.py
	$(BIN)/python benchmarks/startup.py

lint: install
	DEIDFLOW_KEY=lint-only-key-0123456789 $(BIN)/snakemake --lint --config input=tests output=/tmp/deidflow-lint-release

clean:
	rm -rf $(VENV) demo .snakemake .pytest_cache
