"""The topology store of the operator: a ConfigMap written only with its ``resourceVersion``.

``store.TopologyStore`` on Kubernetes (DESIGN §9): the ConfigMap ``<cluster>-topology``
holds ``version`` (the store's counter, +1 per write) and ``topology`` (the wire JSON).
Every write is a ``PUT`` carrying the ``resourceVersion`` the writer read, which the API
server accepts only if nobody wrote the object since (else 409 Conflict): two operator
instances racing, or the failover controller and the rebalancer of one operator, can never
both win; the loser reads again (``store.update``). The first write is a create, which
the API server refuses (409 AlreadyExists) when another writer created it first.

The ConfigMap is owned by its ShardqCluster (deleted with it).

Must not: decide anything about the topology (controller.py and rebalance.py do).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shardq.wire.topology import Topology

from .store import Conflict


def store_name(cluster: str) -> str:
    return f"{cluster}-topology"


class KubeStore:
    def __init__(self, api: client.ApiClient, namespace: str, name: str,
                 owner: dict[str, Any] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace, self.name = namespace, name
        self.owner, self.labels = owner, labels or {}
        #: resourceVersion of each store version this instance read or wrote
        self._rv: dict[int, str] = {}

    async def read(self) -> tuple[int, Topology | None]:
        return await asyncio.to_thread(self._read)

    async def cas(self, version: int, topo: Topology) -> int:
        raw = orjson.dumps(topo.wire()).decode()
        return await asyncio.to_thread(self._cas, version, raw)

    def _read(self) -> tuple[int, Topology | None]:
        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return 0, None
            raise
        data = cm.data or {}
        version = int(data.get("version", 0))
        assert cm.metadata is not None
        self._remember(version, str(cm.metadata.resource_version))
        raw = data.get("topology")
        return version, Topology.from_wire(orjson.loads(raw)) if raw else None

    def _remember(self, version: int, rv: str) -> None:
        self._rv[version] = rv
        for old in [v for v in self._rv if v < version - 16]:
            del self._rv[old]

    def _cas(self, version: int, raw: str) -> int:
        data = {"version": str(version + 1), "topology": raw}
        cm: Any
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                "labels": self.labels}
        if self.owner is not None:
            meta["ownerReferences"] = [self.owner]
        if version == 0:
            try:
                cm = self.core.create_namespaced_config_map(
                    self.namespace, _body(meta, data))
            except ApiException as exc:
                if exc.status == 409:
                    raise Conflict(f"ConfigMap {self.name} was created by another writer "
                                   "first") from None
                raise
        else:
            rv = self._rv.get(version)
            if rv is None:  # a version this instance never saw: read it first
                current, _ = self._read()
                rv = self._rv.get(version)
                if current != version or rv is None:
                    raise Conflict(f"store at version {current}, not {version}")
            meta["resourceVersion"] = rv
            try:
                cm = self.core.replace_namespaced_config_map(
                    self.name, self.namespace, _body(meta, data))
            except ApiException as exc:
                if exc.status in (404, 409):
                    raise Conflict(f"ConfigMap {self.name} changed since resourceVersion "
                                   f"{rv} (store version {version})") from None
                raise
        self._remember(version + 1, str(cm.metadata.resource_version))
        return version + 1


def _body(meta: dict[str, Any], data: dict[str, str]) -> Any:
    """A ConfigMap as plain data (the client takes dicts as bodies; typed as its model)."""
    return {"metadata": meta, "data": data}
