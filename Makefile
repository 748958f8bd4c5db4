# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-installed
DEV := $(VENV)/.dev-installed

.PHONY: demo test lint install clean

$(CORE): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is a CPU wheel on local disk on our machines; elsewhere pip picks the build for yours.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e .
	touch $(CORE)

$(DEV): $(CORE)
	$(PY) -m pip install -q -e ".[dev]"
	# Headless Chromium for the web-chat test (it skips, saying why, where this cannot be installed).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
		|| echo "chromium not installed: the browser test will be skipped"
	touch $(DEV)

install: $(CORE)

demo: $(CORE)
	$(PY) data_utils.py
	$(PY) train.py
	$(PY) infer_lora_finetuning.py --predict data/dev.json --limit 8

# Two workers (pytest-xdist), a test file each at a time, so a file's fixtures load once; one torch thread per
# worker, as two workers already fill two cores (more threads only contend: 12.8 against 14.5 minutes).
test: $(DEV)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

lint: $(DEV)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf output lightning_logs
