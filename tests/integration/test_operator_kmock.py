"""The operator's kopf handlers, run by kopf against kmock (an in-memory Kubernetes API).

kopf watches ``ShardqCluster`` objects in the emulator and calls the handlers of
shardq_operator.handlers, which talk to the emulator through the official
``kubernetes`` client (shardq_operator.kube) with a kubeconfig written here. The
emulator has no controllers: node pods exist only when a test adds them, so
the handler's wait for running, reachable node pods never ends and kopf keeps
retrying it (``kopf.TemporaryError``). These tests check what the handler does
up to there: the owned objects, their owner references, the PDB version found
by discovery (the emulator serves ``policy/v1beta1`` only, like Kubernetes
1.20), a changed ``spec.nodes`` reaching the StatefulSet, the status while it
waits (``observedGeneration``, ``Ready`` False), a storage change left out of
the StatefulSet patch with one Warning event, and deletion through kopf's
finalizer (volume claims kept unless ``deleteVolumes``, and only the cluster's
own). Converging for real is tests/e2e/test_e2e_k8s.py's job.

The last tests call the handlers directly, with ``converge`` replaced by a
recorder: the create/update/resume handler, the timer and the delete handler
of one cluster never converge at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest

from shardq_operator import handlers
from shardq_operator import reconcile as rc

from ..helpers import eventually

NS = "default"
CLUSTER = "demo"
UID = "5f0c1e7a-0000-4000-8000-00000000demo"
SHARDQ = f"{rc.GROUP}/{rc.VERSION}/{rc.PLURAL}"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
#: Loopback addresses given to the fake node pods; nothing may listen there on 6789.
POD_IPS = ["127.0.0.251", "127.0.0.252", "127.0.0.253"]


Objects = dict[tuple[str, str, str], dict[str, Any]]


class Emulator:
    """kmock's Kubernetes emulator, serving from a thread and an event loop of its own.

    Not the test's loop: kopf, when it stops, waits 5 s for every task started in
    its loop while it ran, and the emulator's request handlers would be such tasks.
    """

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.url = ""
        self._k: kmock.KubernetesEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._up = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with kmock.KubernetesEmulator() as k, kmock.Server(k) as server:
                _declare_resources(k)
                self._k = k
                self.url = str(server.url).rstrip("/")
                self._up.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._up.set()

    def start(self) -> None:
        self._thread.start()
        if not self._up.wait(15) or self._error is not None or not self.url:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: test, user: {token: kmock-token}}]\n"
            f"contexts: [{{name: kmock, context: {{cluster: kmock, user: test, "
            f"namespace: {NS}}}}}]\n"
            "current-context: kmock\n")

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    async def _in_emulator(self, fn: Callable[[kmock.KubernetesEmulator], Any]) -> Any:
        async def call() -> Any:
            assert self._k is not None
            return fn(self._k)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self._loop))

    async def put(self, resource: str, name: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` as it is (no watch event: for objects there before kopf starts)."""
        def put(k: kmock.KubernetesEmulator) -> None:
            k.objects[resource, NS, name] = obj
        await self._in_emulator(put)

    async def objects(self) -> Objects:
        """Every object the emulator holds (not deleted), by (group/version/plural, ns, name)."""
        def snapshot(k: kmock.KubernetesEmulator) -> Objects:
            return {(f"{r.group}/{r.version}/{r.plural}".lstrip("/"), ns or "", name):
                    copy.deepcopy(dict(obj.raw))
                    for (r, ns, name), obj in k.objects.items() if not obj.deleted}
        found: Objects = await self._in_emulator(snapshot)
        return found

    async def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return (await self.objects()).get((resource, NS, name))

    async def wait_for(self, what: str, check: Callable[[Objects], Any],
                       timeout: float = 15.0) -> Any:
        """``check(objects)`` once it is truthy (tests.helpers.eventually)."""
        seen: Objects = {}

        async def holds() -> Any:
            nonlocal seen
            seen = await self.objects()
            return check(seen)

        return await eventually(holds, timeout, 0.1, what=what,
                                hint=lambda: f"the emulator holds: {sorted(seen)}")


def _declare_resources(k: kmock.KubernetesEmulator) -> None:
    """Built-in kinds, minus ``policy/v1`` (a 1.20 API), plus the CRD's resource."""
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        k.resources.load_bundled()
    for key in list(k.resources):
        if key.group == "policy":
            del k.resources[key]
    k.resources["policy/v1beta1/poddisruptionbudgets"] = kmock.ResourceInfo(
        kind="PodDisruptionBudget", singular="poddisruptionbudget", namespaced=True,
        verbs=VERBS, subresources={"status"})
    k.resources[SHARDQ] = kmock.ResourceInfo(
        kind=rc.KIND, singular="shardqcluster", namespaced=True, verbs=VERBS,
        subresources={"status"})
    for needed in ("v1/namespaces", "v1/events", "v1/pods",
                   "apiextensions.k8s.io/v1/customresourcedefinitions"):
        assert kmock.resource(needed) in set(k.resources), needed

    def api_groups(request: kmock.Request) -> dict[str, Any]:
        # the kubernetes client asks GET /apis/ (with the slash), which kmock does not know
        found: dict[str, set[str]] = {}
        for r in k.resources:
            if r.group and r.version:
                found.setdefault(r.group, set()).add(r.version)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g,
             "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in sorted(vs)],
             "preferredVersion": {"groupVersion": f"{g}/{max(vs)}", "version": max(vs)}}
            for g, vs in sorted(found.items())]}

    k["get /apis/"] << api_groups


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "kubeconfig")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def _registry() -> kopf.OperatorRegistry:
    """The handlers shardq_operator.handlers registered, plus the login ``run()`` adds."""
    default = kopf.get_default_registry()
    registry = kopf.OperatorRegistry()
    for part in ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks"):
        for handler in getattr(default, part).get_all_handlers():
            getattr(registry, part).append(handler)
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)
    return registry


@contextlib.asynccontextmanager
async def running_operator(emulator: Emulator,
                           monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """kopf running the real handlers in this loop until the block ends."""
    monkeypatch.setenv("KUBECONFIG", str(emulator.kubeconfig))  # read by kopf's login
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # kmock answers GET /api/v1/namespaces with 500
    settings.queueing.exit_timeout = 0.2  # a worker sleeping until a retry need not finish
    memo = kopf.Memo(config=handlers.OperatorConfig(kubeconfig=str(emulator.kubeconfig),
                                                    connect_timeout=0.2))
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=_registry(), settings=settings, memo=memo, namespaces=[NS],
        standalone=True, stop_flag=stop, ready_flag=ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _cluster(spec: dict[str, Any]) -> dict[str, Any]:
    # kmock stores objects as given: the uid and resourceVersion the apiserver would set
    return {"apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": rc.KIND,
            "metadata": {"name": CLUSTER, "namespace": NS, "uid": UID, "resourceVersion": "1",
                         "generation": 3},
            "spec": spec}


def _node_pod(i: int, ip: str) -> dict[str, Any]:
    """A node pod as a kubelet would report it: Running, with an IP nobody answers on."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{CLUSTER}-node-{i}", "namespace": NS, "uid": f"pod-{i}",
                         "labels": rc.labels(CLUSTER, "node")},
            "spec": {"containers": [{"name": "node", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip}}


def _nothing_listens_on(ip: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, rc.TCP_PORT))
        except OSError:
            return False
    return True


def _retries(objects: Objects) -> int:
    """How often kopf has retried the reconcile handler (kopf's progress annotation)."""
    cluster = objects.get((SHARDQ, NS, CLUSTER)) or {}
    annotations = cluster.get("metadata", {}).get("annotations") or {}
    raw = annotations.get("kopf.zalando.org/reconcile")
    return int(json.loads(raw).get("retries") or 0) if raw else 0


def _replicas(objects: Objects) -> int | None:
    sts = objects.get(("apps/v1/statefulsets", NS, rc.node_name(CLUSTER)))
    return None if sts is None else int(sts["spec"]["replicas"])


OWNED = [
    ("v1/services", rc.node_name(CLUSTER)),
    ("apps/v1/statefulsets", rc.node_name(CLUSTER)),
    ("v1/services", rc.gateway_name(CLUSTER)),
    ("apps/v1/deployments", rc.gateway_name(CLUSTER)),
    ("policy/v1beta1/poddisruptionbudgets", rc.node_name(CLUSTER)),
    ("policy/v1beta1/poddisruptionbudgets", rc.gateway_name(CLUSTER)),
]


async def test_kopf_runs_the_handler_which_creates_every_owned_object_and_retries(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    assert all(_nothing_listens_on(ip) for ip in POD_IPS)
    for i, ip in enumerate(POD_IPS):
        await emulator.put("v1/pods", f"{CLUSTER}-node-{i}", _node_pod(i, ip))
    await emulator.put(SHARDQ, CLUSTER, _cluster(
        {"nodes": 3, "image": "localhost/shardq:test", "storage": {"size": "2Gi"}}))
    caplog.set_level(logging.INFO, logger="kopf")
    async with running_operator(emulator, monkeypatch):
        await emulator.wait_for("the owned objects",
                                lambda objs: all((r, NS, n) in objs for r, n in OWNED))
        # the handler cannot reach the node pods: kopf retries it
        await emulator.wait_for("two retries of the handler", lambda objs: _retries(objs) >= 2,
                                timeout=20)
    objects = await emulator.objects()

    for resource, name in OWNED:
        obj = objects[resource, NS, name]
        assert obj["metadata"].get("ownerReferences") == [{
            "apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": rc.KIND, "name": CLUSTER,
            "uid": UID, "controller": True, "blockOwnerDeletion": True}], (resource, name)
        assert obj["metadata"]["namespace"] == NS
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == CLUSTER

    sts = objects["apps/v1/statefulsets", NS, rc.node_name(CLUSTER)]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/shardq:test"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"] == {
        "requests": {"storage": "2Gi"}}
    # found by discovery: this API serves policy/v1beta1 only, like Kubernetes 1.20
    pdb = objects["policy/v1beta1/poddisruptionbudgets", NS, rc.node_name(CLUSTER)]
    assert pdb["apiVersion"] == "policy/v1beta1"
    gateway = objects["apps/v1/deployments", NS, rc.gateway_name(CLUSTER)]
    env = {e["name"]: e.get("value")
           for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHARDQ_SEED"] == ",".join(f"{ip}:{rc.TCP_PORT}" for ip in POD_IPS)
    # the handler never got past the wait: no events of a finished rebalance, no status phase
    assert not any(r == "v1/events" for r, _, _ in objects)
    cluster = objects[SHARDQ, NS, CLUSTER]
    status = cluster.get("status") or {}
    assert "phase" not in status
    # ... but the status says why it is not Ready, for the generation it saw
    assert status["observedGeneration"] == 3
    ready, storage = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False",
                                                                 "WaitingForNodes")
    assert ready["message"] == "waiting for node pod demo-node-0 to run"
    assert (storage["type"], storage["status"]) == ("StorageInSync", "True")

    # kopf's finalizer is on the object, and the waiting shows in kopf's log
    assert "shardq.io/finalizer" in cluster["metadata"].get("finalizers", [])
    waiting = [r for r in caplog.records if "waiting for node pod demo-node-0" in r.getMessage()]
    assert len(waiting) >= 2


async def test_no_gateway_before_a_node_pod_has_an_address(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    await emulator.put(SHARDQ, CLUSTER, _cluster({"nodes": 2, "gateway": {"replicas": 1}}))
    async with running_operator(emulator, monkeypatch):
        objects = await emulator.wait_for(
            "a retry after the StatefulSet",
            lambda objs: _replicas(objs) == 2 and _retries(objs) >= 1 and objs)
    assert ("apps/v1/deployments", NS, rc.gateway_name(CLUSTER)) not in objects
    assert ("v1/services", NS, rc.gateway_name(CLUSTER)) in objects
    # one gateway replica: its budget allows the one pod to go (maxUnavailable), so it never
    # blocks a node drain
    budget = objects[("policy/v1beta1/poddisruptionbudgets", NS, rc.gateway_name(CLUSTER))]
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]
    assert ("policy/v1beta1/poddisruptionbudgets", NS, rc.node_name(CLUSTER)) in objects


async def test_the_gateways_keep_their_seeds_while_one_is_still_a_node(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeds are in the pod template: rewriting them on every scale restarts every gateway."""
    assert all(_nothing_listens_on(ip) for ip in POD_IPS)
    for i, ip in enumerate(POD_IPS):
        await emulator.put("v1/pods", f"{CLUSTER}-node-{i}", _node_pod(i, ip))
    gateway = rc.gateway_deployment(CLUSTER, NS, rc.Spec(), [f"{POD_IPS[0]}:{rc.TCP_PORT}"])
    await emulator.put("apps/v1/deployments", rc.gateway_name(CLUSTER), gateway)
    await emulator.put(SHARDQ, CLUSTER, _cluster({"nodes": 3}))
    async with running_operator(emulator, monkeypatch):
        objects = await emulator.wait_for(
            "a retry after the gateway was applied",
            lambda objs: _retries(objs) >= 1 and objs.get(
                ("apps/v1/deployments", NS, rc.gateway_name(CLUSTER)), {}).get(
                    "metadata", {}).get("ownerReferences") and objs, timeout=20)
    dep = objects["apps/v1/deployments", NS, rc.gateway_name(CLUSTER)]
    env = {e["name"]: e.get("value")
           for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SHARDQ_SEED"] == f"{POD_IPS[0]}:{rc.TCP_PORT}"


async def test_a_changed_spec_reaches_the_statefulset_on_the_next_run(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    await emulator.put(SHARDQ, CLUSTER, _cluster({"nodes": 3}))
    async with running_operator(emulator, monkeypatch):
        await emulator.wait_for("3 replicas", lambda objs: _replicas(objs) == 3)
        await asyncio.to_thread(_patch_cluster, emulator.kubeconfig, {"spec": {"nodes": 5}})
        await emulator.wait_for("5 replicas", lambda objs: _replicas(objs) == 5, timeout=20)


async def test_deleting_the_cluster_runs_the_delete_handler_and_drops_the_finalizer(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    claim = _claim(CLUSTER, 0)
    await emulator.put("v1/persistentvolumeclaims", claim["metadata"]["name"], claim)
    others = _claim("other", 0)  # another cluster's data in the same namespace
    await emulator.put("v1/persistentvolumeclaims", others["metadata"]["name"], others)
    await emulator.put(SHARDQ, CLUSTER, _cluster({"nodes": 1, "deletion": {"deleteVolumes": True}}))
    objects = await _deleted_under_the_operator(emulator, monkeypatch)
    # spec.deletion.deleteVolumes: the delete handler removed the node volume claims
    assert ("v1/persistentvolumeclaims", NS, claim["metadata"]["name"]) not in objects
    assert ("v1/persistentvolumeclaims", NS, others["metadata"]["name"]) in objects


async def _deleted_under_the_operator(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[Any, Any]:
    """Run the operator until kopf's finalizer is on the cluster, delete the cluster, and
    return the objects left once it is gone."""
    async with running_operator(emulator, monkeypatch):
        await emulator.wait_for("kopf's finalizer", lambda objs: "shardq.io/finalizer" in (
            objs.get((SHARDQ, NS, CLUSTER), {}).get("metadata", {}).get("finalizers", [])))
        await asyncio.to_thread(_delete_cluster, emulator.kubeconfig)
        objects: dict[Any, Any] = await emulator.wait_for(
            "the cluster gone", lambda objs: (SHARDQ, NS, CLUSTER) not in objs and objs)
    return objects


def _claim(cluster: str, ordinal: int) -> dict[str, Any]:
    """A node volume claim as the StatefulSet controller makes it (the template's labels)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"data-{cluster}-node-{ordinal}", "namespace": NS,
                         "labels": rc.labels(cluster, "node")},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


async def test_deleting_the_cluster_keeps_the_volume_claims_by_default(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    claims = [_claim(CLUSTER, 0), _claim(CLUSTER, 1)]
    for claim in claims:
        await emulator.put("v1/persistentvolumeclaims", claim["metadata"]["name"], claim)
    await emulator.put(SHARDQ, CLUSTER, _cluster({"nodes": 2}))  # deleteVolumes: default off
    objects = await _deleted_under_the_operator(emulator, monkeypatch)
    for claim in claims:  # the data stays for a cluster made again with the same name
        assert ("v1/persistentvolumeclaims", NS, claim["metadata"]["name"]) in objects


async def test_a_storage_change_leaves_the_claim_templates_and_warns_once(
        emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """volumeClaimTemplates are immutable: the rest applies, an event and a condition say so."""
    made = rc.Spec.parse({"nodes": 1, "storage": {"size": "1Gi"}})
    sts = rc.statefulset(CLUSTER, NS, made, 1)
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["volumeMode"] = "Filesystem"
    await emulator.put("apps/v1/statefulsets", rc.node_name(CLUSTER), sts)
    await emulator.put(SHARDQ, CLUSTER, _cluster(
        {"nodes": 2, "fsync": "never", "storage": {"size": "5Gi", "storageClassName": "fast"}}))
    async with running_operator(emulator, monkeypatch):
        objects = await emulator.wait_for(
            "two retries after the StatefulSet was patched",
            lambda objs: _replicas(objs) == 2 and _retries(objs) >= 2 and objs, timeout=20)
    sts = objects["apps/v1/statefulsets", NS, rc.node_name(CLUSTER)]
    # everything else applied: replicas, the pod template, the owner reference
    assert sts["metadata"]["ownerReferences"][0]["uid"] == UID
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--fsync") + 1] == "never"
    # the claim template as it was: never in a patch, which the API server would refuse
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "1Gi"}}
    assert "storageClassName" not in claim["spec"]
    assert claim["spec"]["volumeMode"] == "Filesystem"
    # one Warning event naming both fields, not one per retry
    warnings_ = [o for (r, _, _), o in objects.items()
                 if r == "v1/events" and o.get("reason") == "StorageChangeIgnored"]
    assert len(warnings_) == 1
    assert warnings_[0]["type"] == "Warning"
    message = warnings_[0]["message"]
    assert "spec.storage.size is 5Gi" in message and "made with 1Gi" in message
    assert "spec.storage.storageClassName is fast" in message
    storage = {c["type"]: c for c in objects[SHARDQ, NS, CLUSTER]["status"]["conditions"]}[
        "StorageInSync"]
    assert (storage["status"], storage["reason"]) == ("False", "StorageImmutable")
    assert storage["message"] == message


# -- the handlers called directly: one converge at a time per cluster ----------------------------


class _Converges:
    """Stands for ``handlers.converge``: records its runs, and any two of one cluster at once."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []
        self.overlaps: list[str] = []
        self.most_at_once = 0

    async def __call__(self, name: str, namespace: str, body: kopf.Body,
                       spec_raw: dict[str, Any], memo: kopf.Memo, logger: Any) -> dict[str, Any]:
        if self.running.get(name):
            self.overlaps.append(name)
        self.running[name] = self.running.get(name, 0) + 1
        self.most_at_once = max(self.most_at_once, sum(self.running.values()))
        self.log.append(("start", name))
        # the window in which a second converge of this cluster would overlap this one and show
        # in ``overlaps``
        await asyncio.sleep(0.05)  # the converge's own run time, not a wait for a state
        self.log.append(("end", name))
        self.running[name] -= 1
        return {"phase": "Running", "readyNodes": 3}

    async def started(self, count: int = 1) -> None:
        await eventually(lambda: sum(1 for what, _ in self.log if what == "start") >= count,
                         5, 0.001, what=f"{count} converge(s) started")


def _body(name: str = CLUSTER, **metadata: Any) -> kopf.Body:
    return kopf.Body({"apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": rc.KIND,
                      "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                                   "generation": 1, **metadata},
                      "spec": {"nodes": 3}, "status": {"phase": "Running"}})


async def _reconcile(memo: kopf.Memo, body: kopf.Body) -> kopf.Patch:
    patch = kopf.Patch()
    await handlers.reconcile(body=body, spec=body.spec, patch=patch, memo=memo,
                             logger=logging.getLogger("test"))
    return patch


async def _tick(memo: kopf.Memo, body: kopf.Body) -> kopf.Patch:
    patch = kopf.Patch()
    await handlers.follow_pod_addresses(body=body, spec=body.spec, status=body.status,
                                        patch=patch, memo=memo, logger=logging.getLogger("test"))
    return patch


@pytest.fixture
def converges(monkeypatch: pytest.MonkeyPatch) -> _Converges:
    fake = _Converges()
    monkeypatch.setattr(handlers, "converge", fake)
    return fake


async def test_a_reconcile_waits_for_the_converge_of_a_timer_tick(converges: _Converges) -> None:
    memo, body = kopf.Memo(), _body()
    tick = asyncio.create_task(_tick(memo, body))
    await converges.started()
    reconcile = asyncio.create_task(_reconcile(memo, body))
    tick_patch, reconcile_patch = await asyncio.gather(tick, reconcile)
    assert converges.overlaps == []
    assert converges.log == [("start", CLUSTER), ("end", CLUSTER)] * 2
    # both ran to the end and wrote their status
    assert tick_patch["status"]["phase"] == reconcile_patch["status"]["phase"] == "Running"


async def test_a_timer_tick_during_a_reconcile_skips(converges: _Converges) -> None:
    memo, body = kopf.Memo(), _body()
    reconcile = asyncio.create_task(_reconcile(memo, body))
    await converges.started()
    tick_patch = await _tick(memo, body)  # returns at once: the reconcile holds the lock
    assert not tick_patch
    await reconcile
    assert converges.log == [("start", CLUSTER), ("end", CLUSTER)]
    # the lock is free again: the next tick converges
    assert (await _tick(memo, body))["status"]["phase"] == "Running"
    assert converges.overlaps == []


async def test_converges_queue_per_cluster_and_other_clusters_run_alongside(
        converges: _Converges) -> None:
    memo = kopf.Memo()
    await asyncio.gather(*(_reconcile(memo, _body(name)) for name in
                           (CLUSTER, CLUSTER, CLUSTER, "other")))
    assert converges.overlaps == []
    assert converges.most_at_once == 2  # demo's three ran one by one, "other" alongside
    assert handlers.cluster_lock(memo, NS, CLUSTER) is handlers.cluster_lock(memo, NS, CLUSTER)
    assert handlers.cluster_lock(memo, NS, CLUSTER) is not handlers.cluster_lock(memo, NS,
                                                                                 "other")
    # kopf gives each object a shallow copy of the operator's memo: the locks are shared
    memo.locks = {}
    copy_a, copy_b = copy.copy(memo), copy.copy(memo)
    assert handlers.cluster_lock(copy_a, NS, "x") is handlers.cluster_lock(copy_b, NS, "x")


async def test_no_timer_converge_of_a_cluster_being_deleted_or_not_running(
        converges: _Converges) -> None:
    memo = kopf.Memo()
    assert not await _tick(memo, _body(deletionTimestamp="2024-05-01T10:00:00Z"))
    pending = kopf.Body({**_body(), "status": {"phase": "Scaling"}})
    assert not await _tick(memo, pending)
    assert converges.log == []


async def test_the_delete_handler_waits_for_a_running_converge(converges: _Converges) -> None:
    deleted: list[bool] = []

    class Kube:
        async def delete_claims(self, namespace: str, selector: dict[str, str]) -> int:
            assert selector == rc.labels(CLUSTER, "node")
            deleted.append(bool(converges.running.get(CLUSTER)))
            return 2

    memo = kopf.Memo(kube=Kube())
    body = kopf.Body({**_body(), "spec": {"nodes": 3, "deletion": {"deleteVolumes": True}}})
    tick = asyncio.create_task(_tick(memo, body))
    await converges.started()
    await handlers.delete(body=body, spec=body.spec, memo=memo)
    await tick
    assert deleted == [False]  # after the converge ended, not during it
    assert (NS, CLUSTER) not in memo.locks  # forgotten with the cluster


def _custom_api(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    return api, client.CustomObjectsApi(api)


def _patch_cluster(kubeconfig: Path, patch: dict[str, Any]) -> None:
    api, custom = _custom_api(kubeconfig)
    with api:
        custom.patch_namespaced_custom_object(rc.GROUP, rc.VERSION, NS, rc.PLURAL, CLUSTER, patch)


def _delete_cluster(kubeconfig: Path) -> None:
    api, custom = _custom_api(kubeconfig)
    with api:
        custom.delete_namespaced_custom_object(rc.GROUP, rc.VERSION, NS, rc.PLURAL, CLUSTER)
