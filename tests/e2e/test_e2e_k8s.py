"""The operator end to end: a real Kubernetes control plane, real processes, on loopback.

- Control plane: etcd + kube-apiserver + kube-controller-manager v1.20.2
  (scripts/k8s/control_plane.sh; binaries built once by scripts/k8s/build_kube.sh,
  ~5 min cold, cached afterwards).
- Install: ``helm install`` of charts/shardq (Helm's Go library, helm-python-sdk):
  CRD, RBAC, auth Secret, operator Deployment and a ShardqCluster from values.
  Without the chart, the CRD, a Secret and a ShardqCluster with the
  ``kubernetes`` client instead.
- Pods: tests/kubelet.py runs the ShardqCluster's unscheduled Pods' own command
  lines as local processes, each on its own 127.0.0.x, and reports their status
  and readiness.
- Operator: the command line of the chart's operator Deployment, run by this
  test as a subprocess (so it can SIGKILL it) with a token of the chart's
  ServiceAccount: the operator has exactly the chart's RBAC. Its pod stays
  Pending (the test kubelet does not run it).

Then: the operator creates the StatefulSet, Services, gateway Deployment and
PDBs; the controllers create the pods; pushes through a gateway pod work;
``spec.nodes`` 3 -> 5 -> 2 under a steady load loses nothing and completes
nothing twice, no node pod is deleted while a topology still gives it slots,
the StatefulSet shrinks only once status says no slot is moving, status shows
the progress, and the operator, SIGKILLed mid scale-down, is replaced and the
new one finishes; a deleted node pod comes back on a new address with its data
and the operator publishes the address; deleting the ShardqCluster removes
what it owns. Each part's time is printed (``-s``) and kept in ``TIMINGS``.

A missing toolchain skips these tests, except under CI (``CI`` set), where it
fails them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from shardq import AsyncClient
from shardq.errors import ShardqError, Unavailable
from shardq_operator import reconcile as rc

from ..helpers import CI, SteadyLoad, eventually, eventually_sync, missing
from ..kubelet import Kubelet, PodRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # a cold build: ~5 min

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "k8s"
CHART = ROOT / "charts" / "shardq"
CHART_CRD = CHART / "crds" / "shardqcluster.yaml"
RELEASE = "shardq-e2e"
BIN_DIR = str(Path(sys.executable).parent)
NS = "shardq-e2e"
CLUSTER = "e2e"
TOKEN = "e2e-client-token"
CLUSTER_TOKEN = "e2e-cluster-token"
QUEUES = [f"k8s-{i}" for i in range(16)]
TIMINGS: dict[str, float] = {}

MINIMAL_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{rc.PLURAL}.{rc.GROUP}"},
    "spec": {
        "group": rc.GROUP,
        "scope": "Namespaced",
        "names": {"plural": rc.PLURAL, "singular": "shardqcluster", "kind": rc.KIND},
        "versions": [{
            "name": rc.VERSION, "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }}},
        }],
    },
}


def _timed(name: str, started: float) -> float:
    TIMINGS[name] = round(time.monotonic() - started, 2)
    print(f"\n[e2e-k8s] {name}: {TIMINGS[name]:.2f}s", flush=True)
    return TIMINGS[name]


def wait_until(what: str, check: Callable[[], Any], timeout: float,
               every: float = 0.2, hint: Callable[[], str] | None = None) -> Any:
    """tests.helpers.eventually_sync, an API error counting as "not yet"."""
    return eventually_sync(check, timeout, every, what=what, ignore=(ApiException,), hint=hint)


async def async_wait_until(what: str, check: Callable[[], Any], timeout: float,
                           every: float = 0.2, hint: Callable[[], str] | None = None) -> Any:
    """``wait_until`` in a thread: ``check`` calls the (blocking) Kubernetes client, and the
    event loop keeps running the load meanwhile."""
    return await asyncio.to_thread(wait_until, what, check, timeout, every, hint)


# -- the control plane (session) ---------------------------------------------------------------


@dataclass
class Plane:
    workdir: Path
    kubeconfig: str


@pytest.fixture(scope="session")
def plane() -> Iterator[Plane]:
    for tool in ("build_kube.sh", "control_plane.sh"):
        if not os.access(SCRIPTS / tool, os.X_OK):
            missing(f"scripts/k8s/{tool} is missing")
    cache = Path(os.environ.get("SHARDQ_K8S_CACHE",
                                Path.home() / ".cache" / "shardq" / "k8s-bin"))
    cached = all((cache / b).exists() for b in ("kube-apiserver", "kube-controller-manager"))
    cached = cached and os.environ.get("SHARDQ_K8S_REBUILD") != "1"
    if not cached and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        missing("no cached kube-apiserver, and building it needs root and apt-get")
    started = time.monotonic()
    built = subprocess.run([str(SCRIPTS / "build_kube.sh")], capture_output=True, text=True,
                           timeout=3600, check=False)
    if built.returncode != 0:
        missing(f"build_kube.sh failed: {built.stderr[-2000:]}")
    _timed("build_kube.sh (cached)" if cached else "build_kube.sh (cold build)", started)
    workdir = Path(tempfile.mkdtemp(prefix="shardq-e2e-k8s."))
    env = {**os.environ, "SHARDQ_K8S_BIN": built.stdout.strip().splitlines()[-1]}
    started = time.monotonic()
    try:
        up = subprocess.run([str(SCRIPTS / "control_plane.sh"), "start", str(workdir)],
                            capture_output=True, text=True, timeout=900, env=env, check=False)
        if up.returncode != 0:
            missing(f"control_plane.sh start failed: {up.stderr[-3000:]}")
        _timed("control plane start", started)
        yield Plane(workdir, str(workdir / "kubeconfig"))
    finally:
        started = time.monotonic()
        subprocess.run([str(SCRIPTS / "control_plane.sh"), "stop", str(workdir)],
                       capture_output=True, timeout=120, check=False)
        _timed("control plane stop", started)
        if not os.environ.get("SHARDQ_E2E_KEEP"):  # else the components' logs stay there
            shutil.rmtree(workdir, ignore_errors=True)


# -- API helpers --------------------------------------------------------------------------------


class Api:
    def __init__(self, kubeconfig: str) -> None:
        self.client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig)
        self.core = client.CoreV1Api(self.client)
        self.apps = client.AppsV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.ext = client.ApiextensionsV1Api(self.client)

    def close(self) -> None:
        self.client.close()

    def cluster(self) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                rc.GROUP, rc.VERSION, NS, rc.PLURAL, CLUSTER)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def status(self) -> dict[str, Any]:
        return (self.cluster() or {}).get("status") or {}

    def patch_nodes(self, nodes: int) -> None:
        self.custom.patch_namespaced_custom_object(rc.GROUP, rc.VERSION, NS, rc.PLURAL, CLUSTER,
                                                   {"spec": {"nodes": nodes}})

    def sts(self) -> Any:
        return self.apps.read_namespaced_stateful_set(rc.node_name(CLUSTER), NS)

    def pdb(self, name: str, namespace: str = NS) -> Any:
        """A PodDisruptionBudget (policy/v1beta1 in 1.20, which this client has no API for)."""
        return self.custom.get_namespaced_custom_object(
            "policy", "v1beta1", namespace, "poddisruptionbudgets", name)

    def exists(self, read: Callable[..., Any], name: str) -> bool:
        try:
            read(name, NS)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def owned(self) -> dict[str, bool]:
        """Which of the objects the operator owns exist."""
        return {
            "StatefulSet": self.exists(self.apps.read_namespaced_stateful_set,
                                       rc.node_name(CLUSTER)),
            "Service node": self.exists(self.core.read_namespaced_service, rc.node_name(CLUSTER)),
            "Service gateway": self.exists(self.core.read_namespaced_service,
                                           rc.gateway_name(CLUSTER)),
            "Deployment gateway": self.exists(self.apps.read_namespaced_deployment,
                                              rc.gateway_name(CLUSTER)),
            "PDB node": self.exists(self.pdb, rc.node_name(CLUSTER)),
            "PDB gateway": self.exists(self.pdb, rc.gateway_name(CLUSTER)),
        }

    def pods(self, component: str) -> list[Any]:
        selector = ",".join(f"{k}={v}" for k, v in rc.labels(CLUSTER, component).items())
        return list(self.core.list_namespaced_pod(NS, label_selector=selector).items)


@dataclass
class Installed:
    how: str  # what installed the CRD and the ShardqCluster
    operator_argv: list[str]  # the operator's command line, without --kubeconfig
    operator_kubeconfig: str  # whose identity the operator runs with


def _chart_usable() -> bool:
    if not (CHART / "Chart.yaml").exists() or not CHART_CRD.exists():
        return False
    try:
        import helm_python  # noqa: F401
    except ImportError:
        if CI:  # a laptop installs with the client instead; CI must install the chart
            missing("charts/shardq exists but helm-python-sdk is not installed")
        return False
    return True


def _install(api: Api, plane: Plane, workdir: Path) -> Installed:
    if _chart_usable():
        return _install_chart(api, plane, workdir)
    return _install_by_client(api, plane)


def _install_chart(api: Api, plane: Plane, workdir: Path, namespace: str = NS,
                   release: str = RELEASE, values: dict[str, Any] | None = None) -> Installed:
    """``helm install`` of charts/shardq (Helm's Go library), then the operator's identity.

    The chart's operator Deployment is created but its pod is not run by the test
    kubelet: the test runs that pod's command line itself (so it can SIGKILL it),
    with a kubeconfig holding a token of the chart's ServiceAccount, so the operator
    has exactly the RBAC the chart gives it.
    """
    import helm_python

    # each release's operator watches its own namespace only (the replicated tests install a
    # second release beside this one)
    values = values or {"operator": {"watchNamespace": NS}, "cluster": {
        "name": CLUSTER, "nodes": 3, "replicas": 1, "image": "localhost/shardq:e2e",
        "fsync": "always",
        "gateway": {"replicas": 2}, "storage": {"size": "1Gi"},
        "auth": {"enabled": True, "token": TOKEN, "clusterToken": CLUSTER_TOKEN}}}
    helm = helm_python.Config(kubeconfig_path=plane.kubeconfig, namespace=namespace)
    try:
        installed = helm.install(str(CHART), release, values, namespace=namespace,
                                 create_namespace=True, timeout=120)
    finally:
        helm.close()
    assert installed["status"] == "deployed", installed
    [operator] = api.apps.list_namespaced_deployment(
        namespace, label_selector="app.kubernetes.io/component=operator").items
    container = operator.spec.template.spec.containers[0]
    argv = [*(container.command or []), *(container.args or [])]
    assert argv[:2] == ["shardq", "operator"], argv
    account = operator.spec.template.spec.service_account_name
    token = api.core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    kubeconfig = yaml.safe_load(Path(plane.kubeconfig).read_text())
    for user in kubeconfig["users"]:
        user["user"] = {"token": token}
    path = workdir / "operator-kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    return Installed(f"helm install of charts/shardq (release {release}, Helm "
                     f"{helm_python.helm_sdk_version()}); operator as a subprocess with the "
                     f"chart's ServiceAccount {account}", argv, str(path))


def _install_by_client(api: Api, plane: Plane) -> Installed:
    """CRD (the chart's file if there is one), namespace, auth Secret, ShardqCluster."""
    crd = MINIMAL_CRD
    if CHART_CRD.exists():
        crd = next(d for d in yaml.safe_load_all(CHART_CRD.read_text())
                   if d and d.get("kind") == "CustomResourceDefinition")
    api.ext.create_custom_resource_definition(crd)
    wait_until("the CRD established", lambda: any(
        c.type == "Established" and c.status == "True"
        for c in (api.ext.read_custom_resource_definition(crd["metadata"]["name"])
                  .status.conditions or [])), 30)
    api.core.create_namespace({"metadata": {"name": NS}})
    api.core.create_namespaced_secret(NS, {
        "metadata": {"name": "shardq-auth"},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode(),
                 "cluster-token": base64.b64encode(CLUSTER_TOKEN.encode()).decode()}})
    body = {"apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": rc.KIND,
            "metadata": {"name": CLUSTER, "namespace": NS},
            "spec": {"nodes": 3, "image": "localhost/shardq:e2e", "gateway": {"replicas": 2},
                     "storage": {"size": "1Gi"}, "fsync": "always",
                     "auth": {"secretName": "shardq-auth"}}}
    # a CRD's resource is served a moment after it is Established
    wait_until("the ShardqCluster created", lambda: api.custom.create_namespaced_custom_object(
        rc.GROUP, rc.VERSION, NS, rc.PLURAL, body), 30, every=0.5)
    source = "charts/shardq/crds" if crd is not MINIMAL_CRD else "this test's minimal CRD"
    return Installed(f"kubernetes client: CRD from {source}, Secret and ShardqCluster; "
                     "operator as a subprocess with the admin kubeconfig",
                     ["shardq", "operator", "--namespace", NS], plane.kubeconfig)


# -- a node's view of the topology ------------------------------------------------------------


def ask_node(address: str, request: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    """One request to a node (or gateway) over the line protocol, after AUTH."""
    host, port = address.rsplit(":", 1)
    with (socket.create_connection((host, int(port)), timeout=timeout) as s,
          s.makefile("rwb") as f):
        for req in ({"cmd": "AUTH", "token": TOKEN}, request):
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            answer: dict[str, Any] = json.loads(f.readline())
        return answer


def slots_of(topology: dict[str, Any], name: str) -> tuple[int, int]:
    """(slots ``name`` owns, moves from or to it) in a wire topology."""
    owned = sum(1 for owner in topology.get("owners", []) if owner == name)
    moving = sum(1 for mv in (topology.get("moving") or {}).values()
                 if name in (mv.get("from"), mv.get("to")))
    return owned, moving


# -- the deployment (module) ------------------------------------------------------------------


@dataclass
class Deletion:
    pod: str
    at: float
    own_view: tuple[int, int, int] | None  # epoch, owned, moving in the pod's own topology
    member_view: tuple[int, int, int] | None  # the same in a remaining member's topology


@dataclass
class Deployment:
    plane: Plane
    api: Api
    kubelet: Kubelet
    workdir: Path
    installed: Installed | None = None
    operators: list[subprocess.Popen[bytes]] = field(default_factory=list)
    deletions: list[Deletion] = field(default_factory=list)

    @property
    def operator(self) -> subprocess.Popen[bytes]:
        return self.operators[-1]

    def start_operator(self) -> subprocess.Popen[bytes]:
        """The operator's own command line (the chart's, when Helm installed it)."""
        assert self.installed is not None
        n = len(self.operators)
        argv = self.installed.operator_argv
        program = shutil.which(argv[0], path=BIN_DIR)
        assert program is not None, argv
        kubeconfig = self.installed.operator_kubeconfig
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDQ_")}
        with open(self.workdir / f"operator-{n}.log", "wb") as out:
            proc = subprocess.Popen(
                [program, *argv[1:], "--kubeconfig", kubeconfig],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**env, "KUBECONFIG": kubeconfig})
        self.operators.append(proc)
        return proc

    def stop_operator(self, sig: int = signal.SIGTERM) -> None:
        proc = self.operator
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def gateway_addresses(self) -> list[str]:
        runs = [r for r in self.kubelet.live(rc.gateway_name(CLUSTER)) if r.ready]
        return [f"{r.ip}:{rc.TCP_PORT}" for r in sorted(runs, key=lambda r: r.name)]

    def node_runs(self) -> list[PodRun]:
        return sorted(self.kubelet.live(rc.node_name(CLUSTER) + "-"), key=lambda r: r.name)

    def on_delete(self, run: PodRun) -> None:
        """Before the kubelet stops a node pod: does any topology still give it slots?"""
        if run.labels.get("app.kubernetes.io/component") != "node":
            return
        own = member = None
        try:
            topo = ask_node(f"{run.ip}:{rc.TCP_PORT}", {"cmd": "TOPOLOGY"}).get("topology")
            if topo:
                own = (topo["epoch"], *slots_of(topo, run.name))
        except (OSError, ValueError):
            pass
        for other in self.node_runs():
            if other.name == run.name:
                continue
            try:
                topo = ask_node(f"{other.ip}:{rc.TCP_PORT}", {"cmd": "TOPOLOGY"}).get("topology")
            except (OSError, ValueError):
                continue
            if topo and (member is None or topo["epoch"] > member[0]):
                member = (topo["epoch"], *slots_of(topo, run.name))
        self.deletions.append(Deletion(run.name, time.monotonic(), own, member))

    def pod_logs(self, pod: str, lines: int = 30) -> str:
        out = []
        for path in sorted((self.workdir / "logs").glob(f"{pod}-*.log")):
            out.append(f"--- {path.name} (last {lines} lines)\n" +
                       "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        pods = [(p.metadata.name, p.metadata.uid[:8], p.status.phase)
                for p in self.api.core.list_namespaced_pod(NS).items]
        return "\n".join([*out, f"pods: {pods}"])

    def logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.workdir.glob("operator-*.log")):
            out.append(f"--- {path.name} (last {lines} lines)\n" +
                       "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def _cluster_pod(pod: Any) -> bool:
    """The test kubelet runs the ShardqCluster's pods (not the chart's operator pod)."""
    labels = pod.metadata.labels or {}
    return (labels.get("app.kubernetes.io/instance") == CLUSTER
            and labels.get("app.kubernetes.io/component") in ("node", "gateway"))


@pytest.fixture(scope="module")
def deployment(plane: Plane) -> Iterator[Deployment]:
    workdir = Path(tempfile.mkdtemp(prefix="shardq-e2e-pods."))
    api = Api(plane.kubeconfig)
    kubelet = Kubelet(plane.kubeconfig, NS, workdir, BIN_DIR, should_run=_cluster_pod)
    dep = Deployment(plane, api, kubelet, workdir)
    kubelet.on_delete = dep.on_delete
    try:
        started = time.monotonic()
        dep.installed = _install(api, plane, workdir)
        _timed("install", started)
        kubelet.start()
        dep.start_operator()
        yield dep
    finally:
        if dep.operators:
            dep.stop_operator()
        kubelet.stop()
        api.close()
        print(f"\n[e2e-k8s] timings: {json.dumps(TIMINGS, indent=1)}", flush=True)
        if os.environ.get("SHARDQ_E2E_KEEP"):
            print(f"[e2e-k8s] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the tests ----------------------------------------------------------------------------------


def test_the_operator_creates_the_objects_and_the_kubelet_runs_the_pods(
        deployment: Deployment) -> None:
    dep, api = deployment, deployment.api
    started = time.monotonic()
    status = wait_until("the cluster Running", lambda: (
        s if (s := api.status()).get("phase") == "Running" else None), 120, hint=dep.logs)
    _timed("cluster created: 3 nodes Running (from operator start)", started)
    assert dep.installed is not None
    print(f"[e2e-k8s] installed by: {dep.installed.how}")
    assert status["nodes"] == 3 and status["slotsMoving"] == 0 and status["epoch"] >= 1
    assert status["conditions"][0]["type"] == "Ready"

    owned = wait_until("every owned object", lambda: (
        o if all((o := api.owned()).values()) else None), 30)
    assert all(owned.values()), owned
    cluster = api.cluster()
    assert cluster is not None
    uid = cluster["metadata"]["uid"]
    sts = api.sts()
    objects = [sts, api.apps.read_namespaced_deployment(rc.gateway_name(CLUSTER), NS),
               api.core.read_namespaced_service(rc.node_name(CLUSTER), NS),
               api.core.read_namespaced_service(rc.gateway_name(CLUSTER), NS),
               api.pdb(rc.node_name(CLUSTER)), api.pdb(rc.gateway_name(CLUSTER))]
    for obj in objects:
        if isinstance(obj, dict):
            name, refs = obj["metadata"]["name"], obj["metadata"].get("ownerReferences", [])
            found = [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs]
        else:
            name, refs = obj.metadata.name, obj.metadata.owner_references or []
            found = [(r.kind, r.name, r.uid, r.controller) for r in refs]
        assert found == [(rc.KIND, CLUSTER, uid, True)], name

    # the controllers made the pods, the kubelet runs them, readiness is real
    assert sts.spec.replicas == 3
    wait_until("3 ready node replicas", lambda: (api.sts().status.ready_replicas or 0) == 3, 60)
    wait_until("2 ready gateway pods", lambda: len(dep.gateway_addresses()) == 2, 60)
    nodes = dep.node_runs()
    assert [r.name for r in nodes] == [f"{rc.node_name(CLUSTER)}-{i}" for i in range(3)]
    for r in nodes:
        assert r.proc is not None and r.proc.poll() is None
        assert "--name" in r.argv and r.argv[r.argv.index("--name") + 1] == r.name
        assert r.argv[r.argv.index("--host") + 1] == r.ip
        assert r.env["SHARDQ_TOKEN"] == TOKEN  # secretKeyRef, read from the API
        assert r.env["SHARDQ_CLUSTER_TOKEN"] == CLUSTER_TOKEN
    for pod in api.pods("node"):
        assert pod.status.phase == "Running" and pod.status.pod_ip.startswith("127.0.0.")
    # readiness reaches the controllers (Endpoints cannot: 1.20 refuses loopback addresses)
    wait_until("the gateway Deployment's 2 ready replicas", lambda: (
        api.apps.read_namespaced_deployment(rc.gateway_name(CLUSTER), NS).status
        .ready_replicas or 0) == 2, 30)
    topo = ask_node(f"{nodes[0].ip}:{rc.TCP_PORT}", {"cmd": "TOPOLOGY"})["topology"]
    assert sorted(n["name"] for n in topo["nodes"]) == [r.name for r in nodes]
    assert [n["tcp"] for n in sorted(topo["nodes"], key=lambda n: n["name"])] == [
        f"{r.ip}:{rc.TCP_PORT}" for r in nodes]
    assert dep.kubelet.errors == []


async def test_pushes_through_a_gateway_pod(deployment: Deployment) -> None:
    dep = deployment
    addresses = await async_wait_until("a ready gateway", dep.gateway_addresses, 60)
    started = time.monotonic()
    async with AsyncClient(addresses[0], token=TOKEN) as c:
        ids = [await c.push(q, {"q": q}) for q in QUEUES]
        assert len(set(ids)) == len(QUEUES)
        for q in QUEUES:
            [job] = await c.pull_batch(q, 1, timeout=0)
            assert job.data == {"q": q}
            await c.ack(job, "done")
        stats = await c.stats()
    _timed("16 push+pull+ack through the gateway pod", started)
    assert stats["jobs"] >= 0
    async with AsyncClient(addresses[0]) as anonymous:
        with pytest.raises(ShardqError):
            await anonymous.push(QUEUES[0], 1)  # the gateway took its token from the Secret


@dataclass
class Change:
    """One change of the ShardqCluster (``what`` "cluster") or of the StatefulSet ("sts")."""

    revision: int  # etcd's revision: one order for every object of the apiserver
    at: float
    what: str
    phase: str = ""
    slots_moving: int | None = None
    progress: str = ""
    replicas: int = 0


class Recorder:
    """Watches the ShardqCluster and the node StatefulSet; their changes in commit order.

    With etcd 3, an object's resourceVersion is the revision that wrote it, one counter
    for the whole store: sorting both objects' changes by it gives their true order.
    """

    def __init__(self, kubeconfig: str) -> None:
        self.api = Api(kubeconfig)
        self.changes: list[Change] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._watch, args=(what,), daemon=True,
                                          name=f"recorder-{what}") for what in ("cluster", "sts")]

    def _watch(self, what: str) -> None:
        from kubernetes import watch

        if what == "cluster":
            args: tuple[Any, ...] = (self.api.custom.list_namespaced_custom_object, rc.GROUP,
                                     rc.VERSION, NS, rc.PLURAL)
        else:
            args = (self.api.apps.list_namespaced_stateful_set, NS)
        version = ""
        while not self._stop.is_set():
            w = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(*args, resource_version=version, timeout_seconds=2):
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        obj = self.api.client.sanitize_for_serialization(obj)
                    version = obj["metadata"]["resourceVersion"]
                    self._record(what, obj)
                    if self._stop.is_set():
                        w.stop()
            except ApiException as exc:
                if exc.status == 410:
                    version = ""
            except Exception:  # a dropped stream: watch again
                time.sleep(0.1)  # back-off before watching again, not a wait for a state

    def _record(self, what: str, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] not in (CLUSTER, rc.node_name(CLUSTER)):
            return
        status = obj.get("status") or {}
        change = Change(int(obj["metadata"]["resourceVersion"]), time.monotonic(), what)
        if what == "cluster":
            change.phase = str(status.get("phase", ""))
            change.slots_moving = status.get("slotsMoving")
            change.progress = str(status.get("progress", ""))
        else:
            change.replicas = int(obj["spec"]["replicas"])
        with self._lock:
            self.changes.append(change)

    def __enter__(self) -> Recorder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.api.close()

    def ordered(self) -> list[Change]:
        with self._lock:
            unique = {(c.what, c.revision): c for c in self.changes}
        return sorted(unique.values(), key=lambda c: c.revision)

    def cluster(self) -> Change | None:
        """The ShardqCluster's latest status."""
        with self._lock:
            found = [c for c in self.changes if c.what == "cluster"]
        return max(found, key=lambda c: c.revision) if found else None


def shrinks_while_moving(changes: list[Change]) -> list[tuple[Change, Change | None]]:
    """StatefulSet shrinks committed while the status last said slots were moving."""
    bad = []
    cluster: Change | None = None
    replicas: int | None = None
    for c in changes:
        if c.what == "cluster":
            cluster = c
        else:
            if replicas is not None and c.replicas < replicas and (
                    cluster is None or (cluster.slots_moving or 0) > 0):
                bad.append((c, cluster))
            replicas = c.replicas
    return bad


def _running_with(api: Api, nodes: int) -> dict[str, Any] | None:
    s = api.status()
    ready = s.get("phase") == "Running" and s.get("nodes") == nodes
    return s if ready else None


async def test_scaling_3_5_2_under_load_with_the_operator_killed_mid_scale(
        deployment: Deployment) -> None:
    dep, api = deployment, deployment.api
    await async_wait_until("3 nodes Running", lambda: _running_with(api, 3), 120)
    gateways = await async_wait_until("2 ready gateways",
                                      lambda: len(g := dep.gateway_addresses()) == 2 and g, 60)
    gateway_pods = {r.name for r in dep.kubelet.live(rc.gateway_name(CLUSTER))}
    epoch0 = api.status()["epoch"]
    load = SteadyLoad(QUEUES, gateways[0], gateways[1], token=TOKEN, pause=0.01,
                      work_pause=0.01, error_pause=0.05)
    producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
    workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
    scale_up = scale_down = 0.0
    killed_at: tuple[str, int | None, str] | None = None
    with Recorder(dep.plane.kubeconfig) as rec:
        try:
            await load.progressed("on 3 nodes", 110)
            started = time.monotonic()
            await asyncio.to_thread(api.patch_nodes, 5)
            up = await async_wait_until("5 nodes Running", lambda: _running_with(api, 5), 180,
                                        hint=dep.logs)
            scale_up = _timed("scale 3 -> 5 (spec patched to status Running)", started)
            assert up["epoch"] > epoch0 and up["slotsMoving"] == 0
            assert len(dep.node_runs()) == 5
            await load.progressed("on 5 nodes", 110)

            started = time.monotonic()
            await asyncio.to_thread(api.patch_nodes, 2)
            # kill the operator in the middle of moving slots off the leaving nodes
            seen = await async_wait_until(
                "status Scaling with slots moving", lambda: (
                    (c := rec.cluster()) and c.phase == "Scaling" and (c.slots_moving or 0) > 0
                    and c), 120, every=0.05)
            dep.operator.send_signal(signal.SIGKILL)
            dep.operator.wait(10)
            killed_at = (seen.phase, seen.slots_moving, seen.progress)
            first = dep.node_runs()[0]
            topo = (await asyncio.to_thread(ask_node, f"{first.ip}:{rc.TCP_PORT}",
                                            {"cmd": "TOPOLOGY"}))["topology"]
            left = sum(slots_of(topo, f"{rc.node_name(CLUSTER)}-{i}")[0] for i in (2, 3, 4))
            in_flight = len(topo.get("moving") or {})
            print(f"[e2e-k8s] operator SIGKILLed at status {killed_at}, "
                  f"{time.monotonic() - started:.2f}s into the scale-down: the leaving nodes "
                  f"still owned {left} slots, {in_flight} moves in flight (epoch "
                  f"{topo['epoch']})", flush=True)
            assert left > 0, "the operator was killed after the slots had moved"
            dep.start_operator()
            down = await async_wait_until("2 nodes Running", lambda: _running_with(api, 2), 240,
                                          hint=dep.logs)
            scale_down = _timed("scale 5 -> 2 with an operator SIGKILLed and replaced", started)
            assert down["slotsMoving"] == 0
            # Ready as soon as the scale is done (not at the timer's next tick)
            ready = {c["type"]: c for c in down["conditions"]}["Ready"]
            assert (ready["status"], down["readyNodes"]) == ("True", 2), ready
            await async_wait_until("2 node pods left", lambda: len(dep.node_runs()) == 2, 60)
            await load.progressed("on 2 nodes", 110)
        finally:
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*producers, return_exceptions=True), 30)
            await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 120)

    duplicates, lost = load.duplicates(), load.lost()
    changes = rec.ordered()
    phases = sorted({c.phase for c in changes if c.what == "cluster"})
    progress = [c.progress for c in changes if c.progress]
    print(f"[e2e-k8s] load: {len(load.pushed)} pushed, {len(load.completed)} completed, "
          f"{duplicates} duplicates, {lost} lost, longest request {load.longest * 1000:.0f} ms, "
          f"{len(load.errors)} errors {load.errors[:3]}; scale up {scale_up:.1f}s, scale down "
          f"{scale_down:.1f}s; phases seen {phases}; progress e.g. {progress[:1] + progress[-1:]}; "
          f"node pod deletions {[(d.pod, d.own_view, d.member_view) for d in dep.deletions]}",
          flush=True)
    assert len(load.pushed) > 300  # the three progressed() waits: at least 330 completed
    assert duplicates == 0
    assert lost == 0
    assert load.errors == [], load.errors[:10]
    assert load.longest < 5.0  # (tests/integration/test_scaling.py's local bound is 1 s)
    # status showed the scale: phase Scaling with slots moving and a progress text
    assert "Scaling" in phases and any((c.slots_moving or 0) > 0 for c in changes)
    assert any("slots moved" in p for p in progress)
    # the StatefulSet shrank (5 -> 2) only once the status said no slot was moving
    replicas = [c.replicas for c in changes if c.what == "sts"]
    assert 5 in replicas and replicas[-1] == 2, replicas
    assert shrinks_while_moving(changes) == []
    # no node pod was deleted while a topology still gave it slots
    leaving = {f"{rc.node_name(CLUSTER)}-{i}" for i in (2, 3, 4)}
    assert {d.pod for d in dep.deletions} == leaving
    for d in dep.deletions:
        assert d.member_view is not None, d
        assert d.member_view[1:] == (0, 0), d  # a remaining node's topology: no slot, no move
        if d.own_view is not None:
            assert d.own_view[1] == 0, d  # and the pod itself owned none any more
    # the gateways were never restarted: the load kept its connections
    assert {r.name for r in dep.kubelet.live(rc.gateway_name(CLUSTER))} == gateway_pods
    assert killed_at is not None
    assert dep.kubelet.errors == []
    logs = dep.logs(10_000)
    assert "Forbidden" not in logs and "(403)" not in logs, logs


async def test_a_restarted_node_pod_keeps_its_data_and_gets_its_new_address_published(
        deployment: Deployment) -> None:
    """Pod deleted, recreated by the StatefulSet on a new 127.0.0.x with the same volume."""
    dep, api = deployment, deployment.api
    await async_wait_until("2 nodes Running", lambda: _running_with(api, 2), 120)
    victim = f"{rc.node_name(CLUSTER)}-1"
    old = dep.kubelet.by_name(victim)
    assert old is not None
    topo = (await asyncio.to_thread(ask_node, f"{old.ip}:{rc.TCP_PORT}",
                                    {"cmd": "TOPOLOGY"}))["topology"]
    theirs = [q for q in (f"restart-{i}" for i in range(64))
              if topo["owners"][_slot(q)] == victim][:8]
    assert theirs
    [gateway] = dep.gateway_addresses()[:1]
    async with AsyncClient(gateway, token=TOKEN) as c:
        ids = {q: await c.push(q, {"q": q}) for q in theirs}
    started = time.monotonic()
    await asyncio.to_thread(api.core.delete_namespaced_pod, victim, NS)
    new = await async_wait_until("the pod recreated and run again", lambda: (
        (r := dep.kubelet.by_name(victim)) and r.uid != old.uid and r.ready and r), 60,
        hint=lambda: dep.pod_logs(victim) + "\n" + repr(dep.kubelet.errors))
    assert new.ip != old.ip and new.argv == [
        a.replace(old.ip, new.ip) for a in old.argv]  # same command line, same data dir
    _timed("node pod deleted until it runs again (new address, same volume)", started)

    def published() -> bool:
        first = dep.node_runs()[0]
        topo = ask_node(f"{first.ip}:{rc.TCP_PORT}", {"cmd": "TOPOLOGY"})["topology"]
        return any(n["name"] == victim and n["tcp"] == f"{new.ip}:{rc.TCP_PORT}"
                   for n in topo["nodes"])
    # the operator's timer (every 15 s once the object is 15 s unchanged) publishes it
    await async_wait_until("the new address in the topology", published, 90, every=0.5,
                           hint=dep.logs)
    _timed("node pod deleted until the topology names its new address", started)
    unavailable: list[str] = []
    async with AsyncClient(gateway, token=TOKEN) as c:

        async def answered(job_id: int) -> dict[str, Any] | None:
            """{"job": GETJOB's answer}, or None while the gateway answers Unavailable."""
            try:
                return {"job": await c.get_job(job_id)}
            except Unavailable as exc:  # the gateway refreshes its topology after a failed call
                unavailable.append(str(exc))
                return None

        for q, job_id in ids.items():
            job = (await eventually(lambda job_id=job_id: answered(job_id), 10, 0.1,
                                    what=f"the gateway to answer GETJOB {job_id}",
                                    hint=lambda: repr(unavailable[-3:])))["job"]
            assert job is not None and job["state"] == "waiting", (q, job)
            [pulled] = await c.pull_batch(q, 1, timeout=0)
            assert pulled.id == job_id
            await c.ack(pulled, "after restart")
    print(f"[e2e-k8s] after the new address was published, the gateway answered "
          f"{len(unavailable)} call(s) Unavailable first: {unavailable[:2]}", flush=True)
    assert len(unavailable) <= 5, unavailable
    assert api.status()["phase"] == "Running"
    assert dep.kubelet.errors == []


def _slot(queue: str) -> int:
    from shardq.wire.slots import slot_of

    return slot_of(queue)


def test_deleting_the_cluster_removes_what_it_owns(deployment: Deployment) -> None:
    dep, api = deployment, deployment.api
    assert api.cluster() is not None
    pids = [r.pid for r in dep.kubelet.live()]
    assert pids
    started = time.monotonic()
    api.custom.delete_namespaced_custom_object(rc.GROUP, rc.VERSION, NS, rc.PLURAL, CLUSTER)
    wait_until("the ShardqCluster gone (finalizer released)", lambda: api.cluster() is None, 60)
    _timed("delete: the operator's delete handler released the ShardqCluster", started)
    gone = wait_until("every owned object gone", lambda: (
        o if not any((o := api.owned()).values()) else None), 120)
    assert not any(gone.values())
    _timed("delete: the garbage collector removed the owned objects", started)
    wait_until("every pod gone", lambda: not api.pods("node") and not api.pods("gateway"), 120)
    _timed("delete: every pod gone", started)
    wait_until("every process stopped", dep.kubelet.idle, 60)
    _timed("delete: every pod's process stopped", started)
    for pid in pids:
        assert not _alive(pid), pid
    # the volume claims are not owned: they stay unless spec.deletion.deleteVolumes
    claims = api.core.list_namespaced_persistent_volume_claim(NS).items
    assert sorted(c.metadata.name for c in claims) == [  # (the StatefulSet's claims)
        f"data-{rc.node_name(CLUSTER)}-{i}" for i in range(5)]
    assert dep.kubelet.errors == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# -- replicated shards (spec.replicas 3): a second release, in its own namespace ---------------
#
# The chart again (release shardq-r3, namespace shardq-e2e-r3), a ShardqCluster of 3 shards of
# 3 members each, its own test kubelet and operator process. Under a steady load through the
# gateways: a primary SIGKILLed (time until its shard takes pushes again), a member's pod and
# volume claim deleted (rebuilt as a learner; time to in-sync), the operator SIGKILLed in the
# middle of a failover (the next one finishes it), a rolling restart by a pod template change
# (failed requests counted) and scaling 3 -> 5 -> 2 shards. Each test prints pushed /
# completed / lost / duplicated from the load's own records.

NS_R = "shardq-e2e-r3"
RELEASE_R = "shardq-r3"
CLUSTER_R = "r3"


def _r3_pod(pod: Any) -> bool:
    labels = pod.metadata.labels or {}
    return (labels.get("app.kubernetes.io/instance") == CLUSTER_R
            and labels.get("app.kubernetes.io/component") in ("node", "gateway"))


@dataclass
class Replicated:
    dep: Deployment  # its operator, kubelet and logs (the helpers that name no cluster)
    api: Api

    def cluster(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.api.custom.get_namespaced_custom_object(
            rc.GROUP, rc.VERSION, NS_R, rc.PLURAL, CLUSTER_R)
        return obj

    def status(self) -> dict[str, Any]:
        return self.cluster().get("status") or {}

    def patch(self, spec: dict[str, Any]) -> None:
        self.api.custom.patch_namespaced_custom_object(
            rc.GROUP, rc.VERSION, NS_R, rc.PLURAL, CLUSTER_R, {"spec": spec})

    def store(self) -> dict[str, Any]:
        """The topology store (the ConfigMap the operator writes by compare-and-swap)."""
        cm = self.api.core.read_namespaced_config_map(f"{CLUSTER_R}-topology", NS_R)
        topo: dict[str, Any] = json.loads(cm.data["topology"])
        return topo

    def converged(self, shards: int, replicas: int = 3) -> dict[str, Any] | None:
        """Status Running with ``shards`` shards of ``replicas`` members, every member in
        sync, Replicated True."""
        s = self.status()
        conds = {c["type"]: c["status"] for c in s.get("conditions") or []}
        members = shards * replicas
        ok = (s.get("phase") == "Running" and s.get("nodes") == shards
              and s.get("inSync") == f"{members}/{members}"
              and conds.get("Replicated") == "True" and conds.get("NoQuorum") == "False"
              and len(s.get("shards") or []) == shards)
        return s if ok else None

    def gateways(self) -> list[str]:
        runs = [r for r in self.dep.kubelet.live(rc.gateway_name(CLUSTER_R)) if r.ready]
        return [f"{r.ip}:{rc.TCP_PORT}" for r in sorted(runs, key=lambda r: r.name)]

    def member(self, name: str) -> PodRun:
        run = self.dep.kubelet.by_name(name)
        assert run is not None, name
        return run

    def events(self, reason: str) -> list[str]:
        return [e.message for e in self.api.core.list_namespaced_event(NS_R).items
                if e.reason == reason]

    def hint(self) -> str:
        return f"status: {json.dumps(self.status())[:3000]}\n{self.dep.logs(60)}"


@pytest.fixture(scope="module")
def replicated(plane: Plane) -> Iterator[Replicated]:
    workdir = Path(tempfile.mkdtemp(prefix="shardq-e2e-r3."))
    api = Api(plane.kubeconfig)
    kubelet = Kubelet(plane.kubeconfig, NS_R, workdir, BIN_DIR, should_run=_r3_pod)
    dep = Deployment(plane, api, kubelet, workdir)
    if not _chart_usable():
        missing("the replicated tests install the chart (helm-python-sdk)")
    try:
        started = time.monotonic()
        dep.installed = _install_chart(api, plane, workdir, NS_R, RELEASE_R, {
            "operator": {"watchNamespace": NS_R}, "cluster": {
            "name": CLUSTER_R, "nodes": 3, "replicas": 3, "image": "localhost/shardq:e2e",
            "fsync": "always", "gateway": {"replicas": 2}, "storage": {"size": "1Gi"},
            "replication": {"failureTimeoutMs": 2000},
            "auth": {"enabled": True, "token": TOKEN, "clusterToken": CLUSTER_TOKEN}}})
        _timed("replicated: install", started)
        kubelet.start()
        dep.start_operator()
        yield Replicated(dep, api)
    finally:
        if dep.operators:
            dep.stop_operator()
        kubelet.stop()
        api.close()
        if os.environ.get("SHARDQ_E2E_KEEP"):
            print(f"[e2e-k8s] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _load_on(r: Replicated, tag: str) -> tuple[SteadyLoad, list[asyncio.Task[None]]]:
    gateways = await async_wait_until("2 ready gateways", lambda: len(g := r.gateways()) == 2
                                      and g, 120, hint=r.hint)
    # a lease of 10 s (load.py's too): a job whose pull answer was lost in a failover is
    # handed out again after it, within the drain
    load = SteadyLoad([f"{tag}-{i}" for i in range(12)], gateways[0], gateways[-1],
                      token=TOKEN, pause=0.01, work_pause=0.01, error_pause=0.05,
                      job_timeout=10_000)
    tasks = [asyncio.create_task(load.produce(i)) for i in range(2)]
    tasks += [asyncio.create_task(load.work(load.queues[i::2])) for i in range(2)]
    return load, tasks


async def _finish(load: SteadyLoad, tasks: list[asyncio.Task[None]], what: str) -> None:
    """Stop pushing, drain (workers go on until every pushed job completed, at most 150 s),
    print the counts; jobs never completed are looked up and printed with their state."""
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks[:2], return_exceptions=True), 30)
    _, pending = await asyncio.wait(tasks[2:], timeout=150)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks[2:], return_exceptions=True)
    await load.settle_unsure()
    missing_jobs = sorted(load.outstanding())
    if missing_jobs:
        states = {}
        async with AsyncClient(load.worker_address, token=TOKEN) as c:
            for number in missing_jobs[:10]:
                job = await c.get_job(load.ids[number])
                states[number] = (load.ids[number], (job or {}).get("state", "gone"),
                                  (job or {}).get("attempts"))
        print(f"[e2e-k8s] {what}: {len(missing_jobs)} pushed jobs not completed after the "
              f"drain: (number: id, state, attempts) {states}", flush=True)
    print(f"[e2e-k8s] {what}: load {len(load.pushed)} pushed, {len(load.completed)} "
          f"completed, {load.lost()} lost, {load.duplicates()} duplicated, "
          f"{len(load.errors)} failed requests {load.errors[:3]}, longest request "
          f"{load.longest * 1000:.0f} ms; duplicated (number: job ids acked) "
          f"{load.duplicate_evidence()}; acks whose answer was lost and not applied "
          f"(number: state then) {load.unapplied}", flush=True)


def _queue_of(topo: dict[str, Any], shard: str, tag: str) -> str:
    from shardq.wire.slots import slot_of

    return next(q for q in (f"{tag}-{i}" for i in range(10_000))
                if topo["owners"][slot_of(q)] == shard)


def _resume(stopped: list[PodRun]) -> None:
    """SIGCONT each stopped member, and forget them."""
    for run in stopped:
        if run.proc is not None:
            run.proc.send_signal(signal.SIGCONT)
    stopped.clear()


async def _pushes_again(gateway: str, queue: str, since: float, limit: float) -> float:
    """Seconds from ``since`` until a push to ``queue`` succeeds (each try bounded)."""
    async with AsyncClient(gateway, token=TOKEN) as c:
        async def pushed() -> bool:
            try:
                await asyncio.wait_for(c.push(queue, {"probe": True}), 1.0)
            except (ShardqError, TimeoutError):
                return False
            return True
        await eventually(pushed, limit, 0.05, what=f"a push to {queue} to succeed")
    return time.monotonic() - since


async def test_the_kubernetes_store_lets_one_of_two_racing_writers_win(plane: Plane) -> None:
    """Two KubeStores (two operators) read the same version and both compare-and-swap: the
    API server takes exactly one write (resourceVersion precondition), the other is told."""
    from kubernetes import config as kconfig

    from shardq.wire.topology import Topology
    from shardq_operator.kubestore import KubeStore
    from shardq_operator.store import Conflict, update

    api = Api(plane.kubeconfig)
    ns = "shardq-e2e-store"
    try:
        api.core.create_namespace({"metadata": {"name": ns}})
        clients = [kconfig.new_client_from_config(config_file=plane.kubeconfig)  # type: ignore[no-untyped-call]
                   for _ in range(2)]
        a, b = (KubeStore(c, ns, "race-topology") for c in clients)
        assert await a.read() == (0, None)
        await a.cas(0, Topology(epoch=1))
        with pytest.raises(Conflict):
            await b.cas(0, Topology(epoch=1))  # created already
        (va, ta), (vb, tb) = await a.read(), await b.read()
        assert va == vb == 1 and ta is not None and tb is not None
        results = await asyncio.gather(a.cas(va, Topology(epoch=2)), b.cas(vb, Topology(epoch=3)),
                                       return_exceptions=True)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, Conflict)]
        assert won == [2] and len(lost) == 1, results
        print(f"[e2e-k8s] racing compare-and-swap: {won} won, refused with {lost[0]}",
              flush=True)
        # the loser's update() reads again and redoes its change on the winner's topology
        done = await asyncio.gather(*(update(store, lambda t: True)
                                      for store in (a, b) for _ in range(5)))
        epochs = sorted(t.epoch for t in done if t is not None)
        version, final = await a.read()
        assert len(set(epochs)) == 10 and version == 12, (epochs, version)
        assert final is not None and final.epoch == epochs[-1]
        for c in clients:
            c.close()
    finally:
        api.core.delete_namespace(ns)
        api.close()


def test_replicated_cluster_three_shards_of_three(replicated: Replicated) -> None:
    r = replicated
    started = time.monotonic()
    status = wait_until("3 shards of 3 members in sync", lambda: r.converged(3), 240,
                        every=0.5, hint=r.hint)
    _timed("replicated: 3 shards x 3 members created, in sync (from operator start)", started)
    topo = r.store()
    assert sorted(topo["shards"]) == ["shard-0", "shard-1", "shard-2"]
    for i in range(3):
        sts = r.api.apps.read_namespaced_stateful_set(f"{CLUSTER_R}-shard-{i}", NS_R)
        assert sts.spec.replicas == 3 and sts.spec.update_strategy.type == "OnDelete"
        spread = sts.spec.template.spec.topology_spread_constraints[0]
        assert spread.label_selector.match_labels[rc.SHARD_LABEL] == f"shard-{i}"
        pdb = r.api.custom.get_namespaced_custom_object(
            "policy", "v1beta1", NS_R, "poddisruptionbudgets", f"{CLUSTER_R}-shard-{i}")
        assert pdb["spec"]["maxUnavailable"] == 1
        members = topo["shards"][f"shard-{i}"]["members"]
        assert members == [f"{CLUSTER_R}-shard-{i}-{j}" for j in range(3)]
    entries = {e["name"]: e for e in status["shards"]}
    assert all(e["term"] >= 1 and e["primary"] and e["inSync"] == 3 for e in entries.values())
    print(f"[e2e-k8s] replicated status: inSync {status['inSync']}, shards "
          f"{[(e['name'], e['primary'], e['term']) for e in status['shards']]}", flush=True)


async def test_replicated_primary_sigkill_fails_over_under_load(replicated: Replicated) -> None:
    r = replicated
    await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5, hint=r.hint)
    topo = await asyncio.to_thread(r.store)
    shard = "shard-0"
    before = topo["shards"][shard]
    queue = _queue_of(topo, shard, "failover-probe")
    load, tasks = await _load_on(r, "failover")
    try:
        await load.progressed("before the kill")
        victim = r.member(before["primary"])
        assert victim.proc is not None
        killed = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        took = await _pushes_again(load.producer_address, queue, killed, 60)
        TIMINGS["replicated: primary SIGKILL until its shard takes pushes"] = round(took, 2)
        print(f"[e2e-k8s] primary {before['primary']} of {shard} SIGKILLed: pushes to its shard "
              f"work again after {took:.2f}s", flush=True)
        after = await async_wait_until("a new primary in a higher term", lambda: (
            (sh := r.store()["shards"][shard])["term"] > before["term"] and sh["primary"]
            and sh), 60, hint=r.hint)
        await async_wait_until("back in sync", lambda: r.converged(3), 120, every=0.5,
                               hint=r.hint)
        await load.progressed("after the failover")
    finally:
        await _finish(load, tasks, "primary SIGKILL")
    # a new term: the old primary's term is over (the test kubelet restarts a killed process
    # within a second, so it may well be elected again: it holds everything, fsync=always)
    print(f"[e2e-k8s] {after['primary']} primary of {shard} in term {after['term']} (was "
          f"{before['primary']} in term {before['term']})", flush=True)
    # kopf posts events from a queue of its own: polled, not read once
    await async_wait_until("a Failover event", lambda: any(
        shard in m for m in r.events("Failover")), 30, hint=r.hint)
    assert took <= 10.0, took
    # a job completed twice failed here before the gateway stopped sending a request it had
    # delivered to the dead primary again (docs/replication.md)
    # the load worked before the kill and after the failover: load.progressed() waits for it
    # (a count of pushes over the whole test is the machine's speed, not the cluster's)
    assert load.lost() == 0 and load.duplicates() == 0


async def test_replicated_lost_volume_rebuilds_as_a_learner(replicated: Replicated) -> None:
    r = replicated
    await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5, hint=r.hint)
    topo = await asyncio.to_thread(r.store)
    shard = "shard-1"
    follower = next(m for m in topo["shards"][shard]["members"]
                    if m != topo["shards"][shard]["primary"])
    old = r.member(follower)
    load, tasks = await _load_on(r, "lostvol")
    try:
        await load.progressed("before the volume is lost")
        started = time.monotonic()
        claim = f"data-{follower}"
        await asyncio.to_thread(r.api.core.delete_namespaced_persistent_volume_claim, claim,
                                NS_R)
        await asyncio.to_thread(r.api.core.delete_namespaced_pod, follower, NS_R)
        # a learner now, or one already (a short catch-up can fall between two polls; the
        # operator's MemberRebuilding event names a member whose storage id changed)
        await async_wait_until("the member a learner", lambda: follower in (
            r.store()["shards"][shard]["learners"]) or any(
            follower in m for m in r.events("MemberRebuilding")), 120, every=0.2, hint=r.hint)
        learner_at = time.monotonic() - started
        await async_wait_until("the member voting and in sync again", lambda: (
            follower in r.store()["shards"][shard]["members"] and r.converged(3)), 180,
            every=0.5, hint=r.hint)
        took = _timed("replicated: pod + PVC deleted until the member is in sync", started)
        await load.progressed("after the rebuild")
    finally:
        await _finish(load, tasks, "lost volume")
    new = r.member(follower)
    assert new.uid != old.uid
    claim_uid = r.api.core.read_namespaced_persistent_volume_claim(claim, NS_R).metadata.uid
    assert any(claim_uid[:8] in a for a in new.argv), new.argv  # a new, empty volume
    rebuilding = await async_wait_until("a MemberRebuilding event", lambda: [
        m for m in r.events("MemberRebuilding") if follower in m], 30)
    insync = await async_wait_until("a MemberInSync event", lambda: [
        m for m in r.events("MemberInSync") if follower in m], 30)
    print(f"[e2e-k8s] lost volume of {follower}: a learner after {learner_at:.1f}s, in sync "
          f"after {took:.1f}s; events {rebuilding[-1:]} {insync[-1:]}", flush=True)
    assert any(follower in m for m in rebuilding) and any(follower in m for m in insync)
    assert load.lost() == 0 and load.duplicates() == 0


async def test_replicated_operator_killed_mid_failover_is_finished_by_the_next(
        replicated: Replicated) -> None:
    """The primary and one follower of a shard stopped (SIGSTOP), the follower a second
    later: the operator starts a failover (a new term without a primary) but can fence only
    one voter, and is SIGKILLed right then. Both continue; the next operator finishes."""
    r, dep = replicated, replicated.dep
    await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5, hint=r.hint)
    topo = await asyncio.to_thread(r.store)
    shard = "shard-2"
    before = topo["shards"][shard]
    primary = r.member(before["primary"])
    follower = r.member(next(m for m in before["members"] if m != before["primary"]))
    queue = _queue_of(topo, shard, "midfailover-probe")
    stopped: list[PodRun] = []
    load, tasks = await _load_on(r, "midfailover")
    try:
        await load.progressed("before the failover")
        mid: dict[str, Any] | None = None
        # the follower must stop after the operator last heard it but before the failover
        # fences: the operator probes every member each tick (a tick lasts ~1.2 s once a
        # member is silent), so a few delays are tried, each from a cluster in sync again
        for delay in (1.5, 1.8, 1.2, 2.1):
            for run in (primary, follower):
                assert run.proc is not None
                run.proc.send_signal(signal.SIGSTOP)
                stopped.append(run)
                if run is primary:
                    await asyncio.sleep(delay)  # the fault's timing, not a wait for a state
            try:
                mid = await async_wait_until(
                    "the failover begun: a new term, no primary", lambda term=before["term"]: (
                        (sh := r.store()["shards"][shard])["term"] > term
                        and not sh["primary"] and sh), 15, every=0.05)
            except AssertionError:
                print(f"[e2e-k8s] follower stopped {delay}s after the primary: no failover "
                      "began (both silent too long); again", flush=True)
                _resume(stopped)
                await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5,
                                       hint=r.hint)
                before = (await asyncio.to_thread(r.store))["shards"][shard]
                primary = r.member(before["primary"])
                follower = r.member(next(m for m in before["members"]
                                         if m != before["primary"]))
                continue
            break
        assert mid is not None, "no delay between the two stops caught the failover's middle"
        dep.operator.send_signal(signal.SIGKILL)
        dep.operator.wait(10)
        killed = time.monotonic()
        print(f"[e2e-k8s] operator SIGKILLed mid-failover of {shard}: term {mid['term']}, no "
              "primary", flush=True)
        _resume(stopped)
        await asyncio.sleep(1.0)  # the shard stays without a primary while no operator runs
        assert not (await asyncio.to_thread(r.store))["shards"][shard]["primary"]
        dep.start_operator()
        after = await async_wait_until("the next operator elected a primary", lambda: (
            (sh := r.store()["shards"][shard])["primary"] and sh["term"] >= mid["term"] and sh),
            120, hint=r.hint)
        took = await _pushes_again(load.producer_address, queue, killed, 60)
        TIMINGS["replicated: operator killed mid-failover until pushes work"] = round(took, 2)
        await async_wait_until("back in sync", lambda: r.converged(3), 180, every=0.5,
                               hint=r.hint)
        await load.progressed("after the failover")
    finally:
        _resume(stopped)
        await _finish(load, tasks, "operator killed mid-failover")
    print(f"[e2e-k8s] the next operator finished it: {after['primary']} primary in term "
          f"{after['term']}; pushes worked {took:.1f}s after the kill", flush=True)
    assert load.lost() == 0 and load.duplicates() == 0


async def test_replicated_rolling_restart_followers_first(replicated: Replicated) -> None:
    r = replicated
    await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5, hint=r.hint)
    uids = {run.name: run.uid for run in r.dep.kubelet.live(f"{CLUSTER_R}-shard-")}
    load, tasks = await _load_on(r, "rolling")
    try:
        await load.progressed("before the restart")
        started = time.monotonic()
        # a new node pod template (resources: the gateways' template stays, so the load's
        # connections to the gateway pods stay; the real-node tier changes the image tag)
        await asyncio.to_thread(r.patch, {"resources": {"node": {"requests": {"cpu": "10m"}}}})

        def rolled() -> bool:
            live = {run.name: run.uid for run in r.dep.kubelet.live(f"{CLUSTER_R}-shard-")
                    if run.ready}
            return (set(live) == set(uids) and all(live[n] != uids[n] for n in uids)
                    and r.converged(3) is not None)
        await async_wait_until("every member restarted and in sync", rolled, 600, every=1.0,
                               hint=r.hint)
        took = _timed("replicated: rolling restart of 9 members", started)
        await load.progressed("after the restart")
    finally:
        await _finish(load, tasks, "rolling restart")
    switchovers = await asyncio.to_thread(r.events, "Switchover")
    print(f"[e2e-k8s] rolling restart: {took:.1f}s, {len(switchovers)} switchovers, "
          f"{len(load.errors)} failed requests", flush=True)
    assert len(switchovers) >= 3
    assert load.lost() == 0 and load.duplicates() == 0
    assert len(load.errors) <= 5, load.errors[:10]


async def test_replicated_scaling_3_5_2_shards(replicated: Replicated) -> None:
    r = replicated
    await async_wait_until("in sync", lambda: r.converged(3), 120, every=0.5, hint=r.hint)
    load, tasks = await _load_on(r, "scale")
    try:
        await load.progressed("on 3 shards")
        started = time.monotonic()
        await asyncio.to_thread(r.patch, {"nodes": 5})
        await async_wait_until("5 shards in sync", lambda: r.converged(5), 300, every=1.0,
                               hint=r.hint)
        _timed("replicated: scale 3 -> 5 shards", started)
        await load.progressed("on 5 shards")
        started = time.monotonic()
        await asyncio.to_thread(r.patch, {"nodes": 2})
        await async_wait_until("2 shards in sync", lambda: r.converged(2), 300, every=1.0,
                               hint=r.hint)
        _timed("replicated: scale 5 -> 2 shards", started)
        await async_wait_until("the leaving shards' StatefulSets gone", lambda: len(
            r.api.apps.list_namespaced_stateful_set(NS_R).items) == 2, 120)
        await load.progressed("on 2 shards")
    finally:
        await _finish(load, tasks, "scale 3 -> 5 -> 2 shards")
    assert sorted(r.store()["shards"]) == ["shard-0", "shard-1"]
    assert load.lost() == 0 and load.duplicates() == 0


async def test_replicated_replicas_3_5_3_under_load(replicated: Replicated) -> None:
    """``spec.replicas`` 3 -> 5 -> 3 on the shards left by the scaling test: new members
    join as learners and vote once caught up; the highest ones leave the voters first, then
    their pods go."""
    r = replicated
    shards = len(r.store()["shards"])
    await async_wait_until("in sync", lambda: r.converged(shards), 120, every=0.5,
                           hint=r.hint)
    load, tasks = await _load_on(r, "replicas")
    try:
        await load.progressed("at 3 replicas")
        started = time.monotonic()
        await asyncio.to_thread(r.patch, {"replicas": 5})
        await async_wait_until("5 members per shard in sync", lambda: r.converged(shards, 5),
                               300, every=1.0, hint=r.hint)
        _timed("replicated: replicas 3 -> 5", started)
        topo = await asyncio.to_thread(r.store)
        assert all(len(sh["members"]) == 5 and not sh["learners"]
                   for sh in topo["shards"].values()), topo["shards"]
        await load.progressed("at 5 replicas")
        started = time.monotonic()
        await asyncio.to_thread(r.patch, {"replicas": 3})
        await async_wait_until("3 members per shard in sync", lambda: r.converged(shards, 3),
                               300, every=1.0, hint=r.hint)
        await async_wait_until("the StatefulSets at 3 pods", lambda: all(
            sts.spec.replicas == 3 and (sts.status.replicas or 0) == 3
            for sts in r.api.apps.list_namespaced_stateful_set(NS_R).items), 120, hint=r.hint)
        _timed("replicated: replicas 5 -> 3", started)
        await load.progressed("at 3 replicas again")
    finally:
        await _finish(load, tasks, "replicas 3 -> 5 -> 3")
    topo = await asyncio.to_thread(r.store)
    for name, sh in topo["shards"].items():
        assert sorted(sh["members"]) == [f"{CLUSTER_R}-{name}-{j}" for j in range(3)], sh
    assert load.lost() == 0 and load.duplicates() == 0
