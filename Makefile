# The front doors. `make run` and `make test` are the whole set-up on a fresh clone: each
# creates .venv first when it is missing (or older than pyproject.toml / constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stage commands (`python -m finetune ...`, `dvc ...`) must find the project's environment.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run demo test test-stack test-all bench ui serve doctor scheduler deploy lock clean-demo \
	status dag metrics plots predict promote rollback errors study

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# PIP_CONSTRAINT: constraints.txt is the whole tested set; a machine-wide pip constraint
	# (some build machines cap torch at the release they keep on disk) would refuse it.
	PIP_CONSTRAINT=/dev/null $(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The whole pipeline, through the Prefect flow, on the real hot-dog data (downloads it once).
run: $(STAMP)
	$(PY) -m flows.pipeline

# The same pipeline offline, in its own workspace (demo/), on a generated dataset. The workspace
# is a git repository of its own: demo-setup commits the code and params it runs, and the run
# commits what it wrote (dvc.lock, metrics, reports) and tags it demo-run-<n> (docs/demo.md).
demo: $(STAMP)
	$(PY) -m finetune demo-setup
	$(PY) -m flows.pipeline --tag demo-run --workspace $$($(PY) -c 'from finetune.core.config import load_params; print(load_params().demo.workspace)')

# "When does fine-tuning win?": the study stages (study@<seed>, study_report) with study.enabled
# set to true for this run (a DVC experiment: `dvc exp show` lists it); the answer is in
# reports/study.md and metrics/study.json. WORKSPACE=demo for the demo's data.
study: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(VENV)/bin/dvc exp run --set-param study.enabled=true study_report

# The suite on TEST_WORKERS processes (pytest-xdist; a test file stays in one process, so its
# module fixtures are shared), without the shared stack's integration tests (marker `stack`,
# minutes of servers): `make test-stack` runs those, `make test-all` everything, `make test-quick`
# the quick pass (neither `slow` nor `stack`: no servers, pipelines, DDP or training runs). Each
# ends with the 25 slowest tests (--durations). pytest's exit status 5 (no tests collected)
# fails like any other non-zero status.
TEST_WORKERS ?= 2
TEST_MARKS ?= not stack
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "$(TEST_MARKS)" --durations=25; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected; that is a failure" >&2; fi; \
	exit $$status

.PHONY: test-quick
test-quick: TEST_MARKS = not slow and not stack
test-quick: test

test-stack: TEST_MARKS = stack
test-stack: test

test-all: TEST_MARKS = stack or not stack
test-all: test

# Speed, measured side by side: the plain recipe loop vs the trainer, dvc repro, Prefect overhead
# (prints a table, writes reports/bench-<device>.json and the table in docs/speed.md), then the serving
# row (2,000 requests at concurrency 16; BENCH_ARGS=--serving-only for it alone). BENCH_ARGS: see --help.
bench: $(STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

# The MLflow UI over a workspace's local store (<workspace>/mlflow/), on 127.0.0.1 only;
# `make ui WORKSPACE=demo` for the demo's runs and models.
WORKSPACE ?= .
# MLflow 3's UI opens experiments on its GenAI view (a browser setting, whatever the experiment's
# kind); ?workflowType=machine_learning opens the runs list.
# Ports: ports: in params.yaml; UI_PORT, SERVE_PORT, PREFECT_PORT, S3_PORT, POSTGRES_PORT override
# one for a command. A busy port is refused in one line before anything starts.
UI_PORT ?=
SERVE_PORT ?=
PREFECT_PORT ?=
S3_PORT ?=
POSTGRES_PORT ?=
ui: $(STAMP)
	@port=$$($(PY) -m finetune.ports ui $(UI_PORT)) || exit 2; \
	echo "MLflow UI: http://127.0.0.1:$$port/#/experiments?workflowType=machine_learning"; \
	cd $(WORKSPACE) && exec $(CURDIR)/$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db \
	  --default-artifact-root mlflow/artifacts --host 127.0.0.1 --port $$port

# DVC's views of a workspace (WORKSPACE=demo after `make demo`): what is stale; the pipeline, a
# stage a line with the stages it runs after (finetune/dag.py reads `dvc dag --dot`; plain `dvc dag`
# draws it some 200 characters wide); the headline metrics, one row (metrics/summary.json; every
# other number: `dvc metrics show metrics/evaluate.json`, or validate.json, train/<variant>.json,
# study.json); the plots (HTML in dvc_plots/, which loads Vega from a CDN; the evaluate stage
# also writes PNGs to plots/evaluate/).
status: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(VENV)/bin/dvc status
dag: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune.dag
metrics: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(VENV)/bin/dvc metrics show
plots: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(VENV)/bin/dvc plots show

# Classify image files with the production model: `make predict IMG=photo.jpg` (several: IMG='a.jpg b.jpg';
# MODEL=models:/hotdog-classifier/3 for another version). Paths are relative to this folder.
IMG ?=
MODEL ?=
predict: $(STAMP)
	@test -n "$(IMG)" || { echo "make predict: name the images, e.g. make predict IMG=photo.jpg (several: IMG='a.jpg b.jpg')" >&2; exit 2; }
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune predict $(abspath $(IMG)) $(if $(MODEL),--model $(MODEL))

# The registry's production alias: promote moves it to the candidate only if the candidate beats
# chance and wins (VERSION=3: that version instead; FORCE=1: even if it does not win, recorded;
# never a candidate at chance); rollback moves it back to the
# version that held it before; errors draws the test images production gets wrong.
VERSION ?=
FORCE ?=
promote: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune promote $(if $(VERSION),--version $(VERSION)) $(if $(FORCE),--force)
rollback: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune rollback
errors: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune errors $(if $(MODEL),--model $(MODEL))

# The production model (models:/<register.model_name>@production) over REST on 127.0.0.1:<ports.serve>;
# `make serve WORKSPACE=demo` after `make demo`. POST {"dataframe_records": [{"image": "<base64>"}]}
# to /invocations; the answer holds the class and every class's probability.
serve: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune serve $(if $(SERVE_PORT),--port $(SERVE_PORT))

# Do dvc.lock, models/, the MLflow runs and the registry agree? Prints each mismatch with the
# command that repairs it; exit 1 if any.
doctor: $(STAMP)
	cd $(WORKSPACE) && $(CURDIR)/$(PY) -m finetune doctor

# Scheduled retraining (retrain.cron in params.yaml): a real Prefect server on 127.0.0.1:<ports.prefect>
# (state in .prefect/; its UI talks to that port) and the retrain deployment served against it;
# Ctrl-C stops both.
scheduler: $(STAMP)
	$(PY) -m flows.server --workspace $(WORKSPACE) $(if $(PREFECT_PORT),--port $(PREFECT_PORT))

# The same deployment for a Prefect server with work pools (prefect.yaml): needs PREFECT_API_URL
# and a process work pool; then `FINETUNE_PROJECT=$$PWD prefect worker start --pool finetune-process`.
deploy: $(STAMP)
	$(VENV)/bin/prefect work-pool inspect finetune-process >/dev/null 2>&1 || $(VENV)/bin/prefect work-pool create finetune-process --type process
	FINETUNE_PROJECT=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --name scheduled-retrain \
	  --cron "$$($(PY) -c 'from finetune.core.config import load_params; print(load_params().retrain.cron)')" \
	  --timezone "$$($(PY) -c 'from finetune.core.config import load_params; print(load_params().retrain.timezone)')"

# The shared stack on this machine (docs/team.md): PostgreSQL, an S3 object store, `mlflow server`,
# `prefect server` and a Prefect worker on the pool finetune-process, on 127.0.0.1 with their state
# in .stack/; prints the URLs and the variables to export. stack-down stops them (PURGE=1: and
# deletes .stack/).
.PHONY: stack stack-down
stack: $(STAMP)
	$(PY) -m stack up $(foreach v,UI PREFECT S3 POSTGRES,$(if $($(v)_PORT),--port $(v)=$($(v)_PORT)))
stack-down:
	$(PY) -m stack down $(if $(PURGE),--purge)
# One archive of the stack (both databases, every object): FILE=path.tar.gz, else
# stack-backups/stack-<UTC time>.tar.gz. stack-restore fills a fresh .stack/ from one and starts it.
.PHONY: stack-backup stack-restore
stack-backup: $(STAMP)
	$(PY) -m stack backup $(if $(FILE),--file $(FILE))
stack-restore: $(STAMP)
	@test -n "$(FILE)" || { echo "make stack-restore: name the archive, e.g. make stack-restore FILE=stack-backups/stack-<date>.tar.gz" >&2; exit 2; }
	$(PY) -m stack restore --file $(FILE) $(foreach v,UI PREFECT S3 POSTGRES,$(if $($(v)_PORT),--port $(v)=$($(v)_PORT)))

# Re-pin constraints.txt from the current environment (after changing pyproject.toml).
lock: $(STAMP)
	{ echo "# The exact dependency set of .venv (Python 3.11, Linux x86_64); written by 'make lock'."; \
	  $(PY) -m pip freeze --exclude-editable --exclude finetune | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean-demo:
	rm -rf demo
