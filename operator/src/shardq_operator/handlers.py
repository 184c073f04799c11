"""The kopf operator of ShardqCluster: create, scale, resume and delete clusters.

Every handler calls ``converge``, which is idempotent and safe to run again at
any point (after a crash of the operator, too): apply the owned objects (node
StatefulSet wide enough for the old and the new members, headless Service,
gateway Deployment and Service, PodDisruptionBudgets), wait until the wanted
node pods run and answer, move slots with the rebalancer (shardq_operator.rebalance:
it finishes a move a previous run left half done), then shrink the StatefulSet
and point the gateways at the nodes. Progress goes to ``status`` (phase, epoch,
readyNodes, slotsMoving, observedGeneration, the ``Ready`` and ``StorageInSync``
conditions) and to Kubernetes events. Node addresses are the pods' IPs, read
from the API. Converges of one cluster never overlap: the create/update/resume
handler and the timer take the cluster's lock (``cluster_lock``).

Settings are kopf's own (``settings.peering`` …) plus ``OperatorConfig`` in
``memo``, set once at startup; no globals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import kopf

from shardq.wire.topology import NodeInfo

from . import reconcile as rc
from . import replicated
from .kube import Kube, load
from .kubestore import store_name
from .pods import reachable, running_ip
from .rebalance import Rebalancer
from .ring import pending_moves

log = logging.getLogger("shardq_operator")

REPLICATION_CONDITIONS = ("Replicated", "Degraded", "NoQuorum")


@dataclass
class OperatorConfig:
    kubeconfig: str | None = None
    #: How long a reachable-port check of a new node pod may take (s).
    connect_timeout: float = 1.0
    #: Slots moved per rebalancer step.
    batch: int = 4
    #: After a converge, how long to wait for the members' readiness probes to see their
    #: new slots before writing the status (s): ``Ready`` then says True right away instead
    #: of at the next timer tick.
    ready_wait: float = 15.0


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.peering.standalone = True
    settings.posting.level = logging.INFO
    settings.persistence.finalizer = "shardq.io/finalizer"
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 60
    cfg = memo.get("config") or OperatorConfig(kubeconfig=os.environ.get("KUBECONFIG"))
    memo.config = cfg
    memo.kube = Kube(load(cfg.kubeconfig))
    memo.locks = {}  # cluster_lock: shared by every object's copy of this memo
    memo.storage_warned = {}
    memo.stores = {}  # replicated.topology_store: one KubeStore per cluster
    memo.supervisors = {}  # replicated.Supervisor of each replicated cluster


def _owned(manifest: rc.Manifest, body: kopf.Body) -> rc.Manifest:
    kopf.adopt(manifest, owner=body)
    return manifest


def cluster_lock(memo: kopf.Memo, namespace: str, name: str) -> asyncio.Lock:
    """The lock that makes converges of one ShardqCluster run one at a time.

    kopf runs the create/update/resume handler and the timer of one object in different
    tasks, so they can overlap: two converges at once would race on the StatefulSet's
    replicas and the rebalancer's slot moves. The locks live in a dict of the operator's
    memo (kopf gives each object a shallow copy of it: the dict is shared), by namespace and
    name, so the lock outlives a handler run and is the same for every handler.
    """
    locks: dict[tuple[str, str], asyncio.Lock] | None = memo.get("locks")
    if locks is None:
        locks = memo["locks"] = {}
    lock = locks.get((namespace, name))
    if lock is None:
        lock = locks[namespace, name] = asyncio.Lock()
    return lock


class _Status:
    """The status writes of one converge: ``observedGeneration`` and the conditions.

    Conditions are a list, which a merge patch replaces whole, so every write carries both
    (``Ready`` first), and ``lastTransitionTime`` follows the last written state.
    """

    def __init__(self, kube: Kube, namespace: str, name: str, body: kopf.Body) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        status = body.get("status") or {}
        self.conditions: list[dict[str, Any]] = [
            dict(c) for c in status.get("conditions") or [] if isinstance(c, dict)]
        self.generation = body.get("metadata", {}).get("generation")
        self.storage: dict[str, Any] | None = None

    def fields(self, ready: dict[str, Any]) -> dict[str, Any]:
        # the replication conditions are the supervisor's (replicated.py): kept as they are
        others = [c for c in self.conditions if c.get("type") in REPLICATION_CONDITIONS]
        conditions = [ready] + ([self.storage] if self.storage else []) + others
        self.conditions = conditions
        out: dict[str, Any] = {"conditions": conditions}
        if self.generation is not None:
            out["observedGeneration"] = int(self.generation)
        return out

    def ready(self, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return rc.condition("Ready", ok, reason, message, self.conditions, _now())

    async def patch(self, fields: dict[str, Any]) -> None:
        await self.kube.patch_status(self.namespace, self.name, fields)


async def converge(name: str, namespace: str, body: kopf.Body, spec_raw: dict[str, Any],
                   memo: kopf.Memo, logger: Any) -> dict[str, Any]:
    """Make the cluster what ``spec_raw`` says; the status to write when it is.

    Callers hold ``cluster_lock``.
    """
    kube: Kube = memo.kube
    cfg: OperatorConfig = memo.config
    spec = rc.Spec.parse(spec_raw)
    if spec.nodes < 1:
        raise kopf.PermanentError("spec.nodes must be at least 1")
    if spec.replicas not in rc.REPLICA_CHOICES:
        raise kopf.PermanentError(f"spec.replicas is {spec.replicas}: it must be 1, 3 or 5")
    st = _Status(kube, namespace, name, body)
    if spec.replicas > 1:
        return await _converge_replicated(name, namespace, body, spec, memo, st)
    if (await replicated.topology_store(memo, body).read())[1] is not None:
        raise kopf.PermanentError(
            "spec.replicas is 1 but this cluster runs replicated shards (ConfigMap "
            f"{store_name(name)}): a cluster does not change between 1 and 3 or 5 replicas in "
            "place; make a new ShardqCluster and move the queues")
    live = await kube.statefulset(namespace, rc.node_name(name))
    current = int(((live or {}).get("spec") or {}).get("replicas") or 0)
    if live is None:
        # made again over volumes kept from before: start every pod that has data, so its
        # slots can move to the wanted nodes before the StatefulSet shrinks to spec.nodes
        current = max(current, rc.nodes_with_data(
            name, await kube.claim_names(namespace, rc.labels(name, "node"))))
    # Storage (class, size) is in the StatefulSet's volumeClaimTemplates, which the API server
    # refuses to change. The choice here: never patch them on an existing StatefulSet, apply
    # everything else (a scale too), and say that the storage change needs a manual migration
    # with a Warning event (once per change) and the StorageInSync=False condition. A
    # PermanentError instead would block every other change until spec.storage was set back.
    changes = rc.storage_changes(spec, live) if live is not None else []
    st.storage = rc.storage_condition(changes, st.conditions, _now())
    _warn_storage(memo, body, namespace, name, st, changes)
    plan = rc.plan(name, current, spec.nodes)
    pods = {p.metadata.name: p for p in
            await kube.pods(namespace, rc.labels(name, "node"))}
    seeds = [f"{ip}:{rc.TCP_PORT}" for p in pods.values() if (ip := running_ip(p))]
    await _apply_all(kube, body, name, namespace, spec, plan.replicas_first, seeds,
                     with_claims=live is None)
    try:
        members, node_pods = await _wait_for_members(kube, name, namespace, plan.members, cfg)
    except kopf.TemporaryError as exc:
        ready = st.ready(False, "WaitingForNodes", str(exc))
        observed = (body.get("status") or {}).get("observedGeneration")
        if not (_same_condition(ready, st.conditions) and _same_condition(
                st.storage, st.conditions) and observed == st.generation):
            await st.patch(st.fields(ready))  # once, not on every retry
        raise
    scaling = plan.scaling or current != spec.nodes
    status = body.get("status") or {}
    if scaling or status.get("phase") != "Running" or (
            status.get("observedGeneration") != st.generation):
        fields = {"phase": "Scaling" if scaling else "Converging"}
        if scaling:
            fields.update(st.fields(st.ready(False, "Scaling",
                                             f"{current} -> {spec.nodes} nodes")))
        await st.patch(fields)
    topo = await _rebalance(kube, name, namespace, spec, members, node_pods, cfg, body, st)
    if plan.replicas_after != plan.replicas_first:
        # no pending move among active members only means every slot is on a member
        if pending_moves(topo) or topo.moving or set(topo.active_names()) - set(plan.members):
            raise kopf.TemporaryError("slots still on leaving nodes: not shrinking yet", delay=3)
        await kube.apply(_owned(rc.statefulset(name, namespace, spec, plan.replicas_after,
                                               with_claims=live is None), body))
        kopf.info(body, reason="ScaledDown",
                  message=f"nodes beyond {spec.nodes} hold no slots any more: removed")
    seeds = await _gateway_seeds(kube, name, namespace, [n.tcp for n in members])
    await kube.apply(_owned(rc.gateway_deployment(name, namespace, spec, seeds), body))
    ready_nodes = await _ready_nodes(kube, name, namespace, plan.members)
    deadline = time.monotonic() + cfg.ready_wait
    while ready_nodes < spec.nodes and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        ready_nodes = await _ready_nodes(kube, name, namespace, plan.members)
    ready = rc.ready_condition(ready_nodes, spec.nodes, 0, st.conditions, _now())
    return {"phase": "Running", "epoch": topo.epoch, "nodes": len(topo.nodes),
            "slotsMoving": 0, "progress": None, "readyNodes": ready_nodes,
            **st.fields(ready)}


async def _converge_replicated(name: str, namespace: str, body: kopf.Body, spec: rc.Spec,
                               memo: kopf.Memo, st: _Status) -> dict[str, Any]:
    status = body.get("status") or {}
    if status.get("observedGeneration") != st.generation or status.get("phase") != "Running":
        await st.patch({"phase": "Converging", **st.fields(st.ready(
            False, "Converging", f"{spec.nodes} shards of {spec.replicas} members"))})
    out = await replicated.converge(name, namespace, body, spec, memo)
    if out["epoch"] != status.get("epoch"):
        kopf.info(body, reason="Rebalanced",
                  message=f"topology epoch {out['epoch']}: {out['nodes']} shards of "
                          f"{spec.replicas} members own the 1024 slots")
    members = [m for i in range(spec.nodes) for m in rc.shard_members(name, i, spec.replicas)]
    ready_nodes = await _ready_nodes(memo.kube, name, namespace, members)
    ready = st.ready(True, "Converged", f"{spec.nodes} shards of {spec.replicas} members, "
                     f"no slot moving; {ready_nodes}/{len(members)} member pods Ready")
    return {**out, "readyNodes": ready_nodes, **st.fields(ready)}


def _same_condition(cond: dict[str, Any] | None, conditions: list[dict[str, Any]]) -> bool:
    return cond is not None and any(c.get("type") == cond["type"] and all(
        c.get(k) == cond[k] for k in ("status", "reason", "message")) for c in conditions)


def _warn_storage(memo: kopf.Memo, body: kopf.Body, namespace: str, name: str, st: _Status,
                  changes: list[str]) -> None:
    """A Warning event for a storage change, once (not on every run of the timer)."""
    warned: dict[tuple[str, str], str] | None = memo.get("storage_warned")
    if warned is None:
        warned = memo["storage_warned"] = {}
    assert st.storage is not None
    message = str(st.storage["message"])
    if not changes:
        warned.pop((namespace, name), None)
        return
    if warned.get((namespace, name)) == message or _same_condition(st.storage, st.conditions):
        return
    warned[namespace, name] = message
    kopf.warn(body, reason="StorageChangeIgnored", message=message)


async def _apply_all(kube: Kube, body: kopf.Body, name: str, namespace: str, spec: rc.Spec,
                     replicas: int, seeds: list[str], with_claims: bool) -> None:
    pdb_version = await kube.pdb_version()
    if seeds:
        seeds = await _gateway_seeds(kube, name, namespace, seeds)
    for manifest in rc.objects(name, namespace, spec, replicas, seeds, with_claims):
        if manifest["kind"] == "PodDisruptionBudget":
            manifest["apiVersion"] = pdb_version
        if manifest["kind"] == "Deployment" and not seeds:
            continue  # the gateway needs a node to ask for the topology: later
        await kube.apply(_owned(manifest, body))


async def _gateway_seeds(kube: Kube, name: str, namespace: str,
                         addresses: list[str]) -> list[str]:
    """The gateways' seeds: the ones they have while any is still a node's, else ``addresses``.

    A gateway reads seeds only when it starts (then it follows the topology), and they
    are in the pod template: changing them on every scale would restart every gateway
    pod and cut every client's connection in the middle of the scale.
    """
    current = await kube.container_env(namespace, rc.gateway_name(name), "SHARDQ_SEED")
    kept = [s for s in (current or "").split(",") if s]
    return kept if set(kept) & set(addresses) else addresses


async def _wait_for_members(kube: Kube, name: str, namespace: str, wanted: list[str],
                            cfg: OperatorConfig) -> tuple[list[NodeInfo], list[Any]]:
    """The members, each running and reachable, and every node pod as listed."""
    listed = await kube.pods(namespace, rc.labels(name, "node"))
    pods = {p.metadata.name: p for p in listed}
    members = []
    for pod_name in wanted:
        pod = pods.get(pod_name)
        ip = running_ip(pod) if pod is not None else None
        if ip is None or not await reachable(f"{ip}:{rc.TCP_PORT}", cfg.connect_timeout):
            raise kopf.TemporaryError(f"waiting for node pod {pod_name} to run", delay=2)
        members.append(NodeInfo(pod_name, f"{ip}:{rc.TCP_PORT}", f"{ip}:{rc.HTTP_PORT}"))
    return members, listed


async def _rebalance(kube: Kube, name: str, namespace: str, spec: rc.Spec,
                     members: list[NodeInfo], pods: list[Any], cfg: OperatorConfig,
                     body: kopf.Body, st: _Status) -> Any:
    token = None
    if spec.auth_secret:  # the cluster token: a client token runs no internal command
        token = await kube.secret_value(namespace, spec.auth_secret, spec.cluster_token_key)
        if token is None:
            raise kopf.TemporaryError(
                f"Secret {spec.auth_secret} has no key {spec.cluster_token_key}: slot moves "
                "need the cluster token", delay=30)
    last = [0.0]
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if total and (now - last[0] > 1.0 or done == total):
            last[0] = now
            fields = {"phase": "Scaling", "slotsMoving": total - done,
                      "progress": f"{done}/{total} slots moved"}
            fields.update(st.fields(
                st.ready(False, "SlotsMoving", f"{total - done} slots still moving")
                if total - done else
                st.ready(False, "Scaling", "every slot moved; finishing the scale")))
            task = loop.create_task(st.patch(fields))
            pending.add(task)
            task.add_done_callback(pending.discard)

    reb = Rebalancer(token=token, batch=cfg.batch, on_progress=progress)
    try:
        wanted = {n.name for n in members}
        extra = [f"{ip}:{rc.TCP_PORT}" for p in pods if (ip := running_ip(p))]
        # where the other node pods (leaving ones of a scale-down) are now
        known = [NodeInfo(p.metadata.name, f"{ip}:{rc.TCP_PORT}", f"{ip}:{rc.HTTP_PORT}")
                 for p in pods if p.metadata.name not in wanted and (ip := running_ip(p))]
        topo = await reb.converge(members, extra, known)
    except Exception as exc:
        raise kopf.TemporaryError(f"rebalance not finished: {exc}", delay=3) from exc
    finally:
        await reb.close()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    if topo.epoch != (body.get("status") or {}).get("epoch"):  # not on every timer tick
        kopf.info(body, reason="Rebalanced",
                  message=f"topology epoch {topo.epoch}: {len(topo.nodes)} nodes own the 1024 "
                          "slots")
    return topo


async def _ready_nodes(kube: Kube, name: str, namespace: str, members: list[str]) -> int:
    """Node pods that are Ready, of the ``members`` (not the leaving ones of a scale-down)."""
    count = 0
    for pod in await kube.pods(namespace, rc.labels(name, "node")):
        if pod.metadata is None or pod.metadata.name not in members:
            continue
        for cond in (pod.status.conditions or []) if pod.status else []:
            if cond.type == "Ready" and cond.status == "True":
                count += 1
    return count


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@kopf.on.create(rc.GROUP, rc.VERSION, rc.PLURAL)
@kopf.on.update(rc.GROUP, rc.VERSION, rc.PLURAL, field="spec")
@kopf.on.resume(rc.GROUP, rc.VERSION, rc.PLURAL)
async def reconcile(body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, memo: kopf.Memo,
                    logger: Any, **_: Any) -> None:
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    async with cluster_lock(memo, namespace, name):  # waits for a running timer's converge
        status = await converge(name, namespace, body, dict(spec), memo, logger)
    patch.status.update(status)


@kopf.timer(rc.GROUP, rc.VERSION, rc.PLURAL, interval=15, initial_delay=15, idle=15)
async def follow_pod_addresses(body: kopf.Body, spec: kopf.Spec, status: kopf.Status,
                               patch: kopf.Patch, memo: kopf.Memo, logger: Any,
                               **_: Any) -> None:
    """A node pod restarted with another IP: publish its new address (same slots).

    Also refreshes ``readyNodes`` and the ``Ready`` condition. Skipped while another
    converge of the cluster runs (the next tick comes in 15 s) and once it is being deleted.
    """
    if status.get("phase") != "Running" or body.metadata.get("deletionTimestamp"):
        return
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    lock = cluster_lock(memo, namespace, name)
    if lock.locked():
        logger.debug("a converge of %s/%s runs: this tick skips", namespace, name)
        return
    async with lock:
        status_now = await converge(name, namespace, body, dict(spec), memo, logger)
    patch.status.update(status_now)


@kopf.daemon(rc.GROUP, rc.VERSION, rc.PLURAL, cancellation_timeout=10)
async def supervise(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, stopped: Any,
                    logger: Any, **_: Any) -> None:
    """Replicated clusters: the failover controller, pod addresses, rolling restarts,
    replication status and events (``replicated.Supervisor``), for as long as the
    ShardqCluster exists. Unreplicated clusters: nothing (it waits for a change of spec)."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    kube: Kube = memo.kube
    while not stopped:
        parsed = rc.Spec.parse(dict(spec))
        if parsed.replicas < 2 or body.metadata.get("deletionTimestamp"):
            await asyncio.sleep(2.0)
            continue
        try:
            token = await replicated.cluster_token(kube, namespace, parsed)
        except kopf.TemporaryError as exc:
            logger.warning("%s", exc)
            await asyncio.sleep(5.0)
            continue
        store = replicated.topology_store(memo, body)
        sup = replicated.Supervisor(kube, store, body, parsed,
                                    token, cluster_lock(memo, namespace, name))
        sups = memo.get("supervisors")
        if sups is None:
            sups = memo["supervisors"] = {}
        sups[namespace, store.name] = sup
        try:
            await sup.run(stopped)
        finally:
            sups.pop((namespace, store.name), None)


@kopf.on.delete(rc.GROUP, rc.VERSION, rc.PLURAL)
async def delete(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """Owned objects go with the ShardqCluster (owner references); volumes only if asked.

    The node volume claims are not owned (the StatefulSet controller makes them from the
    claim template, with its labels): they stay, and a cluster made again with the same name
    finds its data, unless ``spec.deletion.deleteVolumes``. Then every claim with the node
    labels of this cluster is deleted (Kubernetes' pvc-protection keeps each until its pod
    is gone).
    """
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    async with cluster_lock(memo, namespace, name):  # a timer's converge finishes first
        if rc.Spec.parse(dict(spec)).delete_volumes:
            count = await memo.kube.delete_claims(namespace, rc.labels(name, "node"))
            log.info("deleted %d volume claims of %s/%s", count, namespace, name)
        else:
            log.info("kept the volume claims of %s/%s (spec.deletion.deleteVolumes is off)",
                     namespace, name)
    (memo.get("locks") or {}).pop((namespace, name), None)
    (memo.get("storage_warned") or {}).pop((namespace, name), None)


def run(kubeconfig: str | None = None, namespace: str | None = None) -> None:
    """``shardq operator``: run the handlers of this module with kopf."""
    memo = kopf.Memo(config=OperatorConfig(kubeconfig=kubeconfig))
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's own login reads it

        @kopf.on.login()
        def login(**kwargs: Any) -> Any:
            return kopf.login_with_kubeconfig(**kwargs)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespaces = [namespace] if namespace else []
    asyncio.run(kopf.operator(clusterwide=not namespaces, namespaces=namespaces, memo=memo,
                              standalone=True))


__all__ = ["OperatorConfig", "cluster_lock", "converge", "run"]
