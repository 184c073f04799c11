"""What the operator reads of its pods and owners: addresses, reachability, owner references.

Must not: write to the API server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from shardq.wire.topology import NodeInfo

from . import reconcile as rc


def owner_reference(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": f"{rc.GROUP}/{rc.VERSION}", "kind": rc.KIND,
            "name": body["metadata"]["name"], "uid": body["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}


def running_ip(pod: Any) -> str | None:
    """The pod's IP once it runs (a terminating pod still counts)."""
    if pod.status is None or pod.status.phase != "Running" or not pod.status.pod_ip:
        return None
    return str(pod.status.pod_ip)


def pod_ip(pod: Any) -> str | None:
    """The pod's IP while it runs and is not being deleted."""
    if pod.metadata.deletion_timestamp is not None:
        return None
    return running_ip(pod)


def pod_info(pod: Any) -> NodeInfo | None:
    ip = pod_ip(pod)
    if ip is None:
        return None
    return NodeInfo(pod.metadata.name, f"{ip}:{rc.TCP_PORT}", f"{ip}:{rc.HTTP_PORT}")


async def reachable(address: str, timeout: float) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True
