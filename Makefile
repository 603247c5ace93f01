# make run  : create .venv if missing, install compressflow with the tested pins, run the quickstart
# make test : the same install, then the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/compressflow run pipelines/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) mlflow.db mlruns
