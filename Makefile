# fedlab: `make demo` (set up + run the quickstart) and `make test` (set up + run the tests).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlab-setup
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: setup git-filters notebooks lock test test-fast demo bench lint clean-data doctor

setup: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; fedlab needs Python 3.11 (see README)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
	  || { echo "error: $(PYTHON) is not Python 3.11 (TensorFlow Federated 0.87 needs 3.11)"; exit 1; }
	@command -v java >/dev/null || { echo "error: java not found; Spark needs Java 17 (see README)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fedlab)" >/dev/null
	@$(MAKE) --no-print-directory git-filters
	@touch $(STAMP)
	@echo "fedlab environment ready in $(VENV)"

# The notebook filter (outputs stripped, cell ids kept: the committed notebooks are already in this
# form, so a fresh clone stays clean), then one index refresh so the first `git status` is fast.
git-filters:
	@if [ -e .git ]; then \
	  git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout --keep-id' && \
	  git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.required true && \
	  git config diff.ipynb.textconv '"$(abspath $(PY))" -m nbstripout -t --keep-id' && \
	  { git update-index -q --refresh >/dev/null 2>&1 || true; }; \
	fi

# After editing a notebook's py:percent twin (notebooks/NN_*.py): carry the change into the .ipynb,
# keeping cell ids, and leave it in the committed (filtered) form.
notebooks: setup
	@for twin in notebooks/[0-9]*.py; do $(VENV)/bin/jupytext --quiet --update --to ipynb "$$twin"; done
	@$(PY) -m nbstripout --keep-id notebooks/*.ipynb

# Regenerate the hashed lock from requirements/base.in + overrides.txt (needs uv; see README).
lock:
	@command -v uv >/dev/null || $(PY) -m uv --version >/dev/null || { echo "error: uv not found (pip install uv)"; exit 1; }
	$$(command -v uv || echo "$(PY) -m uv") pip compile requirements/base.in \
	  --overrides requirements/overrides.txt --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_31 --generate-hashes -o requirements/lock.txt
	@echo "check it with a fresh install: rm -rf $(VENV) && make setup && $(PY) -m pip check"

test: setup
	$(PY) -m pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q --timeout 900 -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/fedlab reproduce --config $(CONFIG)
	@report=$$($(PY) -c "from fedlab.config import load_experiment as l; print(l('$(CONFIG)').report_path())"); \
	  echo; sed -n '/^## AUROC/,/^## Federated/p' "$$report/results.md" | sed '$$d'; \
	  echo "Full report: $$report/results.md  (and report.html, figures/, notebooks/)"

bench: setup
	@mkdir -p reports/bench
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done

lint: setup
	$(VENV)/bin/ruff check fedlab tests benchmarks

doctor: setup
	$(VENV)/bin/fedlab doctor

clean-data:
	rm -rf data/export data/tables data/features data/synthea/*/ reports/*/ && git checkout -- reports/reference 2>/dev/null || true
