# The two commands of the README: `make run` and `make test`.
SHELL := /bin/bash
VENV  := .venv/bin
PORT  ?= 6789
HTTP_PORT ?= 6790

.PHONY: run test lint typecheck unit unit-pure native bench loadtest clean venv-server venv-test packages-test packages-bench
.PHONY: faults e2e-kubelet e2e-node
.PHONY: dashboards rules-test dashboard-png
.PHONY: chart-render chart-schema image e2e-kubelet e2e-node

venv-server:
	@scripts/bootstrap.sh server

venv-test:
	@scripts/bootstrap.sh server,test

# Debian packages the tests/benchmarks use as real servers (installed when root)
packages-test:
	@scripts/ci_packages.sh test

packages-bench:
	@scripts/ci_packages.sh bench

## run: set up and start a local shardq cluster on loopback (Ctrl-C stops it);
## PORT (TCP, 6789) and HTTP_PORT (HTTP and the dashboard, 6790) move it; REPLICAS=3 runs
## shards of three copies with failover
run: venv-server
	$(VENV)/shardq up --port $(PORT) --http-port $(HTTP_PORT) --replicas $(or $(REPLICAS),1)

## test: set up and run everything CI runs: the whole suite on the compiled hot path (built by
## the setup where a C compiler is found; the Debian packages come first: gcc is one), then a
## fast subset on the interpreted sources
test: packages-test venv-test lint typecheck unit unit-pure

# The duplicate-code check's folders: every Python source outside tests/
DUPCHECK := sdk/src server/src node/src gateway/src operator/src loadtest charts scripts

lint:
	$(VENV)/ruff check sdk server node gateway operator tests $(wildcard loadtest) charts
	$(VENV)/lint-imports
	@# blocks of 6 or more similar lines (comments, docstrings, imports, signatures aside) in two
	@# places: extract the shared helper instead (pylint's duplicate-code check alone)
	$(VENV)/pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 --recursive=y \
		--score=n $(DUPCHECK)

typecheck:
	$(VENV)/mypy -p shardq -p shardq_server -p shardq_node -p shardq_gateway -p shardq_operator

unit:
	$(VENV)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

## unit-pure: the engine, the protocol and the servers' main paths on the interpreted sources
## (SHARDQ_PURE=1: what a machine without a C compiler runs; shardq.native)
PURE_TESTS ?= tests/unit/test_native.py tests/unit/test_engine.py tests/unit/test_command_table.py \
	tests/unit/test_wal.py tests/integration/test_conformance.py tests/integration/test_gateway.py \
	tests/integration/test_features.py tests/integration/test_fuzz.py
unit-pure:
	SHARDQ_PURE=1 $(VENV)/python -m pytest -q $(PURE_TESTS)

## native: compile the hot path again (scripts/build_native.py; the setup does it when needed)
native:
	$(VENV)/python scripts/build_native.py --force

## faults: the long fault-injection run (tests/faults): ROUNDS rounds spread over every fault
## kind (REPLICAS: R, default 3; SEED: the first seed); prints a table per fault kind and
## writes it to build/faults/summary.md, the histories of failed rounds to
## build/faults/<seed>-<kind>.jsonl
ROUNDS ?= 200
SEED ?= 1
faults: venv-test
	$(VENV)/python -m tests.faults.runner --rounds $(ROUNDS) --seed $(SEED) $(if $(REPLICAS),--replicas $(REPLICAS))

## e2e-kubelet: the operator end to end alone: a real control plane, the test kubelet
## (tests/e2e/test_e2e_k8s.py; ~1-4 min, ~5 min more the first time: it builds Kubernetes)
e2e-kubelet: venv-test packages-test
	$(VENV)/python -m pytest tests/e2e/test_e2e_k8s.py -q -s

## e2e-node: the chart on a real node alone: kubelet, containerd, kube-proxy and DNS in a
## private network namespace (tests/e2e/test_real_node.py; root; ~5 min, ~8 min more the
## first time)
e2e-node: venv-test packages-test
	$(VENV)/python -m pytest tests/e2e -m realnode -q -s

## bench: every benchmark, side by side, written to BENCHMARKS.md
bench: venv-test packages-bench
	$(VENV)/python loadtest/bench.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_durability.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_scale.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_replication.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_gateway.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_publish.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_metrics.py --write BENCHMARKS.md
	$(VENV)/python loadtest/bench_peers.py --write BENCHMARKS.md
	$(VENV)/python loadtest/run_locust.py --suite publish --write BENCHMARKS.md

## loadtest: the locust suites, headless and bounded, reports in build/locust/
loadtest: venv-test
	$(VENV)/python loadtest/run_locust.py --suite mix
	$(VENV)/python loadtest/run_locust.py --suite scale
	$(VENV)/python loadtest/run_locust.py --suite publish

## dashboards: regenerate the Grafana dashboards (charts/shardq/dashboards/*.json)
dashboards: venv-test
	$(VENV)/python charts/shardq/dashboards/generate.py

## rules-test: check the alert rules and run their unit tests with promtool
rules-test:
	promtool check rules charts/shardq/alerts/shardq-rules.yaml
	cd charts/shardq/alerts && promtool test rules shardq-rules.test.yaml

## dashboard-png: docs/dashboard-overview.png, drawn from a real Prometheus under load (~100 s)
dashboard-png: venv-test
	$(VENV)/python charts/shardq/dashboards/render.py

## chart-render: the chart as Helm renders it, CRDs included: build/chart/default.yaml (default
## values) and build/chart/full.yaml (charts/shardq/ci/full-values.yaml, every option on)
chart-render: venv-test
	$(VENV)/python scripts/k8s/render_chart.py --out build/chart

## chart-schema: regenerate charts/shardq/values.schema.json and the README's parameter tables
chart-schema: venv-test
	$(VENV)/python charts/shardq/schema.py

## image: the container image localhost/shardq:dev (podman, offline; scripts/k8s/build_image.sh)
image:
	scripts/k8s/build_image.sh localhost/shardq:dev

clean:
	python3 scripts/build_native.py --clean
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
