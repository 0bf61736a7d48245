# Two commands do all the set-up: `make run` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
ARGS   ?=

# Debian packages the tests need: a browser, offline speech, network namespaces, and a TURN
# server (coturn, run on loopback by the WHEP test).
DEB_PACKAGES := chromium chromium-driver espeak-ng sox iproute2 coturn
# npm installs the tests' JavaScript packages (tests/npm: a third-party WHEP player); a
# machine whose node.js ships its own npm keeps it.
NPM_DEB      := nodejs npm
# The FlashHead tests run the engine on the CPU, against upstream's real code with tiny
# random weights (FLASHHEAD_SRC) and against a stand-in pipeline. torch is for tests only
# here: `pip install avatar-stream` never pulls it (it is in the `flashhead` extra, which the
# GPU image installs with a CUDA build).
TEST_TORCH   := torch==2.13.0
# Upstream SoulX-FlashHead's checkout, for the tests that run the engine through its real code
# (`make test FLASHHEAD_SRC=/path/to/SoulX-FlashHead`); without it those tests skip.
FLASHHEAD_SRC ?=
export FLASHHEAD_SRC

.PHONY: run test install install-test lint clean

run: install
	$(BIN)/avatar-stream serve --host $(HOST) --port $(PORT) $(ARGS)

test: install-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test $(VENV)/.debian-packages tests/npm/node_modules/.installed

# The editable install's build step (setup.py) also writes MediaPipe's face models into
# avatar_stream/avatars/models/ (git-ignored), as the wheel carries them.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,test-flashhead,dev,pipecat,livekit]'
	$(BIN)/python -m pip install -q $(TEST_TORCH)
	touch $@

$(VENV)/.debian-packages:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing $(NPM_DEB)"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	touch $@

tests/npm/node_modules/.installed: tests/npm/package-lock.json $(VENV)/.debian-packages
	cd tests/npm && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: install-test
	$(BIN)/ruff check avatar_stream tests
	$(BIN)/mypy avatar_stream

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache tests/npm/node_modules
