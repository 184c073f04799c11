"""The kopf operator of ShardqCluster: create, scale, resume and delete clusters.

Every handler calls ``converge``, which is idempotent and safe to run again at
any point (after a crash of the operator, too): apply the owned objects (node
StatefulSet wide enough for the old and the new members, headless Service,
gateway Deployment and Service, PodDisruptionBudgets), wait until the wanted
node pods run and answer, move slots with the rebalancer (operator/rebalance.py:
it finishes a move a previous run left half done), then shrink the StatefulSet
and point the gateways at the nodes. Progress goes to ``status`` and to
Kubernetes events. Node addresses are the pods' IPs, read from the API.

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

from shardq.topology import NodeInfo

from . import reconcile as rc
from .kube import Kube, load
from .rebalance import Rebalancer

log = logging.getLogger("shardq.operator")


@dataclass
class OperatorConfig:
    kubeconfig: str | None = None
    #: How long a reachable-port check of a new node pod may take (s).
    connect_timeout: float = 1.0
    #: Slots moved per rebalancer step.
    batch: int = 4


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


def _owned(manifest: rc.Manifest, body: kopf.Body) -> rc.Manifest:
    kopf.adopt(manifest, owner=body)
    return manifest


def _ip_ready(pod: Any) -> str | None:
    if pod.status is None or pod.status.phase != "Running" or not pod.status.pod_ip:
        return None
    return str(pod.status.pod_ip)


async def _reachable(ip: str, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, rc.TCP_PORT), timeout)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def converge(name: str, namespace: str, body: kopf.Body, spec_raw: dict[str, Any],
                   memo: kopf.Memo, logger: Any) -> dict[str, Any]:
    kube: Kube = memo.kube
    cfg: OperatorConfig = memo.config
    spec = rc.Spec.parse(spec_raw)
    if spec.nodes < 1:
        raise kopf.PermanentError("spec.nodes must be at least 1")
    current = await kube.statefulset_replicas(namespace, rc.node_name(name)) or 0
    plan = rc.plan(name, current, spec.nodes)
    pods = {p.metadata.name: p for p in
            await kube.pods(namespace, rc.labels(name, "node"))}
    seeds = [f"{ip}:{rc.TCP_PORT}" for p in pods.values() if (ip := _ip_ready(p))]
    await _apply_all(kube, body, name, namespace, spec, plan.replicas_first, seeds)
    members = await _wait_for_members(kube, name, namespace, plan.members, cfg)
    await kube.patch_status(namespace, name, {"phase": "Scaling" if plan.scaling or
                                              current != spec.nodes else "Converging"})
    topo = await _rebalance(kube, name, namespace, spec, members, cfg, body)
    if plan.replicas_after != plan.replicas_first:
        await kube.apply(_owned(rc.statefulset(name, namespace, spec, plan.replicas_after), body))
        kopf.info(body, reason="ScaledDown",
                  message=f"nodes beyond {spec.nodes} hold no slots any more: removed")
    seeds = await _gateway_seeds(kube, name, namespace, [n.tcp for n in members])
    await kube.apply(_owned(rc.gateway_deployment(name, namespace, spec, seeds), body))
    return {"phase": "Running", "epoch": topo.epoch, "nodes": len(topo.nodes),
            "slotsMoving": 0, "readyNodes": await _ready_nodes(kube, name, namespace),
            "conditions": [{"type": "Ready", "status": "True", "reason": "Converged",
                            "lastTransitionTime": _now()}]}


async def _apply_all(kube: Kube, body: kopf.Body, name: str, namespace: str, spec: rc.Spec,
                     replicas: int, seeds: list[str]) -> None:
    pdb_version = await kube.pdb_version()
    if seeds:
        seeds = await _gateway_seeds(kube, name, namespace, seeds)
    for manifest in rc.objects(name, namespace, spec, replicas, seeds):
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
                            cfg: OperatorConfig) -> list[NodeInfo]:
    pods = {p.metadata.name: p for p in await kube.pods(namespace, rc.labels(name, "node"))}
    members = []
    for pod_name in wanted:
        pod = pods.get(pod_name)
        ip = _ip_ready(pod) if pod is not None else None
        if ip is None or not await _reachable(ip, cfg.connect_timeout):
            raise kopf.TemporaryError(f"waiting for node pod {pod_name} to run", delay=2)
        members.append(NodeInfo(pod_name, f"{ip}:{rc.TCP_PORT}", f"{ip}:{rc.HTTP_PORT}"))
    return members


async def _rebalance(kube: Kube, name: str, namespace: str, spec: rc.Spec,
                     members: list[NodeInfo], cfg: OperatorConfig, body: kopf.Body) -> Any:
    token = None
    if spec.auth_secret:
        token = (await kube.secret_value(namespace, spec.auth_secret, spec.cluster_token_key)
                 or await kube.secret_value(namespace, spec.auth_secret, spec.token_key))
    last = [0.0]
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if total and (now - last[0] > 1.0 or done == total):
            last[0] = now
            task = loop.create_task(kube.patch_status(namespace, name, {
                "phase": "Scaling", "slotsMoving": total - done,
                "progress": f"{done}/{total} slots moved"}))
            pending.add(task)
            task.add_done_callback(pending.discard)

    reb = Rebalancer(token=token, batch=cfg.batch, on_progress=progress)
    try:
        extra = [f"{ip}:{rc.TCP_PORT}" for p in await kube.pods(namespace, rc.labels(name, "node"))
                 if (ip := _ip_ready(p))]
        topo = await reb.converge(members, extra)
    except Exception as exc:
        raise kopf.TemporaryError(f"rebalance not finished: {exc}", delay=3) from exc
    finally:
        await reb.close()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    kopf.info(body, reason="Rebalanced",
              message=f"topology epoch {topo.epoch}: {len(topo.nodes)} nodes own the 1024 slots")
    return topo


async def _ready_nodes(kube: Kube, name: str, namespace: str) -> int:
    count = 0
    for pod in await kube.pods(namespace, rc.labels(name, "node")):
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
    status = await converge(str(body.metadata.name), str(body.metadata.namespace), body,
                            dict(spec), memo, logger)
    patch.status.update(status)


@kopf.timer(rc.GROUP, rc.VERSION, rc.PLURAL, interval=15, initial_delay=15, idle=15)
async def follow_pod_addresses(body: kopf.Body, spec: kopf.Spec, status: kopf.Status,
                               patch: kopf.Patch, memo: kopf.Memo, logger: Any,
                               **_: Any) -> None:
    """A node pod restarted with another IP: publish its new address (same slots)."""
    if status.get("phase") != "Running":
        return
    status_now = await converge(str(body.metadata.name), str(body.metadata.namespace), body,
                                dict(spec), memo, logger)
    patch.status.update(status_now)


@kopf.on.delete(rc.GROUP, rc.VERSION, rc.PLURAL)
async def delete(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """Owned objects go with the ShardqCluster (owner references); volumes only if asked."""
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    if rc.Spec.parse(dict(spec)).delete_volumes:
        count = await memo.kube.delete_claims(namespace, rc.labels(name, "node"))
        log.info("deleted %d volume claims of %s/%s", count, namespace, name)


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


__all__ = ["OperatorConfig", "converge", "run"]
