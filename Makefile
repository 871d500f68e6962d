# kubecertd: `make test` and `make demo` set up everything they need on a fresh
# Debian 12 machine (as root) and then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Build: libsystemd-dev + pkg-config + gcc for systemd-python. Tests: openssl and curl
# as independent TLS peers, systemd/dbus/iproute2/util-linux for the namespaced node,
# postgresql for the signer's shared store, strace to kill an install at exact syscalls,
# prometheus for promtool, which checks and unit-tests the shipped alert rules.
DEBIAN_PACKAGES := libsystemd-dev pkg-config gcc openssl curl systemd dbus iproute2 util-linux \
	postgresql strace prometheus

.PHONY: all venv deps test lint typecheck unit demo demo-check bench deb package-test clean

all: test

# The tests, the demo and the package test start the shipped units, whose PrivateTmp= and
# ProtectHome= hide /tmp, /var/tmp, /root and /home from the services: a checkout there
# (as root, a clone usually lands in /root) runs those targets from a copy in /opt instead.
HIDDEN := $(filter /tmp/% /var/tmp/% /root/% /home/%,$(CURDIR)/)
ifneq ($(HIDDEN),)
WORKCOPY := /opt/kubecertd-work
test demo package-test:
	@echo "$(CURDIR) is hidden from sandboxed units; running 'make $@' in $(WORKCOPY)"
	rm -rf $(WORKCOPY) && cp -a $(CURDIR) $(WORKCOPY) && rm -rf $(WORKCOPY)/$(VENV)
	$(MAKE) -C $(WORKCOPY) $@
else

deps:
	@tools/ensure-debian-packages $(DEBIAN_PACKAGES)
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || tools/ensure-debian-packages python3-venv python3-dev

$(BIN)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

venv: deps $(BIN)/.installed

lint: venv
	$(BIN)/ruff check kubecertd tests bench tools
	$(BIN)/ruff format --check kubecertd
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q

test: venv lint unit

demo: venv
	$(BIN)/python demo/demo.py

package-test: deb
	packaging/package-test
endif

demo-check: venv
	KUBECERTD=$(CURDIR)/$(BIN)/kubecertd demo/check-demo.sh

# bench/check.sh times kubecertd as the .deb ships it: Debian's /usr/bin/python3, installed
# (not editable) into a virtualenv of its own with what --check imports (cryptography).
# The editable .venv on pyenv's python reads 40-50% slower (BENCHMARKS.md).
BENCH_VENV := .bench-venv
bench: deps
	rm -rf $(BENCH_VENV)
	/usr/bin/python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --no-deps .
	$(BENCH_VENV)/bin/pip install --quiet 'cryptography>=42' 'PyYAML>=6'
	KUBECERTD=$(BENCH_VENV)/bin/kubecertd bench/check.sh

# kubecertd_<version>_amd64.deb in the repository root: a self-contained /opt/kubecertd
# virtualenv of Debian's python3, both units, the catalog, the default config (root).
deb:
	packaging/build-deb

# make package-test (above): the .deb installed with apt in a cached debootstrapped
# Debian 12, systemd booted in that root, the seed scenario healed by the packaged
# kubecertd.service (root).

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
