# The two commands a fresh machine needs: `make run` (the main job) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test lint

run: $(STAMP)
	$(VENV)/bin/lowlight run

test: $(STAMP) $(if $(wildcard tests/e2e/test_browser*.py),browser)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lowlight workflows serve tests benchmarks

# Re-installs only when pyproject.toml changes, so the second run is a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: browser
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
