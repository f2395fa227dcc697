# The front doors. `make run` and `make test` are the whole set-up on a fresh clone: each
# creates .venv first when it is missing (or older than pyproject.toml / constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stage commands (`python -m finetune ...`, `dvc ...`) must find the project's environment.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run demo test bench ui serve doctor scheduler deploy lock clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The whole pipeline, through the Prefect flow, on the real hot-dog data (downloads it once).
run: $(STAMP)
	$(PY) -m flows.pipeline

# The same pipeline offline, in its own workspace (demo/), on a generated dataset.
demo: $(STAMP)
	$(PY) -m finetune demo-setup
	$(PY) -m flows.pipeline --workspace $$($(PY) -c 'from finetune.config import load_params; print(load_params().demo.workspace)')

# pytest's exit status 5 (no tests collected) fails like any other non-zero status.
test: $(STAMP)
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected; that is a failure" >&2; fi; \
	exit $$status

# Speed, measured side by side: the plain recipe loop vs the trainer, dvc repro, Prefect overhead
# (prints a table, writes reports/bench.json and the table in docs/speed.md). BENCH_ARGS: see --help.
bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

# The MLflow UI over a workspace's local store (<workspace>/mlflow/), on 127.0.0.1 only;
# `make ui WORKSPACE=demo` for the demo's runs and models.
WORKSPACE ?= .
ui: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --default-artifact-root mlflow/artifacts --host 127.0.0.1 --port 5000

# The production model (models:/<register.model_name>@production) over REST on 127.0.0.1:<serve.port>;
# `make serve WORKSPACE=demo` after `make demo`. POST {"dataframe_records": [{"image": "<base64>"}]}
# to /invocations; the answer holds the class and every class's probability.
serve: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune serve

# Do dvc.lock, models/, the MLflow runs and the registry agree? Prints each mismatch with the
# command that repairs it; exit 1 if any.
doctor: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune doctor

# Scheduled retraining (retrain.cron in params.yaml): a real Prefect server on 127.0.0.1:4200
# (state in .prefect/) and the retrain deployment served against it; Ctrl-C stops both.
scheduler: $(STAMP)
	$(PY) -m flows.server --workspace $(WORKSPACE)

# The same deployment for a Prefect server with work pools (prefect.yaml): needs PREFECT_API_URL
# and a process work pool; then `FINETUNE_PROJECT=$$PWD prefect worker start --pool finetune-process`.
deploy: $(STAMP)
	$(VENV)/bin/prefect work-pool inspect finetune-process >/dev/null 2>&1 || $(VENV)/bin/prefect work-pool create finetune-process --type process
	FINETUNE_PROJECT=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --name scheduled-retrain \
	  --cron "$$($(PY) -c 'from finetune.config import load_params; print(load_params().retrain.cron)')" \
	  --timezone "$$($(PY) -c 'from finetune.config import load_params; print(load_params().retrain.timezone)')"

# Re-pin constraints.txt from the current environment (after changing pyproject.toml).
lock: $(STAMP)
	{ echo "# The exact dependency set of .venv (Python 3.11, Linux x86_64); written by 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable --exclude finetune | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean-demo:
	rm -rf demo
