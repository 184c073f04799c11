"""What the real-node tier's tests hold on to: the node, its clients, a load, a polling helper.

The node itself is scripts/k8s/real_node.sh (a real kubelet, containerd, kube-proxy, DNS and
control plane in the private network namespace ``NETNS``); tests/e2e/conftest.py brings it up
once per session and tears it down. From the host, tests reach only its apiserver (through
the loopback forward in ``RealNode.kubeconfig``); every shardq request goes from *inside* the
namespace (``LoadRun``, ``probe``), by the gateway Service's DNS name.

Must not: sleep to wait for a state (``eventually`` polls, bounded), signal a process it cannot
prove is the node's (``container_pids`` reads the pods' own cgroups).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CI, eventually_sync

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "k8s"
CHART = ROOT / "charts" / "shardq"
NETNS = os.environ.get("SHARDQ_RN_NETNS", "shardq-rn")
CGROUP_ROOT = f"/{NETNS}"  # the kubelet's cgroupRoot (real_node.sh)
TIMINGS: dict[str, float] = {}


def missing(reason: str) -> None:
    """A prerequisite is missing: a skip on a laptop, a failure in CI."""
    if CI:
        pytest.fail(f"CI must run the real-node tier: {reason}")
    pytest.skip(reason)


def timed(name: str, started: float) -> float:
    TIMINGS[name] = round(time.monotonic() - started, 1)
    print(f"\n[real-node] {name}: {TIMINGS[name]:.1f}s", flush=True)
    return TIMINGS[name]


def eventually(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.25,
               hint: Callable[[], str] | None = None) -> Any:
    """The shared ``eventually_sync`` (tests/helpers.py) with this tier's argument order: an
    exception from the predicate counts as "not yet" (the API, a pod, may be in between)."""
    return eventually_sync(predicate, timeout, every, what=what, ignore=(Exception,), hint=hint)


@dataclass
class RealNode:
    workdir: Path
    bin: Path
    kubeconfig: Path  # the host's view: https://127.0.0.1:<forward>

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        done = subprocess.run([str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig),
                               *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def kube(self, *args: str) -> Any:
        """``kubectl get ... -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def inside(self, *argv: str) -> list[str]:
        """A command line run inside the node's network namespace (Service DNS names resolve)."""
        return ["ip", "netns", "exec", NETNS, *argv]

    def probe(self, *args: str, timeout: float = 60) -> Any:
        """``tests/e2e/probe.py ARGS`` inside the namespace; its JSON answer."""
        done = subprocess.run(self.inside(sys.executable, "-m", "tests.e2e.probe", *args),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode != 0:
            raise AssertionError(f"probe {args}: {done.stderr[-2000:]}")
        return json.loads(done.stdout)


def container_pids(container_id: str) -> list[int]:
    """The host PIDs of one container, from its own cgroup under the node's cgroupRoot."""
    base = Path("/sys/fs/cgroup/pids") / CGROUP_ROOT.lstrip("/")
    found = [p for p in base.rglob("cgroup.procs") if p.parent.name.endswith(container_id)]
    return sorted(int(pid) for p in found for pid in p.read_text().split())


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def root_mount_options(pid: int) -> list[str]:
    """The mount options of ``/`` as the process sees it (its container's root)."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return fields[5].split(",")
    raise AssertionError(f"no / in /proc/{pid}/mountinfo")


@dataclass
class LoadRun:
    """tests/e2e/load.py, running inside the namespace: ``with LoadRun(...) as run:`` starts
    it, ``run.finish()`` stops it and returns the counts; leaving the block kills it if still
    running (a failed step)."""

    node: RealNode
    args: list[str]
    proc: subprocess.Popen[str] | None = None
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def start(self, timeout: float = 120) -> LoadRun:
        self.proc = subprocess.Popen(
            self.node.inside(sys.executable, "-m", "tests.e2e.load", *self.args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT)
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append),
                             daemon=True)]
        for reader in self.readers:
            reader.start()
        line = self._next(timeout)
        assert line == "started", f"the load did not start: {line!r}\n{self.tail()}"
        return self

    @staticmethod
    def _read(stream: Any, put: Callable[[str], None]) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    def _next(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return f"<nothing in {timeout:.0f}s>"

    def tail(self) -> str:
        return "\n".join(self.stderr[-30:])

    def finish(self, timeout: float = 180) -> dict[str, Any]:
        """Stop pushing, let it drain and count; the counts (printed too)."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        line = self._next(timeout)
        self._reap()
        try:
            counts: dict[str, Any] = json.loads(line)
        except ValueError:
            raise AssertionError(f"the load printed no counts: {line!r}\n{self.tail()}") from None
        print(f"[real-node] load {self.args[self.args.index('--prefix') + 1]}: "
              f"{json.dumps(counts, sort_keys=True)}", flush=True)
        return counts

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is None:
            return
        self.proc.wait(10)
        for reader in self.readers:
            reader.join(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> LoadRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def gateway_load(node: RealNode, gateway: str, token: str, prefix: str) -> LoadRun:
    """The tier's steady load through the gateway Service (bounded: 600 s, 60,000 jobs)."""
    return LoadRun(node, ["--address", gateway, "--token", token, "--prefix", prefix,
                          "--max-seconds", "600", "--max-jobs", "60000",
                          "--drain-seconds", "120"])


@contextlib.contextmanager
def installed_release(node: RealNode, release: str, values: dict[str, Any]
                      ) -> Iterator[tuple[Api, Any, float]]:
    """``helm install`` of the chart as ``release`` in the namespace of the same name (its
    cluster named so too): the API client, the helm client and when the install began."""
    import helm_python

    api = Api(node.kubeconfig, release, release)
    helm = helm_python.Config(kubeconfig_path=str(node.kubeconfig), namespace=release)
    try:
        started = time.monotonic()
        installed = helm.install(str(CHART), release, values, namespace=release,
                                 create_namespace=True, timeout=300)
        timed(f"helm install {release}", started)
        assert installed["status"] == "deployed", installed
        yield api, helm, started
    finally:
        helm.close()
        api.close()


def assert_nothing_lost(counts: dict[str, Any], at_least: int) -> None:
    assert counts["pushed"] >= at_least, counts
    assert counts["lost"] == 0, counts
    assert counts["duplicated"] == 0, counts
    assert counts["completed"] == counts["pushed"], counts


class Api:
    """The few API calls the tests make, with the ``kubernetes`` client over the host's forward."""

    def __init__(self, kubeconfig: Path, namespace: str, cluster: str) -> None:
        from kubernetes import client, config

        self.client = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.client)
        self.apps = client.AppsV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.namespace = namespace
        self.cluster = cluster

    def close(self) -> None:
        self.client.close()

    def status(self) -> dict[str, Any]:
        obj: Any = self.custom.get_namespaced_custom_object(
            "shardq.io", "v1alpha1", self.namespace, "shardqclusters", self.cluster)
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def patch_nodes(self, nodes: int) -> None:
        self.custom.patch_namespaced_custom_object(
            "shardq.io", "v1alpha1", self.namespace, "shardqclusters", self.cluster,
            {"spec": {"nodes": nodes}})

    def pods(self, component: str | None = None) -> list[Any]:
        selector = f"app.kubernetes.io/component={component}" if component else ""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: p.metadata.name)

    def pod(self, name: str) -> Any:
        return self.core.read_namespaced_pod(name, self.namespace)

    def claim(self, name: str) -> Any:
        return self.core.read_namespaced_persistent_volume_claim(name, self.namespace)

    def volume(self, name: str) -> Any:
        return self.core.read_persistent_volume(name)


def ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def converged(api: Api, nodes: int) -> dict[str, Any] | None:
    """The ShardqCluster's status once it runs ``nodes`` nodes, all ready, nothing moving."""
    s = api.status()
    conditions = {c["type"]: c["status"] for c in s.get("conditions") or []}
    done = (s.get("phase") == "Running" and s.get("nodes") == nodes
            and s.get("readyNodes") == nodes and s.get("slotsMoving") == 0
            and conditions.get("Ready") == "True")
    return s if done else None
