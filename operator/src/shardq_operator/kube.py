"""The few Kubernetes API calls the operator makes, on the official client, off the loop.

Create-or-patch of owned manifests, the node StatefulSet as it is, pods of a
cluster, a secret's value, the status subresource, deletion of volume claims,
and API discovery (PodDisruptionBudget is ``policy/v1`` from Kubernetes 1.21,
``policy/v1beta1`` before). Every call runs in a thread
(``asyncio.to_thread``) because the client blocks.

Must not: decide anything; handlers.py does.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from .reconcile import GROUP, PLURAL, VERSION, Manifest


def load(kubeconfig: str | None) -> client.ApiClient:
    """An API client from a kubeconfig file, or from the pod's service account."""
    if kubeconfig:
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig)
        return api
    config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._dynamic: dynamic.DynamicClient | None = None
        self._pdb_version: str | None = None

    @property
    def dynamic(self) -> dynamic.DynamicClient:
        """Made on first use, in a worker thread: making it reads the API's discovery."""
        if self._dynamic is None:
            self._dynamic = dynamic.DynamicClient(self.api)  # type: ignore[no-untyped-call]
        return self._dynamic

    async def pdb_version(self) -> str:
        if self._pdb_version is None:
            def find() -> str:
                groups = client.ApisApi(self.api).get_api_versions().groups
                for g in groups:
                    if g.name == "policy":
                        versions = {v.version for v in g.versions}
                        return "policy/v1" if "v1" in versions else "policy/v1beta1"
                return "policy/v1beta1"
            self._pdb_version = await asyncio.to_thread(find)
        return self._pdb_version

    async def apply(self, manifest: Manifest) -> None:
        """Create ``manifest``, or patch the existing object to it (merge patch)."""
        await asyncio.to_thread(self._apply, manifest)

    def _apply(self, m: Manifest) -> None:
        resource = self.dynamic.resources.get(api_version=m["apiVersion"], kind=m["kind"])
        meta = m["metadata"]
        try:
            resource.patch(body=m, name=meta["name"], namespace=meta["namespace"],
                           content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status != 404:
                raise
            resource.create(body=m, namespace=meta["namespace"])

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete one object; False when it was gone already."""
        def call() -> bool:
            resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
            try:
                resource.delete(name=name, namespace=namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return True
        return await asyncio.to_thread(call)

    async def claim_usable(self, namespace: str, name: str) -> bool:
        """The PersistentVolumeClaim exists and is not being deleted."""
        claim = await _found(self.core.read_namespaced_persistent_volume_claim, name, namespace)
        return claim is not None and claim.metadata.deletion_timestamp is None

    async def cluster(self, namespace: str, name: str) -> Manifest | None:
        """The ShardqCluster as plain data, None when there is none."""
        def call() -> Manifest | None:
            try:
                obj: Any = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return dict(obj)
        return await asyncio.to_thread(call)

    async def statefulset(self, namespace: str, name: str) -> Manifest | None:
        """The StatefulSet as plain JSON data (camelCase keys), None when there is none."""
        sts = await _found(self.apps.read_namespaced_stateful_set, name, namespace)
        if sts is None:
            return None
        data: Manifest = self.api.sanitize_for_serialization(sts)  # type: ignore[no-untyped-call]
        return data

    async def statefulset_names(self, namespace: str, selector: dict[str, str]) -> list[str]:
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        res = await asyncio.to_thread(self.apps.list_namespaced_stateful_set, namespace,
                                      label_selector=text)
        return [str(s.metadata.name) for s in res.items if s.metadata is not None]

    async def container_env(self, namespace: str, deployment: str, name: str) -> str | None:
        """The value of env ``name`` in a Deployment's first container (None: no such thing)."""
        dep = await _found(self.apps.read_namespaced_deployment, deployment, namespace)
        pod = dep.spec.template.spec if dep is not None and dep.spec is not None else None
        for var in (pod.containers[0].env or []) if pod is not None else []:
            if var.name == name:
                return str(var.value or "")
        return None

    async def pods(self, namespace: str, selector: dict[str, str]) -> list[Any]:
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        res = await asyncio.to_thread(self.core.list_namespaced_pod, namespace,
                                      label_selector=text)
        return list(res.items)

    async def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = await _found(self.core.read_namespaced_secret, name, namespace)
        raw = (secret.data or {}).get(key) if secret is not None else None
        return base64.b64decode(raw).decode() if raw else None

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
            PLURAL, name, {"status": status})

    def _claims(self, namespace: str, selector: dict[str, str]) -> list[str]:
        """Names of the volume claims carrying every label of ``selector`` (blocking).

        The labels are checked here too: deleting data is the one thing that cannot be
        undone, so never trust a server (or a test double) that ignores the selector."""
        text = ",".join(f"{k}={v}" for k, v in selector.items())
        claims = self.core.list_namespaced_persistent_volume_claim(
            namespace, label_selector=text).items
        return [c.metadata.name for c in claims
                if c.metadata is not None and c.metadata.name and all(
                    (c.metadata.labels or {}).get(k) == v for k, v in selector.items())]

    async def claim_names(self, namespace: str, selector: dict[str, str]) -> list[str]:
        return await asyncio.to_thread(self._claims, namespace, selector)

    async def delete_claims(self, namespace: str, selector: dict[str, str]) -> int:
        def delete() -> int:
            names = self._claims(namespace, selector)
            for claim in names:
                try:
                    self.core.delete_namespaced_persistent_volume_claim(claim, namespace)
                except ApiException as exc:
                    if exc.status != 404:  # gone already: what was asked
                        raise
            return len(names)
        return await asyncio.to_thread(delete)


async def _found(read: Callable[..., Any], name: str, namespace: str) -> Any:
    """``read(name, namespace)`` in a worker thread; None when the object does not exist."""
    def call() -> Any:
        try:
            return read(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
    return await asyncio.to_thread(call)
