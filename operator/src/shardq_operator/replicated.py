"""Replicated shards on Kubernetes (``spec.replicas`` 3 or 5): objects, topology, failover.

Each shard is one StatefulSet of R pods (``reconcile.shard_statefulset``); its members
are the pods, addressed by pod IP. The topology's truth is the ConfigMap store
(``kubestore.KubeStore``), which three writers share by compare-and-swap: ``converge``
(shards and members in, slots moved by the rebalancer, leaving shards out), the failover
controller (``controller.Controller``: terms, primaries, learners) and ``Supervisor``
(pod addresses). Every write is idempotent and every decision is read back from the store
and the pods, so an operator killed anywhere is finished by the next one: a shard left
without a primary is failed over again, a half-done move resumed, a half-done rolling
restart continued from the pods' revisions.

Liveness is the operator's own probes (the controller asks every member ``STATUS`` every
0.2 s over a kept connection), not Leases renewed by the nodes: the probe is what the
loopback controller already trusts, it measures what a failover needs (is this process
the primary of this term, does it hold its quorum, how far behind is each follower), it
costs the API server nothing (Leases would be R x N writes a second), and the nodes need
no API credentials.

``Supervisor`` runs per ShardqCluster in the operator (a kopf daemon): the controller, the
pods' addresses, the rolling restart (followers first, then a switchover, then the old
primary, each step once the shard is fully in sync), the status (``shards``, ``inSync``,
conditions ``Replicated``/``Degraded``/``NoQuorum``) and the events (failovers, members
rebuilding from an empty volume and back in sync, restarts).

Must not: move slots itself (rebalance.py) or choose primaries (controller.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import kopf

from shardq.errors import ShardqError
from shardq.wire.topology import NodeInfo, Shard, Topology

from . import reconcile as rc
from .controller import Controller, ControllerSettings, Seen, open_bounded
from .kube import Kube
from .kubestore import KubeStore, store_name
from .pods import owner_reference, pod_info, pod_ip, reachable
from .rebalance import Rebalancer
from .ring import ring_owners
from .store import Conflict, update

log = logging.getLogger("shardq_operator.replicated")

REVISION_LABEL = "controller-revision-hash"
#: A live follower is in sync when it holds everything committed, or (under a steady load,
#: where the slowest of three trails the commit point by a group commit or two) when no
#: record has waited for its ack longer than this (s).
IN_SYNC_LAG = 0.5


def topology_store(memo: kopf.Memo, body: kopf.Body) -> KubeStore:
    """The cluster's store, one instance per cluster in this operator (it remembers the
    resourceVersion of each version it read)."""
    stores: dict[tuple[str, str], KubeStore] | None = memo.get("stores")
    if stores is None:
        stores = memo["stores"] = {}
    ns, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
    store = stores.get((ns, name))
    if store is None:
        kube: Kube = memo.kube
        store = stores[ns, name] = KubeStore(kube.api, ns, store_name(name),
                                             owner_reference(body), rc.labels(name, "node"))
    return store


async def storage_id(address: str, token: str | None) -> str:
    conn = await open_bounded(address, token, 5)
    try:
        return str((await asyncio.wait_for(conn.call({"cmd": "STATUS"}), 10))["storage_id"])
    finally:
        await conn.close()


async def cluster_token(kube: Kube, namespace: str, spec: rc.Spec) -> str | None:
    if not spec.auth_secret:
        return None
    token = await kube.secret_value(namespace, spec.auth_secret, spec.cluster_token_key)
    if token is None:
        raise kopf.TemporaryError(
            f"Secret {spec.auth_secret} has no key {spec.cluster_token_key}: replicated shards "
            "need the cluster token", delay=30)
    return token


# -- converge -------------------------------------------------------------------------------


async def converge(name: str, namespace: str, body: kopf.Body, spec: rc.Spec,
                   memo: kopf.Memo) -> dict[str, Any]:
    """Make the replicated cluster what ``spec`` says; the status fields to write.

    Callers hold the cluster's lock. Order: objects (StatefulSets wide enough for the old
    and the new shards and members), the members running, the store (new shards, new
    members as learners), slots moved to the wanted shards, members beyond
    ``spec.replicas`` removed, leaving shards' StatefulSets, budgets and claims deleted,
    the gateways pointed at the members.
    """
    kube: Kube = memo.kube
    store = topology_store(memo, body)
    token = await cluster_token(kube, namespace, spec)
    if await kube.statefulset(namespace, rc.node_name(name)) is not None:
        raise kopf.PermanentError(
            f"spec.replicas is {spec.replicas} but this cluster runs unreplicated nodes "
            f"(StatefulSet {rc.node_name(name)}): a cluster does not change between 1 and "
            "3 or 5 replicas in place; make a new ShardqCluster and move the queues")
    _, topo = await store.read()
    have = sorted(i for s in (topo.shards if topo else {})
                  if (i := rc.shard_index(name, s)) is not None)
    count = max([spec.nodes, *(i + 1 for i in have)])
    width = await _apply_objects(kube, body, name, namespace, spec, count)
    wanted = await _running_members(kube, name, namespace, spec, count, width, topo)
    topo, changed = await _admit(store, topo, wanted, spec, name, token)
    reb = Rebalancer(token=token, batch=memo.config.batch, store=store)
    try:
        if changed:
            await reb.publish(topo)
        topo = await reb.converge_shards([rc.shard_key(i) for i in range(spec.nodes)])
    except Exception as exc:
        raise kopf.TemporaryError(f"rebalance not finished: {exc}", delay=3) from exc
    finally:
        await reb.close()
    topo = await _shrink_members(store, topo, spec, name, memo)
    for i in range(count):
        if rc.shard_key(i) in topo.shards and width.get(i, spec.replicas) != spec.replicas:
            narrow = rc.shard_statefulset(name, namespace, spec, i, with_claims=False)
            kopf.adopt(narrow, owner=body)
            await kube.apply(narrow)
    await _remove_gone(kube, body, name, namespace, spec, topo)
    await _write_seeds(kube, body, name, namespace, [n.tcp for n in topo.nodes])
    gw = rc.gateway_deployment(name, namespace, spec, [])
    _seeds_from_config_map(gw, name)
    kopf.adopt(gw, owner=body)
    await kube.apply(gw)
    return {"phase": "Running", "epoch": topo.epoch, "nodes": len(topo.shards),
            "replicas": spec.replicas, "slotsMoving": 0, "progress": None}


async def _apply_objects(kube: Kube, body: kopf.Body, name: str, namespace: str,
                         spec: rc.Spec, count: int) -> dict[int, int]:
    """Apply the objects of ``count`` shards; each shard StatefulSet's replicas (as wide as
    it is now while members beyond ``spec.replicas`` still have to leave the shard)."""
    pdb_version = await kube.pdb_version()
    pods = await kube.pods(namespace, rc.labels(name, "node"))
    seeds = [info.tcp for p in pods if (info := pod_info(p)) is not None]
    width: dict[int, int] = {}
    for manifest in rc.replicated_objects(name, namespace, spec, count, seeds):
        kind, mname = manifest["kind"], manifest["metadata"]["name"]
        if kind == "PodDisruptionBudget":
            manifest["apiVersion"] = pdb_version
        if kind == "Deployment":
            if not seeds:
                continue  # the gateway needs a node to ask for the topology: later
            await _write_seeds(kube, body, name, namespace, seeds)
            _seeds_from_config_map(manifest, name)
        if kind == "StatefulSet":
            live = await kube.statefulset(namespace, mname)
            index = rc.shard_index(name, mname)
            assert index is not None
            wide = max(spec.replicas, int(((live or {}).get("spec") or {}).get("replicas") or 0))
            width[index] = wide
            manifest["spec"]["replicas"] = wide
            if live is not None:
                del manifest["spec"]["volumeClaimTemplates"]
        kopf.adopt(manifest, owner=body)
        await kube.apply(manifest)
    return width


async def _running_members(kube: Kube, name: str, namespace: str, spec: rc.Spec, count: int,
                           width: dict[int, int], topo: Topology | None
                           ) -> dict[str, list[NodeInfo]]:
    """The running, reachable member pods of each shard. A new shard waits for all of its
    members (each gets its storage id recorded); a shard that exists goes on without a
    member that is down (the failover controller's business), and a new member joins
    once it runs."""
    pods = {p.metadata.name: p for p in await kube.pods(namespace, rc.labels(name, "node"))}
    wanted: dict[str, list[NodeInfo]] = {}
    for i in range(count):
        key = rc.shard_key(i)
        infos = []
        for member in rc.shard_members(name, i, width.get(i, spec.replicas)):
            pod = pods.get(member)
            info = pod_info(pod) if pod is not None else None
            if info is None or not await reachable(info.tcp, 1.0):
                if topo is None or key not in topo.shards:
                    raise kopf.TemporaryError(f"waiting for member pod {member} to run",
                                              delay=2)
                continue
            infos.append(info)
        wanted[key] = infos
    return wanted


async def _remove_gone(kube: Kube, body: kopf.Body, name: str, namespace: str, spec: rc.Spec,
                       topo: Topology) -> None:
    """Delete every shard StatefulSet (with its budget and claims) the topology has no
    shard for: a scale-down finished here, or by an operator killed before this step."""
    pdb_version = await kube.pdb_version()
    for sts_name in await kube.statefulset_names(namespace, rc.labels(name, "node")):
        i = rc.shard_index(name, sts_name)
        key = rc.shard_key(i) if i is not None else ""
        if i is None or key in topo.shards or i < spec.nodes:
            continue
        await kube.delete("apps/v1", "StatefulSet", namespace, rc.shard_set_name(name, i))
        await kube.delete(pdb_version, "PodDisruptionBudget", namespace,
                          rc.shard_set_name(name, i))
        await kube.delete_claims(namespace, rc.shard_labels(name, i))
        kopf.info(body, reason="ShardRemoved",
                  message=f"{key} holds no slots any more: its StatefulSet, budget and volumes "
                          "were deleted")


def seeds_name(cluster: str) -> str:
    return f"{cluster}-seeds"


def _seeds_from_config_map(gateway: rc.Manifest, cluster: str) -> None:
    """The gateways read ``SHARDQ_SEED`` from the ConfigMap ``<cluster>-seeds``: the members'
    addresses change with every restarted pod (a rolling restart changes all of them), and
    a seed list in the pod template would restart every gateway, cutting every client's
    connection, each time. A ConfigMap changes no template: a gateway that starts reads the
    addresses of the moment, a running one follows the topology."""
    env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    env[0] = {"name": "SHARDQ_SEED", "valueFrom": {"configMapKeyRef": {
        "name": seeds_name(cluster), "key": "seeds"}}}


async def _write_seeds(kube: Kube, body: kopf.Body, cluster: str, namespace: str,
                       seeds: list[str]) -> None:
    manifest: rc.Manifest = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": seeds_name(cluster), "namespace": namespace,
                     "labels": rc.labels(cluster, "gateway")},
        "data": {"seeds": ",".join(sorted(seeds))}}
    kopf.adopt(manifest, owner=body)
    await kube.apply(manifest)


async def _admit(store: KubeStore, topo: Topology | None, wanted: dict[str, list[NodeInfo]],
                 spec: rc.Spec, cluster: str, token: str | None) -> tuple[Topology, bool]:
    """New shards into the store (the first ever: the initial topology, member 0 primary in
    term 1); pods new to an existing shard as its learners; addresses that moved."""
    known = {m for sh in (topo.shards.values() if topo else []) for m in
             [*sh.members, *sh.learners]}
    fresh = [i for infos in wanted.values() for i in infos if i.name not in known]
    ids = {i.name: await storage_id(i.tcp, token) for i in fresh}
    if topo is None:
        shards = {key: Shard(members=[i.name for i in infos], primary=infos[0].name, term=1,
                             ids={i.name: ids[i.name] for i in infos})
                  for key, infos in wanted.items()}
        topo = Topology(epoch=1, nodes=[i for infos in wanted.values() for i in infos],
                        shards=shards, owners=ring_owners(sorted(
                            rc.shard_key(i) for i in range(spec.nodes))))
        try:
            await store.cas(0, topo)
        except Conflict:  # another writer made it first: take theirs
            _, topo = await store.read()
            assert topo is not None
        return topo, True

    def admit(t: Topology) -> bool:
        changed = False
        for key, infos in wanted.items():
            sh = t.shards.get(key)
            if sh is None:
                t.shards[key] = Shard(members=[i.name for i in infos], primary=infos[0].name,
                                      term=1, ids={i.name: ids[i.name] for i in infos})
                changed = True
            else:
                for i in infos:
                    if i.name not in sh.members and i.name not in sh.learners:
                        sh.learners.append(i.name)  # the controller promotes it in sync
                        changed = True
            for i in infos:
                have = t.node(i.name)
                if have is None:
                    t.nodes.append(i)
                    changed = True
                elif (have.tcp, have.http) != (i.tcp, i.http):
                    have.tcp, have.http = i.tcp, i.http
                    changed = True
        return changed

    written = await update(store, admit)
    _, topo = await store.read()
    assert topo is not None
    return topo, written is not None


async def _shrink_members(store: KubeStore, topo: Topology, spec: rc.Spec, cluster: str,
                          memo: kopf.Memo) -> Topology:
    """Members with an ordinal >= ``spec.replicas`` leave their shard (a primary among them
    hands over first, by a switchover)."""
    def extra(sh: Shard) -> list[str]:
        return [m for m in [*sh.members, *sh.learners]
                if m.rsplit("-", 1)[-1].isdigit() and int(m.rsplit("-", 1)[-1]) >= spec.replicas]

    for key, sh in topo.shards.items():
        if sh.primary in extra(sh):
            controller = supervisor_controller(memo, store)
            if controller is None:
                raise kopf.TemporaryError("no failover controller to hand over with", delay=3)
            to = next(m for m in sh.members if m not in extra(sh))
            await controller.switchover(key, to)
    if not any(extra(sh) for sh in topo.shards.values()):
        return topo

    def drop(t: Topology) -> bool:
        gone = set()
        for sh in t.shards.values():
            for m in extra(sh):
                if m == sh.primary:
                    raise kopf.TemporaryError(f"{m} is still a primary", delay=3)
                gone.add(m)
                with contextlib.suppress(ValueError):
                    sh.members.remove(m)
                with contextlib.suppress(ValueError):
                    sh.learners.remove(m)
                sh.ids.pop(m, None)
        t.nodes = [n for n in t.nodes if n.name not in gone]
        return bool(gone)

    await update(store, drop)
    _, fresh = await store.read()
    assert fresh is not None
    return fresh


def supervisor_controller(memo: kopf.Memo, store: KubeStore) -> Controller | None:
    sup: Supervisor | None = (memo.get("supervisors") or {}).get((store.namespace,
                                                                  store.name))
    return sup.controller if sup is not None else None


# -- the supervisor (a kopf daemon per cluster) ---------------------------------------------


def shard_status(shard: Shard, seen: dict[str, Seen], silent: Any, timeout: float
                 ) -> dict[str, Any]:
    """One shard's status entry: primary, term, members in sync (the primary included:
    followers live with everything committed, or at most ``IN_SYNC_LAG`` behind), learners,
    whether it holds its quorum."""
    primary = seen.get(shard.primary, Seen()).status if shard.primary else {}
    alive = bool(primary) and silent(shard.primary) <= timeout and (
        primary.get("role") == "primary" and primary.get("term") == shard.term)
    in_sync = 0
    if alive:
        commit = int(primary.get("commit", 0))
        in_sync = 1 + sum(1 for f in primary.get("followers", [])
                          if f["name"] in shard.members and f.get("live")
                          and (int(f.get("acked", 0)) >= commit
                               or float(f.get("lag_seconds", 1e9)) <= IN_SYNC_LAG))
    quorum = alive and float(primary.get("quorum_lost_s", 0.0)) == 0.0
    return {"primary": shard.primary, "term": shard.term, "members": len(shard.members),
            "learners": list(shard.learners), "inSync": in_sync, "quorum": quorum}


def _addressed(topo: Topology, pod: Any) -> bool:
    """The pod runs and the topology names its current address."""
    info = pod_info(pod)
    node = topo.node(info.name) if info is not None else None
    return info is not None and node is not None and node.tcp == info.tcp


class Supervisor:
    """The failover controller of one cluster, and what watches its pods."""

    def __init__(self, kube: Kube, store: KubeStore, body: kopf.Body, spec: rc.Spec,
                 token: str | None, lock: asyncio.Lock) -> None:
        self.kube, self.store, self.body, self.spec, self.lock = kube, store, body, spec, lock
        self.namespace = str(body["metadata"]["namespace"])
        self.name = str(body["metadata"]["name"])
        self.controller = Controller(store, ControllerSettings(
            failure_timeout=spec.failure_timeout_ms / 1000, token=token))
        self.last: dict[str, tuple[int, str, tuple[str, ...], dict[str, str]]] = {}
        self.rebuilding: dict[str, float] = {}
        self.restarting: dict[str, float] = {}
        self.pending: dict[str, float] = {}  # pod uid -> first seen without an address
        self.conditions: list[dict[str, Any]] = list(
            (body.get("status") or {}).get("conditions") or [])

    async def run(self, stopped: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.controller.run())
        try:
            while not stopped:
                try:
                    await self.tick()
                except Exception:
                    log.exception("supervisor of %s/%s: tick failed", self.namespace,
                                  self.name)
                await asyncio.sleep(1.0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await self.controller.close()

    async def tick(self) -> None:
        self.spec = rc.Spec.parse(dict(self.body.get("spec") or {}))
        _, topo = await self.store.read()
        if topo is None:
            return
        pods = await self.kube.pods(self.namespace, rc.labels(self.name, "node"))
        topo = await self._readdress(topo, pods)
        await self._lost_volumes(pods)
        shards = {key: shard_status(sh, self.controller.seen, self.controller.silent_for,
                                    self.controller.settings.failure_timeout)
                  for key, sh in sorted(topo.shards.items())}
        self._events(topo, shards)
        if not self.lock.locked():
            await self._roll(topo, shards, pods)
        await self._write_status(shards)

    async def _readdress(self, topo: Topology, pods: list[Any]) -> Topology:
        """A member's pod recreated elsewhere: its new IP into the store, published."""
        moved = {}
        for pod in pods:
            info = pod_info(pod)
            have = topo.node(pod.metadata.name)
            if info is not None and have is not None and have.tcp != info.tcp:
                moved[info.name] = info
        if not moved:
            return topo

        def change(t: Topology) -> bool:
            done = False
            for n in t.nodes:
                info = moved.get(n.name)
                if info is not None and n.tcp != info.tcp:
                    n.tcp, n.http = info.tcp, info.http
                    done = True
            return done

        written = await update(self.store, change)
        if written is None:
            return topo
        log.info("new addresses published: %s", {n: i.tcp for n, i in moved.items()})
        await self.controller.publish(written)
        await _write_seeds(self.kube, self.body, self.name, self.namespace,
                           [n.tcp for n in written.nodes])
        return written

    async def _lost_volumes(self, pods: list[Any]) -> None:
        """A member pod left Pending because its volume claim was deleted (the scheduler
        never places a pod on a claim being deleted, and the StatefulSet makes a claim only
        with a new pod): delete the pod, so the StatefulSet makes both again, an empty
        volume the member rebuilds from its shard's primary as a learner."""
        now = time.monotonic()
        for pod in pods:
            if pod_ip(pod) is not None or pod.metadata.deletion_timestamp is not None:
                continue
            uid = str(pod.metadata.uid)
            first = self.pending.setdefault(uid, now)
            if now - first < 3.0:
                continue
            claim = f"{rc.CLAIM}-{pod.metadata.name}"
            if await self.kube.claim_usable(self.namespace, claim):
                continue
            self.pending.pop(uid, None)
            kopf.warn(self.body, reason="VolumeLost",
                      message=f"{pod.metadata.name}: its volume claim {claim} is gone; "
                              "recreating the pod with a new, empty volume")
            await self.kube.delete("v1", "Pod", self.namespace, pod.metadata.name)
        live = {str(p.metadata.uid) for p in pods}
        for uid in [u for u in self.pending if u not in live]:
            del self.pending[uid]

    def _events(self, topo: Topology, shards: dict[str, dict[str, Any]]) -> None:
        """Events from what changed since the last tick: a new primary or term (Failover); a
        member that came back on a new volume (its storage id changed, or it became a
        learner: MemberRebuilding), and the same member voting again (MemberInSync), even
        when its whole time as a learner fell between two ticks."""
        now = time.monotonic()
        for key, sh in topo.shards.items():
            was = self.last.get(key)
            state = (sh.term, sh.primary, tuple(sh.learners), dict(sh.ids))
            self.last[key] = state
            if was is None:
                continue
            if sh.primary and (sh.term, sh.primary) != was[:2]:
                kopf.info(self.body, reason="Failover",
                          message=f"{key}: {sh.primary} is primary in term {sh.term} (was "
                                  f"{was[1] or 'none'} in term {was[0]})")
            renewed = {m for m, sid in sh.ids.items() if m in was[3] and was[3][m] != sid}
            for m in (set(sh.learners) - set(was[2])) | renewed:
                if m in self.rebuilding:
                    continue
                self.rebuilding[m] = now
                kopf.warn(self.body, reason="MemberRebuilding",
                          message=f"{m} came back with an empty volume: a learner of {key}, "
                                  f"rebuilding from {sh.primary or 'the primary'}")
            for m in [m for m in self.rebuilding if m in sh.members and m not in sh.learners
                      and shards.get(key, {}).get("inSync", 0) >= len(sh.members)]:
                since = self.rebuilding.pop(m)
                kopf.info(self.body, reason="MemberInSync",
                          message=f"{m} caught up with {key}'s primary after {now - since:.1f}s: "
                                  "a voting member in sync again")

    async def _roll(self, topo: Topology, shards: dict[str, dict[str, Any]],
                    pods: list[Any]) -> None:
        """One step of a rolling restart per shard whose StatefulSet has a new revision and
        which is fully in sync: an outdated follower's pod deleted; when only the primary is
        outdated, a switchover to an updated follower, then the old primary's pod deleted."""
        by_shard: dict[str, list[Any]] = {}
        for pod in pods:
            by_shard.setdefault((pod.metadata.labels or {}).get(rc.SHARD_LABEL, ""),
                                []).append(pod)
        for key, sh in topo.shards.items():
            index = rc.shard_index(self.name, key)
            if index is None or key in self.controller._busy:
                continue
            sts = await self.kube.statefulset(self.namespace, rc.shard_set_name(self.name, index))
            revision = ((sts or {}).get("status") or {}).get("updateRevision")
            members = by_shard.get(key, [])
            if not revision or sts is None:
                continue
            outdated = [p for p in members
                        if (p.metadata.labels or {}).get(REVISION_LABEL) != revision]
            if not outdated:
                if any(n.startswith(f"{rc.shard_set_name(self.name, index)}-")
                       for n in self.restarting):
                    started = min(t for n, t in self.restarting.items()
                                  if n.startswith(f"{rc.shard_set_name(self.name, index)}-"))
                    if shards[key]["inSync"] >= len(sh.members) + len(sh.learners):
                        for n in [n for n in self.restarting
                                  if n.startswith(f"{rc.shard_set_name(self.name, index)}-")]:
                            del self.restarting[n]
                        kopf.info(self.body, reason="RolledOut",
                                  message=f"{key}: every member runs revision {revision}, in "
                                          f"sync ({time.monotonic() - started:.1f}s)")
                continue
            st = shards[key]
            in_sync = (st["quorum"] and not sh.learners and st["inSync"] == len(sh.members)
                       and len(members) == int(sts["spec"]["replicas"])
                       and all(_addressed(topo, p) for p in members))
            if not in_sync:
                continue
            followers = [p for p in outdated if p.metadata.name != sh.primary]
            victim = followers[0] if followers else None
            if victim is None:
                updated = [p.metadata.name for p in members
                           if p not in outdated and p.metadata.name in sh.members]
                if not updated:
                    continue
                kopf.info(self.body, reason="Switchover",
                          message=f"{key}: handing {sh.primary}'s primary role to "
                                  f"{updated[0]} before restarting it")
                self.controller._spawn(key, self._switch(key, updated[0]))
                continue
            self.restarting.setdefault(victim.metadata.name, time.monotonic())
            kopf.info(self.body, reason="RollingRestart",
                      message=f"{key}: restarting {victim.metadata.name} (revision "
                              f"{(victim.metadata.labels or {}).get(REVISION_LABEL)} -> "
                              f"{revision}); the shard is in sync")
            await self.kube.delete("v1", "Pod", self.namespace, victim.metadata.name)

    async def _switch(self, key: str, to: str) -> None:
        self.controller._busy.discard(key)  # switchover marks the shard busy itself
        try:
            await self.controller.switchover(key, to)
        except (ShardqError, OSError, TimeoutError, RuntimeError) as exc:
            kopf.warn(self.body, reason="SwitchoverFailed", message=f"{key}: {exc}")

    async def _write_status(self, shards: dict[str, dict[str, Any]]) -> None:
        replicas = self.spec.replicas
        total = sum(1 for _ in shards) * replicas
        in_sync = sum(min(int(s["inSync"]), replicas) for s in shards.values())
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = rc.replication_conditions(shards, replicas, self.conditions, now)
        listed = [{"name": key, **entry} for key, entry in sorted(shards.items())]
        fields = {"shards": listed, "inSync": f"{in_sync}/{total}"}
        live = self.body.get("status") or {}
        mine = [(c["type"], c["status"], c["message"]) for c in conditions]
        theirs = [(c.get("type"), c.get("status"), c.get("message"))
                  for c in live.get("conditions") or []
                  if c.get("type") in ("Replicated", "Degraded", "NoQuorum")]
        if (live.get("shards"), live.get("inSync"), theirs) == (listed, fields["inSync"], mine):
            return
        fresh = (await self.kube.cluster(self.namespace, self.name) or {}).get("status") or {}
        keep = [c for c in fresh.get("conditions") or []
                if c.get("type") not in ("Replicated", "Degraded", "NoQuorum")]
        self.conditions = [*keep, *conditions]
        await self.kube.patch_status(self.namespace, self.name,
                                     {**fields, "conditions": self.conditions})
