# The two commands a newcomer needs:
#   make demo  -- agentkube on a local cluster: helm install, a sandbox, an agent's tool calls, a summary
#   make test  -- install everything and run the whole test suite
# (`make dev` brings up the local cluster alone; `make down` removes it.)
# Heavy downloads and builds are cached outside the repository (~/.cache/agentkube, Go's module and build
# caches), so only the first run on a machine is slow.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
CACHE := $(or $(AGENTKUBE_CACHE),$(HOME)/.cache/agentkube)
WHEELS := $(CACHE)/wheels
# `train` (stable-baselines3, torch) for the PPO pipeline's tests, `dashboards` (grafana-foundation-sdk,
# matplotlib) to generate and render the Grafana dashboards; the operator needs none of it at run time.
EXTRAS := test,train,dashboards
export PIP_CACHE_DIR := $(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Debian packages the real components come from (prometheus and promtool for metrics).
APT_PACKAGES := prometheus
# The node agent: BCC and the kernel headers it compiles against; bpftool and cgroup-tools for its tests
# and benchmarks.
APT_PACKAGES += python3-bpfcc linux-headers-amd64 bpftool cgroup-tools
# The node: containerd and runc, the CNI plugins, iproute2 for its bridge, iptables for portmap, and
# mmdebstrap (with gpg) for the images' Debian root filesystems and gcc for the pause program (no registry).
APT_PACKAGES += containerd runc containernetworking-plugins iproute2 iptables mmdebstrap gpg gcc libc6-dev
# ipset for kube-router's network policy controller (NetworkPolicy enforcement on the node).
APT_PACKAGES += ipset

.PHONY: demo test dev down deps venv tools unit lint clean ebpf-host

# agentkube's main job on the local cluster: the node, `helm install`, a sandbox and an agent's tool calls.
demo: deps venv tools ebpf-host
	$(VENV)/bin/agentkube demo

test: deps venv tools ebpf-host lint
	$(VENV)/bin/pytest

# ruff and mypy over the whole package, its tests and benchmarks (configured in pyproject.toml): clean.
lint: venv
	$(VENV)/bin/ruff check core operator ebpf rl tests bench
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit

dev: deps venv tools ebpf-host
	$(VENV)/bin/agentkube dev up --with-node
	@echo
	@$(VENV)/bin/agentkube dev env

down: venv
	$(VENV)/bin/agentkube dev down

# Installs only what is missing, so that a machine that has everything never touches the network.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v go >/dev/null || { echo "go not found: install Go 1.25 or newer (it builds the control plane)"; exit 1; }

venv: $(VENV)/.installed

# pip's HTTP cache is not kept with every registry (here it is not), so the wheels themselves are kept in
# $(WHEELS): `pip download` only resolves and fetches what is missing, the install runs offline from it.
# Strict editable mode installs a tree of links that type checkers and IDEs follow (the default mode's
# import hook hides the folder mapping from them). It lists files, not folders, so a module added or removed
# reinstalls: the folders' modification times are prerequisites.
PACKAGE_DIRS := core core/devenv operator ebpf ebpf/programs ebpf/csiproto rl rl/policies
$(VENV)/.installed: pyproject.toml $(PACKAGE_DIRS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip download --quiet -d $(WHEELS) pip 'setuptools>=69' '.[$(EXTRAS)]'
	$(VENV)/bin/pip install --quiet --no-index --find-links $(WHEELS) --upgrade pip
	$(VENV)/bin/pip install --quiet --no-index --find-links $(WHEELS) -e '.[$(EXTRAS)]' --config-settings editable_mode=strict
	touch $@

# The control plane, kubectl and helm, and every image and Go program the node, Knative and Karpenter run:
# built before any test or environment starts, so that none waits minutes for a first build.
tools: deps venv
	$(VENV)/bin/agentkube dev install

# The node agent's host setup (idempotent): kernel headers linked where BCC looks, Debian's bcc module
# importable from the venv, tracefs and bpffs mounted.
ebpf-host: deps venv
	bash hack/ebpf-host.sh $(VENV)

clean:
	-$(VENV)/bin/agentkube dev down 2>/dev/null
	rm -rf $(VENV) build *.egg-info .pytest_cache
