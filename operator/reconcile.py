"""What a ShardqCluster should look like in Kubernetes: pure functions from spec to objects.

No API calls here: ``objects(name, namespace, spec, ...)`` returns the manifests
the operator creates and keeps (headless Service, node StatefulSet, gateway
Deployment and Service, PodDisruptionBudgets), and ``plan`` says what a change
of ``spec.nodes`` needs in which order. Plain data in, plain data out, so the
unit tests check it without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUP = "shardq.io"
VERSION = "v1alpha1"
KIND = "ShardqCluster"
PLURAL = "shardqclusters"
TCP_PORT = 6789
HTTP_PORT = 6790

Manifest = dict[str, Any]


@dataclass
class Spec:
    """``ShardqCluster.spec`` with its defaults (the CRD schema documents each field)."""

    nodes: int = 3
    image: str = "localhost/shardq:latest"
    image_pull_policy: str = "IfNotPresent"
    gateway_replicas: int = 2
    service_type: str = "ClusterIP"
    storage_class: str | None = None
    storage_size: str = "1Gi"
    fsync: str = "always"
    node_resources: dict[str, Any] = field(default_factory=dict)
    gateway_resources: dict[str, Any] = field(default_factory=dict)
    auth_secret: str | None = None
    token_key: str = "token"
    cluster_token_key: str = "cluster-token"
    metrics_port_name: str = "http"
    delete_volumes: bool = False

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Spec:
        gw = raw.get("gateway") or {}
        storage = raw.get("storage") or {}
        res = raw.get("resources") or {}
        auth = raw.get("auth") or {}
        return cls(
            nodes=int(raw.get("nodes", 3)),
            image=raw.get("image") or cls.image,
            image_pull_policy=raw.get("imagePullPolicy") or cls.image_pull_policy,
            gateway_replicas=int(gw.get("replicas", 2)),
            service_type=(gw.get("service") or {}).get("type", "ClusterIP"),
            storage_class=storage.get("storageClassName"),
            storage_size=storage.get("size") or cls.storage_size,
            fsync=raw.get("fsync") or "always",
            node_resources=res.get("node") or {},
            gateway_resources=res.get("gateway") or {},
            auth_secret=auth.get("secretName"),
            token_key=auth.get("tokenKey") or "token",
            cluster_token_key=auth.get("clusterTokenKey") or "cluster-token",
            delete_volumes=bool((raw.get("deletion") or {}).get("deleteVolumes", False)),
        )


def node_name(cluster: str) -> str:
    return f"{cluster}-node"


def gateway_name(cluster: str) -> str:
    return f"{cluster}-gateway"


def labels(cluster: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "shardq",
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "shardq-operator",
    }


def _ports() -> list[Manifest]:
    return [
        {"name": "tcp", "containerPort": TCP_PORT, "protocol": "TCP"},
        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
    ]


def _service_ports() -> list[Manifest]:
    return [
        {"name": "tcp", "port": TCP_PORT, "targetPort": "tcp", "protocol": "TCP"},
        {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
    ]


def _auth_env(spec: Spec) -> list[Manifest]:
    if not spec.auth_secret:
        return []
    return [
        {"name": "SHARDQ_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.auth_secret, "key": spec.token_key}}},
        {"name": "SHARDQ_CLUSTER_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.auth_secret, "key": spec.cluster_token_key, "optional": True}}},
    ]


def _probe(path: str) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 5,
            "timeoutSeconds": 2, "failureThreshold": 3}


def headless_service(cluster: str, namespace: str) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": node_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "node")},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # a new node is reachable before it owns slots
            "selector": labels(cluster, "node"),
            "ports": _service_ports(),
        },
    }


def statefulset(cluster: str, namespace: str, spec: Spec, replicas: int) -> Manifest:
    """The nodes. ``replicas`` may exceed ``spec.nodes`` while a scale-down moves slots off."""
    container = {
        "name": "node",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["shardq", "node"],
        "args": ["--name", "$(POD_NAME)", "--host", "0.0.0.0", "--port", str(TCP_PORT),
                 "--http-port", str(HTTP_PORT), "--data-dir", "/data", "--fsync", spec.fsync],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                *_auth_env(spec)],
        "ports": _ports(),
        "readinessProbe": _probe("/ready"),
        "livenessProbe": {**_probe("/health"), "failureThreshold": 6},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "resources": spec.node_resources,
    }
    claim: Manifest = {
        "metadata": {"name": "data", "labels": labels(cluster, "node")},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": spec.storage_size}}},
    }
    if spec.storage_class:
        claim["spec"]["storageClassName"] = spec.storage_class
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": node_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "node")},
        "spec": {
            "serviceName": node_name(cluster),
            "replicas": replicas,
            # every pod at once: a new node is not Ready until slots move to it, and the
            # operator moves them only once it runs, so OrderedReady would wait forever
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(cluster, "node")},
            "template": {
                "metadata": {"labels": labels(cluster, "node"),
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(HTTP_PORT)}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 30,
                         "securityContext": {"runAsNonRoot": True, "fsGroup": 10001}},
            },
            "volumeClaimTemplates": [claim],
        },
    }


def gateway_deployment(cluster: str, namespace: str, spec: Spec, seeds: list[str]) -> Manifest:
    container = {
        "name": "gateway",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["shardq", "gateway"],
        "args": ["--host", "0.0.0.0", "--port", str(TCP_PORT), "--http-port", str(HTTP_PORT)],
        "env": [{"name": "SHARDQ_SEED", "value": ",".join(seeds)}, *_auth_env(spec)],
        "ports": _ports(),
        "readinessProbe": _probe("/ready"),
        "livenessProbe": {**_probe("/health"), "failureThreshold": 6},
        "resources": spec.gateway_resources,
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": gateway_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "gateway")},
        "spec": {
            "replicas": spec.gateway_replicas,
            "selector": {"matchLabels": labels(cluster, "gateway")},
            "template": {
                "metadata": {"labels": labels(cluster, "gateway"),
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(HTTP_PORT)}},
                "spec": {"containers": [container],
                         "securityContext": {"runAsNonRoot": True}},
            },
        },
    }


def gateway_service(cluster: str, namespace: str, spec: Spec) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": gateway_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "gateway")},
        "spec": {"type": spec.service_type, "selector": labels(cluster, "gateway"),
                 "ports": _service_ports()},
    }


def disruption_budgets(cluster: str, namespace: str, spec: Spec) -> list[Manifest]:
    out = [{
        "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
        "metadata": {"name": node_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "node")},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(cluster, "node")}},
    }]
    if spec.gateway_replicas > 1:
        out.append({
            "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
            "metadata": {"name": gateway_name(cluster), "namespace": namespace,
                         "labels": labels(cluster, "gateway")},
            "spec": {"minAvailable": 1,
                     "selector": {"matchLabels": labels(cluster, "gateway")}},
        })
    return out


def objects(cluster: str, namespace: str, spec: Spec, replicas: int,
            seeds: list[str]) -> list[Manifest]:
    """Every object the operator owns for one ShardqCluster."""
    return [
        headless_service(cluster, namespace),
        statefulset(cluster, namespace, spec, replicas),
        gateway_service(cluster, namespace, spec),
        gateway_deployment(cluster, namespace, spec, seeds),
        *disruption_budgets(cluster, namespace, spec),
    ]


@dataclass
class Plan:
    """How to get from the nodes that exist to ``spec.nodes``."""

    replicas_first: int  # StatefulSet replicas before moving slots
    members: list[str]  # pod names that must own the slots afterwards
    replicas_after: int  # StatefulSet replicas once the slots moved

    @property
    def scaling(self) -> bool:
        return self.replicas_first != self.replicas_after


def plan(cluster: str, current_replicas: int, wanted: int) -> Plan:
    """Up: pods first, then slots. Down: slots off the leaving pods first, then pods."""
    members = [f"{node_name(cluster)}-{i}" for i in range(wanted)]
    return Plan(replicas_first=max(current_replicas, wanted), members=members,
                replicas_after=wanted)
