"""The chart on a real node: real containers, probes, volumes, Service DNS and ClusterIPs.

``helm install`` of charts/shardq (Helm's Go library) with the image built by the image tier
(``pullPolicy: Never``: it was imported, nothing can be pulled); the operator runs in its pod
with the chart's RBAC and the pod's service-account token, the nodes and gateways are its
StatefulSet's and Deployment's pods, on static local volumes. Every test runs a steady load
through the gateway Service by its DNS name, from inside the node's network namespace
(tests/e2e/load.py), and checks its counts: every pushed job completed once, none lost, none
twice. Tests run in file order on one cluster; each starts by waiting for the state it needs.

Each step's time is printed (``-s``) and kept in ``TIMINGS``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .realnode import (
    TIMINGS,
    Api,
    LoadRun,
    RealNode,
    assert_nothing_lost,
    container_pids,
    converged,
    eventually,
    gateway_load,
    installed_release,
    proc_status,
    ready,
    root_mount_options,
    timed,
)

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(1800)]  # cold: builds first (~8 min)

NS = RELEASE = CLUSTER = "shardq"  # fullname = the release's name: shardq-node, shardq-gateway
GATEWAY = f"{CLUSTER}-gateway.{NS}.svc.cluster.local:6789"  # the Service, by its DNS name
TOKEN = "real-node-client-token"
UID = 10001  # the image's user, and the chart's runAsUser
VALUES = {
    "image": {"repository": "localhost/shardq", "tag": "realnode", "pullPolicy": "Never"},
    # its operator watches its own namespace (test_real_node_replicated.py installs a second
    # release beside this one)
    "operator": {"watchNamespace": NS},
    "cluster": {"nodes": 3, "replicas": 1, "gateway": {"replicas": 2}, "storage": {"size": "1Gi"},
                "fsync": "always",
                "auth": {"enabled": True, "token": TOKEN, "clusterToken": "real-node-cluster"}},
    "tests": {"timeoutSeconds": 60},
}


@dataclass
class Release:
    node: RealNode
    api: Api
    helm: Any  # helm_python.Config
    installed_at: float

    def load(self, prefix: str) -> LoadRun:
        return gateway_load(self.node, GATEWAY, TOKEN, prefix)

    def describe(self) -> str:
        """Pods, recent events and the operator's log: the hint of a failed wait."""
        parts = [self.node.kubectl("get", "pods,pvc", "-n", NS, "-o", "wide", check=False),
                 self.node.kubectl("get", "events", "-n", NS, "--sort-by=.lastTimestamp",
                                   check=False)[-3000:],
                 self.node.kubectl("logs", "-n", NS, "deploy/shardq-operator", "--tail", "40",
                                   check=False)]
        return "\n".join(parts)

    def wait_converged(self, nodes: int, timeout: float = 300) -> dict[str, Any]:
        status: dict[str, Any] = eventually(
            f"the ShardqCluster Ready with {nodes} nodes", lambda: converged(self.api, nodes),
            timeout, hint=self.describe)
        return status

    def probe(self, *args: str) -> Any:
        return self.node.probe("--address", GATEWAY, "--token", TOKEN, *args)


@pytest.fixture(scope="module")
def release(real_node: RealNode) -> Iterator[Release]:
    try:
        with installed_release(real_node, RELEASE, VALUES) as (api, helm, started):
            yield Release(real_node, api, helm, started)
    finally:
        print(f"\n[real-node] timings so far: {TIMINGS}", flush=True)


def container(pod: Any, name: str) -> Any:
    [status] = [c for c in pod.status.container_statuses if c.name == name]
    return status


def node_pods(api: Api) -> list[str]:
    return [p.metadata.name for p in api.pods("node") if p.metadata.deletion_timestamp is None]


# -- the tests, in the order they run ------------------------------------------------------------


def test_the_chart_installs_and_becomes_ready_and_helm_test_passes(release: Release) -> None:
    api = release.api
    status = release.wait_converged(3, timeout=300)
    timed("helm install until the ShardqCluster is Ready (3 nodes)", release.installed_at)
    assert status["epoch"] >= 1
    pods = eventually("every pod Ready", lambda: (ps := api.pods()) and all(map(ready, ps)) and ps,
                      120, hint=release.describe)
    timed("helm install until every pod is Ready", release.installed_at)
    assert [p.metadata.labels["app.kubernetes.io/component"] for p in pods] == [
        "gateway", "gateway", "node", "node", "node", "operator"]
    for pod in pods:  # real containers on the node's pod network, not processes on loopback
        assert ready(pod), pod.metadata.name
        assert pod.spec.node_name == "node1"
        assert pod.status.pod_ip.startswith("10.244.0."), pod.status.pod_ip
        assert all(c.container_id.startswith("containerd://")
                   for c in pod.status.container_statuses)

    with release.load("install") as run:
        started = time.monotonic()
        tested = release.helm.test(RELEASE, timeout=180, logs=True)
        timed("helm test", started)
        counts = run.finish()
    print(f"[real-node] helm test: {tested}", flush=True)
    assert "pulled and acked job" in tested["logs"], tested
    assert_nothing_lost(counts, at_least=50)


def test_scaling_3_to_5_to_2_under_load(release: Release) -> None:
    api, node = release.api, release.node
    release.wait_converged(3)
    gateways = [p.metadata.uid for p in api.pods("gateway")]
    with release.load("scale") as run:
        started = time.monotonic()
        api.patch_nodes(5)
        up = release.wait_converged(5)
        timed("scale 3 -> 5 (spec patched until Ready)", started)
        started = time.monotonic()
        api.patch_nodes(2)
        down = release.wait_converged(2)
        eventually("2 node pods left", lambda: node_pods(api) == ["shardq-node-0", "shardq-node-1"]
                   and len(api.pods("node")) == 2, 120, hint=release.describe)
        timed("scale 5 -> 2 (spec patched until the leaving pods are gone)", started)
        counts = run.finish()
    wide = node.kubectl("get", "pods", "-n", NS, "-o", "wide")
    print(f"[real-node] kubectl get pods -o wide (after 3 -> 5 -> 2):\n{wide}", flush=True)
    assert up["epoch"] < down["epoch"]
    # the gateways were never restarted: their seeds (nodes 0 and 1) stayed nodes
    assert [p.metadata.uid for p in api.pods("gateway")] == gateways
    assert_nothing_lost(counts, at_least=300)


def test_a_deleted_node_pod_comes_back_on_its_volume(release: Release) -> None:
    api = release.api
    release.wait_converged(2)
    victim, claim = "shardq-node-1", "data-shardq-node-1"
    old = api.pod(victim)
    volume = api.claim(claim).spec.volume_name
    markers = release.probe("markers", "--node", victim, "--count", "8", "--prefix", "kept")
    with release.load("delete-pod") as run:
        started = time.monotonic()
        api.core.delete_namespaced_pod(victim, NS)  # the default grace period, as a user would
        new = eventually("the pod made again and Ready", lambda: (
            (p := api.pod(victim)).metadata.uid != old.metadata.uid and ready(p) and p), 240,
            hint=release.describe)
        timed("node pod deleted until its successor is Ready", started)
        release.wait_converged(2)
        counts = run.finish()
    assert [v.persistent_volume_claim.claim_name for v in new.spec.volumes
            if v.persistent_volume_claim] == [claim]
    assert api.claim(claim).spec.volume_name == volume  # the claim kept its volume
    states = release.probe("states", *map(str, markers.values()))
    assert set(states.values()) == {"waiting"}, states  # jobs it held before are there again
    assert_nothing_lost(counts, at_least=100)


def test_sigkill_in_a_node_container_restarts_the_container_not_the_pod(
        release: Release) -> None:
    api = release.api
    release.wait_converged(2)
    victim = "shardq-node-0"
    old = api.pod(victim)
    before = container(old, "node")
    container_id = before.container_id.split("://", 1)[1]
    [main] = [pid for pid in container_pids(container_id)
              if b"node" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    markers = release.probe("markers", "--node", victim, "--count", "8", "--prefix", "killed")
    with release.load("sigkill") as run:
        started = time.monotonic()
        os.kill(main, signal.SIGKILL)  # the node's process, found in its container's cgroup
        new = eventually("the container restarted in the same pod and Ready", lambda: (
            (p := api.pod(victim)).metadata.uid == old.metadata.uid
            and container(p, "node").restart_count == before.restart_count + 1
            and ready(p) and p), 180, hint=release.describe)
        timed("SIGKILL in the node container until it is Ready again", started)
        release.wait_converged(2)
        counts = run.finish()
    after = container(new, "node")
    assert after.container_id != before.container_id
    assert after.last_state.terminated.exit_code == 137  # 128 + SIGKILL
    assert new.status.pod_ip == old.status.pod_ip  # the same pod: same sandbox, same address
    states = release.probe("states", *map(str, markers.values()))
    assert set(states.values()) == {"waiting"}, states  # fsync=always: acknowledged = on disk
    assert_nothing_lost(counts, at_least=100)


def test_the_operator_pod_deleted_mid_scale_the_new_one_finishes_it(release: Release) -> None:
    api = release.api
    release.wait_converged(2)
    [old] = api.pods("operator")
    old_pids = container_pids(container(old, "operator").container_id.split("://", 1)[1])
    assert old_pids
    with release.load("operator") as run:
        started = time.monotonic()
        api.patch_nodes(4)
        moving = eventually("the scale under way (slots moving)", lambda: (
            (s := api.status()).get("phase") == "Scaling" and (s.get("slotsMoving") or 0) > 0
            and s), 180, every=0.05, hint=release.describe)
        # A 1 s grace period: with the default 30 s, kopf finishes the handler it is in (the
        # whole scale) before it exits, and there is nothing left for a new operator to do.
        api.core.delete_namespaced_pod(old.metadata.name, NS, grace_period_seconds=1)
        deleted = time.monotonic()
        eventually("the old operator's processes gone", lambda: not any(
            Path(f"/proc/{pid}").exists() for pid in old_pids), 120, every=0.05)
        gone = time.monotonic()
        at_exit = api.status()
        new = eventually("a new operator pod Ready", lambda: [
            p for p in api.pods("operator") if p.metadata.uid != old.metadata.uid and ready(p)],
            180, hint=release.describe)
        release.wait_converged(4)
        timed("scale 2 -> 4 with the operator pod deleted mid-scale", started)
        counts = run.finish()
    log = release.node.kubectl("logs", "-n", NS, new[0].metadata.name)
    resumed = [line for line in log.splitlines() if "resuming" in line or "Rebalanced" in line]
    print(f"[real-node] operator pod deleted {deleted - started:.1f}s into the scale, at "
          f"status {moving.get('progress')!r}; gone {gone - deleted:.1f}s later, when the status "
          f"was: phase {at_exit.get('phase')}, nodes {at_exit.get('nodes')}, slotsMoving "
          f"{at_exit.get('slotsMoving')}, progress {at_exit.get('progress')!r}; the new "
          f"operator's log: {resumed}", flush=True)
    assert len(new) == 1
    # the old one did not finish the scale before it went: the new one did
    assert not (at_exit.get("phase") == "Running" and at_exit.get("nodes") == 4), at_exit
    assert_nothing_lost(counts, at_least=100)


def check_pod(pod: Any) -> None:
    """Its spec says non-root, read-only root, no privileges; its processes show it; it is Ready."""
    name = pod.metadata.name
    assert ready(pod), name
    context = pod.spec.security_context
    assert (context.run_as_non_root, context.run_as_user) == (True, UID), name
    for spec in pod.spec.containers:
        sc = spec.security_context
        assert sc.read_only_root_filesystem is True, name
        assert sc.allow_privilege_escalation is False, name
        assert sc.capabilities.drop == ["ALL"], name
        if pod.metadata.labels["app.kubernetes.io/component"] != "operator":
            assert spec.readiness_probe.http_get.path == "/ready", name  # it passed: Ready
        status = container(pod, spec.name)
        assert status.ready, name
        pids = container_pids(status.container_id.split("://", 1)[1])
        assert pids, name
        for pid in pids:
            proc = proc_status(pid)
            assert set(proc["Uid"].split()) == {str(UID)}, (name, proc["Uid"])
            assert int(proc["CapEff"], 16) == 0, (name, proc["CapEff"])
            assert proc["NoNewPrivs"] == "1", name
            assert "ro" in root_mount_options(pid), name


def test_every_pod_is_ready_as_non_root_with_a_read_only_root(release: Release) -> None:
    """The pod specs read back, and what runc made of them, seen from the host's /proc."""
    api = release.api
    release.wait_converged(4)
    wanted = ["gateway"] * 2 + ["node"] * 4 + ["operator"]

    def settled() -> list[Any]:  # a pod deleted by an earlier test may take a while to go
        pods = api.pods()
        components = sorted(p.metadata.labels["app.kubernetes.io/component"] for p in pods)
        return pods if components == wanted else []

    with release.load("security") as run:
        pods = eventually("2 gateway, 4 node and 1 operator pods", settled, 120,
                          hint=release.describe)
        for pod in pods:
            check_pod(pod)
        # fsGroup: each node's volume belongs to the pods' group, and the node wrote there
        for pod in api.pods("node"):
            [claim] = [v.persistent_volume_claim.claim_name for v in pod.spec.volumes
                       if v.persistent_volume_claim]
            path = Path(api.volume(api.claim(claim).spec.volume_name).spec.local.path)
            assert path.stat().st_gid == UID, (claim, path.stat().st_gid)
            assert any(p.is_file() for p in path.rglob("*")), claim
        counts = run.finish()
    assert_nothing_lost(counts, at_least=20)
