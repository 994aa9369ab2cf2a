# The two commands of the README: `make run` and `make test`. Both install what is missing
# (idempotently: stamps skip what is already there) and are safe on a fresh clone.
PYTHON ?= python3
VENV := .venv
APP_STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test envs browser bench clean

$(APP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

envs: $(APP_STAMP)
	bash envs/install.sh train
	bash envs/install.sh serve

# Debian's Chromium for the browser tests; Playwright never downloads a browser of its own.
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

run: envs
	$(VENV)/bin/tuneboard up --demo

test: envs browser
	$(VENV)/bin/pytest

bench: envs
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(VENV)/bin/python bench/run_all.py

clean:
	rm -rf $(VENV) .envs
