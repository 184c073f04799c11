"""What a ShardqCluster should look like in Kubernetes: pure functions from spec to objects.

No API calls here: ``objects(name, namespace, spec, ...)`` returns the manifests
the operator creates and keeps (headless Service, node StatefulSet, gateway
Deployment and Service, PodDisruptionBudgets), and ``plan`` says what a change
of ``spec.nodes`` needs in which order. Plain data in, plain data out, so the
unit tests check it without a cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

GROUP = "shardq.io"
VERSION = "v1alpha1"
KIND = "ShardqCluster"
PLURAL = "shardqclusters"
TCP_PORT = 6789
#: the node StatefulSet's volumeClaimTemplate (claims are named data-<sts>-<ordinal>)
CLAIM = "data"
HTTP_PORT = 6790
#: The image's unprivileged user and group (Dockerfile: ``USER 10001:10001``).
RUN_AS = 10001

Manifest = dict[str, Any]


@dataclass
class Spec:
    """``ShardqCluster.spec`` with its defaults (the CRD schema documents each field)."""

    nodes: int = 3
    #: Members of each shard (1, 3 or 5); 1 is the unreplicated StatefulSet of ``nodes`` pods.
    replicas: int = 1
    #: A primary silent this long is replaced (replicated shards), in milliseconds.
    failure_timeout_ms: int = 2000
    image: str = "localhost/shardq:latest"
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
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
            replicas=int(raw.get("replicas", 1)),
            failure_timeout_ms=int((raw.get("replication") or {}).get("failureTimeoutMs", 2000)),
            image=raw.get("image") or cls.image,
            image_pull_policy=raw.get("imagePullPolicy") or cls.image_pull_policy,
            image_pull_secrets=[str(ref["name"]) for ref in raw.get("imagePullSecrets") or []
                                if isinstance(ref, dict) and ref.get("name")],
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


def _auth_env(spec: Spec, cluster_token: bool) -> list[Manifest]:
    """The client token for every pod; the cluster token only for nodes (they run slot moves
    with it), and required: a client token never runs internal commands, so a node without
    one could never take part in a move. Gateways need client rights only."""
    if not spec.auth_secret:
        return []
    env: list[Manifest] = [
        {"name": "SHARDQ_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.auth_secret, "key": spec.token_key}}},
    ]
    if cluster_token:
        env.append({"name": "SHARDQ_CLUSTER_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.auth_secret, "key": spec.cluster_token_key}}})
    return env


def _probe(path: str) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 5,
            "timeoutSeconds": 2, "failureThreshold": 3}


def container_security_context() -> Manifest:
    """Of the node and gateway containers: the "restricted" Pod Security Standard.

    The root filesystem is read-only: a node writes only under its volume (``/data``:
    WAL, snapshots, topology, blobs), a gateway writes no file, and the image sets
    ``PYTHONDONTWRITEBYTECODE``. ``/tmp`` is a small emptyDir for libraries that want one.
    """
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Manifest:
    """Of the node and gateway pods: the image's user, and ``fsGroup`` so it can write the PVC."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        # re-own the volume only when its root is not ours yet: not every WAL segment and
        # blob on every start
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _tmp_volume() -> Manifest:
    return {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}


def _pod_spec(spec: Spec, container: Manifest, **extra: Any) -> Manifest:
    pod: Manifest = {"containers": [container], **extra, "volumes": [_tmp_volume()],
                     "securityContext": pod_security_context()}
    # always written, [] included: the operator applies with a merge patch, where a missing
    # key would leave secrets removed from the spec in place
    pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return pod


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


def statefulset(cluster: str, namespace: str, spec: Spec, replicas: int,
                with_claims: bool = True) -> Manifest:
    """The nodes. ``replicas`` may exceed ``spec.nodes`` while a scale-down moves slots off.

    ``with_claims=False`` leaves ``volumeClaimTemplates`` out: what the operator patches onto
    an existing StatefulSet, whose claim templates the API server refuses to change (a merge
    patch without the field keeps them as they are).
    """
    container = {
        "name": "node",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["shardq", "node"],
        "args": ["--name", "$(POD_NAME)", "--host", "0.0.0.0", "--port", str(TCP_PORT),
                 "--http-port", str(HTTP_PORT), "--data-dir", "/data", "--fsync", spec.fsync],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                *_auth_env(spec, cluster_token=True)],
        "ports": _ports(),
        "readinessProbe": _probe("/ready"),
        "livenessProbe": {**_probe("/health"), "failureThreshold": 6},
        # /health answers once recovery is done, which takes seconds per million jobs: up
        # to 10 minutes before liveness starts counting
        "startupProbe": {**_probe("/health"), "failureThreshold": 120},
        "volumeMounts": [{"name": CLAIM, "mountPath": "/data"},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "resources": spec.node_resources,
        "securityContext": container_security_context(),
    }
    claim: Manifest = {
        "metadata": {"name": CLAIM, "labels": labels(cluster, "node")},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": spec.storage_size}}},
    }
    if spec.storage_class:
        claim["spec"]["storageClassName"] = spec.storage_class
    sts: Manifest = {
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
                "spec": _pod_spec(spec, container, terminationGracePeriodSeconds=30),
            },
            "volumeClaimTemplates": [claim],
        },
    }
    if not with_claims:
        del sts["spec"]["volumeClaimTemplates"]
    return sts


#: A gateway's drain on SIGTERM (shardq_gateway.drain, docs/kubernetes.md): its default
#: bound is 20 s (``--drain-timeout``), well inside this.
GATEWAY_GRACE_SECONDS = 30


def gateway_deployment(cluster: str, namespace: str, spec: Spec, seeds: list[str]) -> Manifest:
    """A rolling update starts the new gateway first (``maxSurge: 1``, ``maxUnavailable: 0``);
    the old one, on SIGTERM, fails ``/ready`` at once (probed every 2 s, out after two
    failures), serves as usual for its ``--drain-delay`` while endpoint removal reaches
    every kube-proxy, then drains its connections within ``GATEWAY_GRACE_SECONDS``."""
    container = {
        "name": "gateway",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["shardq", "gateway"],
        "args": ["--host", "0.0.0.0", "--port", str(TCP_PORT), "--http-port", str(HTTP_PORT)],
        "env": [{"name": "SHARDQ_SEED", "value": ",".join(seeds)},
                *_auth_env(spec, cluster_token=False)],
        "ports": _ports(),
        "readinessProbe": {**_probe("/ready"), "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**_probe("/health"), "failureThreshold": 6},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "resources": spec.gateway_resources,
        "securityContext": container_security_context(),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": gateway_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "gateway")},
        "spec": {
            "replicas": spec.gateway_replicas,
            "selector": {"matchLabels": labels(cluster, "gateway")},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(cluster, "gateway"),
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(HTTP_PORT)}},
                "spec": _pod_spec(spec, container,
                                  terminationGracePeriodSeconds=GATEWAY_GRACE_SECONDS),
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
    # one gateway down at a time; written for every replica count (maxUnavailable, not
    # minAvailable): a budget left from more replicas must never block a drain at one
    out.append({
        "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
        "metadata": {"name": gateway_name(cluster), "namespace": namespace,
                     "labels": labels(cluster, "gateway")},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(cluster, "gateway")}},
    })
    return out


def objects(cluster: str, namespace: str, spec: Spec, replicas: int,
            seeds: list[str], with_claims: bool = True) -> list[Manifest]:
    """Every object the operator owns for one ShardqCluster."""
    return [
        headless_service(cluster, namespace),
        statefulset(cluster, namespace, spec, replicas, with_claims),
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


def nodes_with_data(cluster: str, claim_names: list[str]) -> int:
    """How many node pods the claims cover: highest ordinal + 1 (claims are
    ``data-<cluster>-node-<i>``, made by the StatefulSet from its volumeClaimTemplate)."""
    prefix = f"{CLAIM}-{node_name(cluster)}-"
    ordinals = [int(n[len(prefix):]) for n in claim_names
                if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return max(ordinals) + 1 if ordinals else 0


def plan(cluster: str, current_replicas: int, wanted: int) -> Plan:
    """Up: pods first, then slots. Down: slots off the leaving pods first, then pods."""
    members = [f"{node_name(cluster)}-{i}" for i in range(wanted)]
    return Plan(replicas_first=max(current_replicas, wanted), members=members,
                replicas_after=wanted)


# -- storage: fixed once the StatefulSet exists ---------------------------------------------------

_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIXES = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
             "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
             "P": Decimal("1e15"), "E": Decimal("1e18"),
             **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(["Ki", "Mi", "Gi", "Ti", "Pi",
                                                                  "Ei"])}}


def quantity(text: str) -> Decimal | None:
    """A Kubernetes quantity's value ("1Gi" -> 1073741824), None when it does not parse.

    The API server keeps quantities in a canonical form ("1024Mi" comes back "1Gi"), so
    sizes are compared by value, never as strings.
    """
    m = _QUANTITY.match(str(text).strip())
    if m is None:
        return None
    number, suffix = m.group(1), m.group(2) or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIXES[suffix]
    except (InvalidOperation, KeyError):
        return None


def storage_changes(spec: Spec, live: Manifest) -> list[str]:
    """How ``spec.storage`` differs from the claim template of the live StatefulSet ``live``.

    One message per field, naming it. Empty when they agree (or the StatefulSet has no
    ``data`` claim template to compare with).
    """
    templates = (live.get("spec") or {}).get("volumeClaimTemplates") or []
    claim = next((t for t in templates if (t.get("metadata") or {}).get("name") == CLAIM), None)
    if claim is None:
        return []
    claim_spec = claim.get("spec") or {}
    out = []
    live_class = claim_spec.get("storageClassName")
    if (spec.storage_class or None) != (live_class or None):
        out.append(f"spec.storage.storageClassName is {spec.storage_class or '(unset)'} but "
                   f"the node volumes were made with {live_class or '(unset)'}")
    live_size = (((claim_spec.get("resources") or {}).get("requests") or {}).get("storage"))
    if live_size is not None and quantity(spec.storage_size) != quantity(str(live_size)):
        out.append(f"spec.storage.size is {spec.storage_size} but the node volumes were made "
                   f"with {live_size}")
    return out


# -- status conditions ------------------------------------------------------------------------


def condition(kind: str, ok: bool, reason: str, message: str,
              previous: list[Manifest] | None, now: str) -> Manifest:
    """A status condition; ``lastTransitionTime`` moves only when its status changes."""
    status = "True" if ok else "False"
    old = next((c for c in previous or [] if isinstance(c, dict) and c.get("type") == kind),
               None)
    since = now
    if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
        since = str(old["lastTransitionTime"])
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since}


def ready_condition(ready_nodes: int, wanted: int, slots_moving: int,
                    previous: list[Manifest] | None, now: str) -> Manifest:
    """``Ready``: every wanted node pod Ready and no slot moving."""
    if slots_moving:
        return condition("Ready", False, "SlotsMoving", f"{slots_moving} slots still moving",
                         previous, now)
    if ready_nodes != wanted:
        return condition("Ready", False, "NodesNotReady",
                         f"{ready_nodes}/{wanted} node pods Ready", previous, now)
    return condition("Ready", True, "Converged",
                     f"{wanted}/{wanted} node pods Ready, no slot moving", previous, now)


def storage_condition(changes: list[str], previous: list[Manifest] | None,
                      now: str) -> Manifest:
    """``StorageInSync``: False while ``spec.storage`` asks for what the volumes are not."""
    if changes:
        return condition("StorageInSync", False, "StorageImmutable",
                         "; ".join(changes) + ": a StatefulSet's volume claim templates "
                         "cannot change, so the volumes stay as they are (migrate the data "
                         "to a new ShardqCluster, or set spec.storage back)", previous, now)
    return condition("StorageInSync", True, "Unchanged",
                     "the node volumes match spec.storage", previous, now)


# -- replicated shards: one StatefulSet per shard ---------------------------------------------

#: The label naming a node pod's shard (replicated clusters): the StatefulSet's selector,
#: the topology spread and the shard's PodDisruptionBudget key on it.
SHARD_LABEL = "shardq.io/shard"
#: ``spec.replicas`` the operator accepts (the CRD schema says the same).
REPLICA_CHOICES = (1, 3, 5)


def shard_key(index: int) -> str:
    """The shard's name in the topology: ``shard-<i>``."""
    return f"shard-{index}"


def shard_set_name(cluster: str, index: int) -> str:
    """The shard's StatefulSet (and PodDisruptionBudget): ``<cluster>-shard-<i>``; its pods,
    the shard's members, are ``<cluster>-shard-<i>-<j>``."""
    return f"{cluster}-{shard_key(index)}"


def shard_labels(cluster: str, index: int) -> dict[str, str]:
    return {**labels(cluster, "node"), SHARD_LABEL: shard_key(index)}


def shard_index(cluster: str, name: str) -> int | None:
    """``<cluster>-shard-<i>`` (a StatefulSet) or ``shard-<i>`` (a topology shard) -> i."""
    for prefix in (f"{cluster}-shard-", "shard-"):
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        if rest.isdigit():
            return int(rest)
    return None


def shard_members(cluster: str, index: int, replicas: int) -> list[str]:
    return [f"{shard_set_name(cluster, index)}-{j}" for j in range(replicas)]


def shard_statefulset(cluster: str, namespace: str, spec: Spec, index: int,
                      with_claims: bool = True) -> Manifest:
    """Shard ``index``'s members: ``spec.replicas`` pods of one StatefulSet.

    ``updateStrategy: OnDelete``: the StatefulSet controller never restarts a member on its
    own; the operator deletes them one at a time (followers first, the primary after a
    switchover, each once the shard is in sync), so a rolling restart never costs the shard
    its quorum. The members spread over Kubernetes nodes (``topologySpreadConstraints`` by
    shard, ``maxSkew: 1``, ``DoNotSchedule``): on three nodes or more no two members of a
    shard share one; on fewer they share what there is.
    """
    sts = statefulset(cluster, namespace, spec, spec.replicas, with_claims)
    own = shard_labels(cluster, index)
    name = shard_set_name(cluster, index)
    sts["metadata"]["name"] = name
    sts["metadata"]["labels"] = own
    sts["spec"]["selector"] = {"matchLabels": own}
    sts["spec"]["updateStrategy"] = {"type": "OnDelete"}
    template = sts["spec"]["template"]
    template["metadata"]["labels"] = own
    pod = template["spec"]
    pod["topologySpreadConstraints"] = [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": own}}]
    container = pod["containers"][0]
    container["args"] = [*container["args"], "--failure-timeout-ms",
                         str(spec.failure_timeout_ms)]
    # a follower owns no slots of its own: /ready would keep it out of the headless
    # Service's ready addresses, which nobody needs here (the operator, the primary and
    # the gateways address members by pod IP), so readiness asks only for a live process
    container["readinessProbe"] = {**_probe("/health"), "periodSeconds": 2}
    if with_claims:
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"] = own
    return sts


def shard_budget(cluster: str, namespace: str, index: int) -> Manifest:
    """At most one member of the shard down at a time (R = 3 keeps its quorum of 2; R = 5
    keeps 4, one more than its quorum, for an unplanned failure during a drain)."""
    return {
        "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
        "metadata": {"name": shard_set_name(cluster, index), "namespace": namespace,
                     "labels": shard_labels(cluster, index)},
        "spec": {"maxUnavailable": 1,
                 "selector": {"matchLabels": shard_labels(cluster, index)}},
    }


def replicated_objects(cluster: str, namespace: str, spec: Spec, shards: int,
                       seeds: list[str], with_claims: bool = True) -> list[Manifest]:
    """Every object the operator owns for a replicated ShardqCluster with ``shards`` shards
    (more than ``spec.nodes`` while a scale-down moves slots off the leaving ones)."""
    out = [headless_service(cluster, namespace), gateway_service(cluster, namespace, spec),
           gateway_deployment(cluster, namespace, spec, seeds),
           disruption_budgets(cluster, namespace, spec)[1]]
    for i in range(shards):
        out.append(shard_statefulset(cluster, namespace, spec, i, with_claims))
        out.append(shard_budget(cluster, namespace, i))
    return out


def replication_conditions(shards: dict[str, dict[str, Any]], replicas: int,
                           previous: list[Manifest] | None, now: str) -> list[Manifest]:
    """``Replicated``, ``Degraded`` and ``NoQuorum`` from each shard's status entry
    (``inSync``: members holding everything committed, the primary included; ``quorum``)."""
    short = {n: s for n, s in shards.items() if int(s.get("inSync", 0)) < replicas}
    lost = {n: s for n, s in shards.items() if not s.get("quorum")}
    def names(d: dict[str, Any]) -> str:
        return ", ".join(f"{n} ({s.get('inSync', 0)}/{replicas})" for n, s in sorted(d.items()))
    return [
        condition("Replicated", not short and bool(shards),
                  "AllInSync" if not short and shards else "MembersBehind",
                  f"every shard has {replicas}/{replicas} members in sync" if not short
                  else f"not every member in sync: {names(short)}", previous, now),
        condition("Degraded", bool(short), "MembersBehind" if short else "AllInSync",
                  f"shards with members missing or catching up: {names(short)}" if short
                  else "no shard is missing a member", previous, now),
        condition("NoQuorum", bool(lost), "QuorumLost" if lost else "QuorumHeld",
                  f"shards without a primary holding a quorum: {names(lost)}" if lost
                  else "every shard has a primary with its quorum", previous, now),
    ]
