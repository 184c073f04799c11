"""shardq_operator.reconcile: the manifests a ShardqCluster spec turns into, and the scaling plan.

Pure functions, so these are plain tests without a cluster: names and labels,
selectors that match their pod templates, ports Kubernetes 1.20 accepts
(``protocol: TCP`` everywhere), the node StatefulSet (``Parallel`` pods,
volumeClaimTemplates, auth env from the Secret, probes), the gateway's seeds,
``Spec.parse`` defaults and every field, and the order of a scale; the pods'
security contexts (the restricted Pod Security Standard) and pull secrets; the
storage fields an existing StatefulSet cannot take (compared by quantity
value); the ``Ready`` and ``StorageInSync`` conditions, and that the CRD's
status schema takes what the operator writes.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shardq_gateway.settings import GatewaySettings
from shardq_operator import reconcile as rc

CRD_FILE = Path(__file__).resolve().parents[2] / "charts" / "shardq" / "crds" / "shardqcluster.yaml"

FULL_SPEC: dict[str, Any] = {
    "nodes": 5,
    "image": "registry.example/shardq:1.2.3",
    "imagePullPolicy": "Always",
    "imagePullSecrets": [{"name": "registry-credentials"}, {"name": "mirror"}],
    "gateway": {"replicas": 3, "service": {"type": "LoadBalancer"}},
    "storage": {"storageClassName": "fast-ssd", "size": "20Gi"},
    "fsync": "everysec",
    "resources": {
        "node": {"requests": {"cpu": "500m", "memory": "1Gi"}},
        "gateway": {"limits": {"cpu": "1"}},
    },
    "auth": {"secretName": "shardq-auth", "tokenKey": "client", "clusterTokenKey": "internal"},
    "deletion": {"deleteVolumes": True},
}


def by_kind(manifests: list[rc.Manifest]) -> dict[tuple[str, str], rc.Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def container(manifest: rc.Manifest) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in c["env"]}


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# -- Spec.parse -----------------------------------------------------------------------------------


def test_spec_parse_of_an_empty_spec_gives_the_documented_defaults() -> None:
    spec = rc.Spec.parse({})
    assert spec == rc.Spec()
    assert spec.nodes == 3
    assert spec.image == "localhost/shardq:latest"
    assert spec.image_pull_policy == "IfNotPresent"
    assert spec.image_pull_secrets == []
    assert spec.gateway_replicas == 2
    assert spec.service_type == "ClusterIP"
    assert spec.storage_class is None
    assert spec.storage_size == "1Gi"
    assert spec.fsync == "always"
    assert spec.node_resources == {} and spec.gateway_resources == {}
    assert spec.auth_secret is None
    assert spec.token_key == "token" and spec.cluster_token_key == "cluster-token"
    assert spec.metrics_port_name == "http"
    assert spec.delete_volumes is False


def test_spec_parse_reads_every_field() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    assert spec.nodes == 5
    assert spec.image == "registry.example/shardq:1.2.3"
    assert spec.image_pull_policy == "Always"
    assert spec.image_pull_secrets == ["registry-credentials", "mirror"]
    assert spec.gateway_replicas == 3
    assert spec.service_type == "LoadBalancer"
    assert spec.storage_class == "fast-ssd"
    assert spec.storage_size == "20Gi"
    assert spec.fsync == "everysec"
    assert spec.node_resources == {"requests": {"cpu": "500m", "memory": "1Gi"}}
    assert spec.gateway_resources == {"limits": {"cpu": "1"}}
    assert spec.auth_secret == "shardq-auth"
    assert spec.token_key == "client"
    assert spec.cluster_token_key == "internal"
    assert spec.delete_volumes is True


def test_spec_parse_takes_numbers_as_strings_and_nulls_as_defaults() -> None:
    spec = rc.Spec.parse({"nodes": "4", "gateway": {"replicas": "1"}, "storage": None,
                          "resources": None, "auth": None, "image": None, "fsync": None})
    assert spec.nodes == 4 and spec.gateway_replicas == 1
    assert spec.storage_size == "1Gi" and spec.storage_class is None
    assert spec.image == "localhost/shardq:latest" and spec.fsync == "always"
    assert spec.auth_secret is None


def test_auth_without_key_names_uses_the_default_keys() -> None:
    spec = rc.Spec.parse({"auth": {"secretName": "s"}})
    assert (spec.auth_secret, spec.token_key, spec.cluster_token_key) == (
        "s", "token", "cluster-token")


# -- objects ----------------------------------------------------------------------------------


def test_objects_are_the_headless_service_statefulset_gateway_and_pdbs() -> None:
    objs = rc.objects("demo", "queues", rc.Spec(), 3, ["10.0.0.1:6789"])
    assert [(m["apiVersion"], m["kind"], m["metadata"]["name"]) for m in objs] == [
        ("v1", "Service", "demo-node"),
        ("apps/v1", "StatefulSet", "demo-node"),
        ("v1", "Service", "demo-gateway"),
        ("apps/v1", "Deployment", "demo-gateway"),
        ("policy/v1beta1", "PodDisruptionBudget", "demo-node"),
        ("policy/v1beta1", "PodDisruptionBudget", "demo-gateway"),
    ]
    for m in objs:
        assert m["metadata"]["namespace"] == "queues"
        component = "gateway" if m["metadata"]["name"].endswith("gateway") else "node"
        assert m["metadata"]["labels"] == rc.labels("demo", component)


def test_labels_name_the_app_instance_component_and_manager() -> None:
    assert rc.labels("demo", "node") == {
        "app.kubernetes.io/name": "shardq",
        "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "node",
        "app.kubernetes.io/managed-by": "shardq-operator",
    }
    assert rc.node_name("demo") == "demo-node" and rc.gateway_name("demo") == "demo-gateway"


def test_every_selector_matches_its_pod_template_and_no_other_component() -> None:
    objs = by_kind(rc.objects("demo", "ns", rc.Spec(), 3, ["a:1"]))
    sts, dep = objs["StatefulSet", "demo-node"], objs["Deployment", "demo-gateway"]
    node_pods = sts["spec"]["template"]["metadata"]["labels"]
    gw_pods = dep["spec"]["template"]["metadata"]["labels"]

    def matches(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    for selector, mine, other in [
        (sts["spec"]["selector"]["matchLabels"], node_pods, gw_pods),
        (objs["Service", "demo-node"]["spec"]["selector"], node_pods, gw_pods),
        (objs["PodDisruptionBudget", "demo-node"]["spec"]["selector"]["matchLabels"],
         node_pods, gw_pods),
        (dep["spec"]["selector"]["matchLabels"], gw_pods, node_pods),
        (objs["Service", "demo-gateway"]["spec"]["selector"], gw_pods, node_pods),
        (objs["PodDisruptionBudget", "demo-gateway"]["spec"]["selector"]["matchLabels"],
         gw_pods, node_pods),
    ]:
        assert matches(selector, mine)
        assert not matches(selector, other)
    # two clusters in one namespace never select each other's pods
    other_cluster = rc.statefulset("other", "ns", rc.Spec(), 1)
    assert not matches(sts["spec"]["selector"]["matchLabels"],
                       other_cluster["spec"]["template"]["metadata"]["labels"])


def test_every_port_says_protocol_tcp_and_service_ports_target_named_container_ports() -> None:
    objs = by_kind(rc.objects("demo", "ns", rc.Spec(), 3, ["a:1"]))
    for key in [("StatefulSet", "demo-node"), ("Deployment", "demo-gateway")]:
        ports = container(objs[key])["ports"]
        assert ports == [
            {"name": "tcp", "containerPort": 6789, "protocol": "TCP"},
            {"name": "http", "containerPort": 6790, "protocol": "TCP"},
        ]
    for key in [("Service", "demo-node"), ("Service", "demo-gateway")]:
        assert objs[key]["spec"]["ports"] == [
            {"name": "tcp", "port": 6789, "targetPort": "tcp", "protocol": "TCP"},
            {"name": "http", "port": 6790, "targetPort": "http", "protocol": "TCP"},
        ]


def test_the_headless_service_publishes_nodes_before_they_are_ready() -> None:
    svc = rc.headless_service("demo", "ns")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_the_gateway_service_takes_its_type_from_the_spec() -> None:
    assert rc.gateway_service("demo", "ns", rc.Spec())["spec"]["type"] == "ClusterIP"
    spec = rc.Spec.parse({"gateway": {"service": {"type": "NodePort"}}})
    assert rc.gateway_service("demo", "ns", spec)["spec"]["type"] == "NodePort"


def test_the_statefulset_runs_nodes_in_parallel_with_a_claim_template() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    sts = rc.statefulset("demo", "ns", spec, 7)
    assert sts["spec"]["replicas"] == 7  # may exceed spec.nodes while slots move off
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "demo-node"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    c = container(sts)
    assert c["volumeMounts"] == [{"name": "data", "mountPath": "/data"},
                                 {"name": "tmp", "mountPath": "/tmp"}]
    assert arg_after(c["args"], "--data-dir") == "/data"


def test_a_statefulset_patch_leaves_the_immutable_claim_templates_out() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    full = rc.statefulset("demo", "ns", spec, 5)
    patch = rc.statefulset("demo", "ns", spec, 5, with_claims=False)
    assert "volumeClaimTemplates" not in patch["spec"]
    assert {k: v for k, v in full["spec"].items() if k != "volumeClaimTemplates"} == patch["spec"]
    objs = by_kind(rc.objects("demo", "ns", spec, 5, ["a:1"], with_claims=False))
    assert "volumeClaimTemplates" not in objs["StatefulSet", "demo-node"]["spec"]
    objs = by_kind(rc.objects("demo", "ns", spec, 5, ["a:1"]))
    assert objs["StatefulSet", "demo-node"]["spec"]["volumeClaimTemplates"]


def test_without_a_storage_class_the_claim_uses_the_cluster_default() -> None:
    [claim] = rc.statefulset("demo", "ns", rc.Spec(), 3)["spec"]["volumeClaimTemplates"]
    assert "storageClassName" not in claim["spec"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "1Gi"}}


def test_the_node_container_runs_shardq_node_named_after_its_pod() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    c = container(rc.statefulset("demo", "ns", spec, 5))
    assert c["name"] == "node"
    assert c["image"] == "registry.example/shardq:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert c["command"] == ["shardq", "node"]
    args = c["args"]
    assert arg_after(args, "--name") == "$(POD_NAME)"
    assert arg_after(args, "--host") == "0.0.0.0"
    assert arg_after(args, "--port") == "6789"
    assert arg_after(args, "--http-port") == "6790"
    assert arg_after(args, "--fsync") == "everysec"
    assert env_of(c)["POD_NAME"] == {
        "name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}}
    # $(POD_NAME) may only refer to a variable defined before use: it is the first
    assert c["env"][0]["name"] == "POD_NAME"


def test_auth_env_gives_nodes_the_cluster_token_and_gateways_only_the_client_token() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    node = env_of(container(rc.statefulset("demo", "ns", spec, 5)))
    gateway = env_of(container(rc.gateway_deployment("demo", "ns", spec, ["a:1"])))
    for env in (node, gateway):
        assert env["SHARDQ_TOKEN"]["valueFrom"] == {
            "secretKeyRef": {"name": "shardq-auth", "key": "client"}}
    # required: a node never falls back to a client token for its internal commands
    assert node["SHARDQ_CLUSTER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "shardq-auth", "key": "internal"}}
    assert "SHARDQ_CLUSTER_TOKEN" not in gateway  # a gateway needs client rights only


def test_without_auth_no_token_env_is_set() -> None:
    for manifest in (rc.statefulset("demo", "ns", rc.Spec(), 3),
                     rc.gateway_deployment("demo", "ns", rc.Spec(), ["a:1"])):
        env = env_of(container(manifest))
        assert "SHARDQ_TOKEN" not in env and "SHARDQ_CLUSTER_TOKEN" not in env


@pytest.mark.parametrize("component", ["node", "gateway"])
def test_probes_ask_ready_and_health_on_the_http_port(component: str) -> None:
    spec = rc.Spec()
    manifest = (rc.statefulset("demo", "ns", spec, 3) if component == "node"
                else rc.gateway_deployment("demo", "ns", spec, ["a:1"]))
    c = container(manifest)
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # liveness is more patient than readiness: a node busy with a slot move is not killed
    assert c["livenessProbe"]["failureThreshold"] > c["readinessProbe"]["failureThreshold"]
    if component == "node":  # recovery of a big node takes minutes, not liveness' 30 s
        start = c["startupProbe"]
        assert start["httpGet"] == c["livenessProbe"]["httpGet"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 600
    else:  # a gateway has nothing to recover
        assert "startupProbe" not in c
    # the named port exists in the container
    assert "http" in {p["name"] for p in c["ports"]}
    pod_annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/port"] == "6790"


@pytest.mark.parametrize("component", ["node", "gateway"])
def test_pods_meet_the_restricted_pod_security_standard(component: str) -> None:
    manifest = (rc.statefulset("demo", "ns", rc.Spec(), 3) if component == "node"
                else rc.gateway_deployment("demo", "ns", rc.Spec(), ["a:1"]))
    pod = manifest["spec"]["template"]["spec"]
    # the image's user (Dockerfile: USER 10001:10001); fsGroup makes the volume writable to it
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    c = container(manifest)
    assert c["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    # read-only root: the only writable paths are volumes (/data of a node, a small /tmp)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp",
                              "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in manifest["spec"].get("volumeClaimTemplates", [])}
    assert set(mounts.values()) <= set(volumes) | claims
    assert mounts == ({"/data": "data", "/tmp": "tmp"} if component == "node" else
                      {"/tmp": "tmp"})
    if component == "node":
        assert arg_after(c["args"], "--data-dir") in mounts  # the node writes only there


def test_image_pull_secrets_and_policy_reach_both_pod_templates() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    for manifest in (rc.statefulset("demo", "ns", spec, 5),
                     rc.gateway_deployment("demo", "ns", spec, ["a:1"])):
        pod = manifest["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"},
                                           {"name": "mirror"}]
        assert container(manifest)["imagePullPolicy"] == "Always"
    for manifest in (rc.statefulset("demo", "ns", rc.Spec(), 3),
                     rc.gateway_deployment("demo", "ns", rc.Spec(), ["a:1"])):
        # [] rather than absent: a merge patch must be able to remove every secret
        assert manifest["spec"]["template"]["spec"]["imagePullSecrets"] == []
        assert container(manifest)["imagePullPolicy"] == "IfNotPresent"
    # entries without a name (not valid for the CRD either) are left out
    assert rc.Spec.parse({"imagePullSecrets": [{"name": ""}, {}, {"name": "x"}]}
                         ).image_pull_secrets == ["x"]


def test_the_gateway_gets_its_seeds_in_env_and_listens_everywhere() -> None:
    spec = rc.Spec.parse(FULL_SPEC)
    dep = rc.gateway_deployment("demo", "ns", spec, ["10.1.0.4:6789", "10.1.0.5:6789"])
    assert dep["spec"]["replicas"] == 3
    c = container(dep)
    assert c["name"] == "gateway"
    assert c["command"] == ["shardq", "gateway"]
    assert arg_after(c["args"], "--host") == "0.0.0.0"
    assert arg_after(c["args"], "--port") == "6789"
    assert arg_after(c["args"], "--http-port") == "6790"
    assert env_of(c)["SHARDQ_SEED"] == {"name": "SHARDQ_SEED",
                                        "value": "10.1.0.4:6789,10.1.0.5:6789"}
    assert c["resources"] == {"limits": {"cpu": "1"}}


def test_a_gateway_rollout_starts_the_new_pod_first_and_gives_the_old_one_its_drain() -> None:
    dep = rc.gateway_deployment("demo", "ns", rc.Spec(), ["a:1"])
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = dep["spec"]["template"]["spec"]
    # the gateway's --drain-timeout default (20 s) is bounded well inside the grace period
    assert pod["terminationGracePeriodSeconds"] == rc.GATEWAY_GRACE_SECONDS == 30
    assert GatewaySettings().drain_timeout + 5 <= pod["terminationGracePeriodSeconds"]
    probe = container(dep)["readinessProbe"]
    assert probe["httpGet"]["path"] == "/ready"  # what the drain fails first
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 5


def test_disruption_budgets_allow_one_node_and_one_gateway_down() -> None:
    pdbs = by_kind(rc.disruption_budgets("demo", "ns", rc.Spec()))
    assert pdbs["PodDisruptionBudget", "demo-node"]["spec"]["maxUnavailable"] == 1
    assert pdbs["PodDisruptionBudget", "demo-gateway"]["spec"]["maxUnavailable"] == 1


def test_a_single_gateway_keeps_a_budget_that_never_blocks_a_drain() -> None:
    # the same object at every replica count: scaling 2 -> 1 leaves no minAvailable behind
    for replicas in (1, 2, 3):
        spec = rc.Spec.parse({"gateway": {"replicas": replicas}})
        pdbs = by_kind(rc.disruption_budgets("demo", "ns", spec))
        assert pdbs["PodDisruptionBudget", "demo-gateway"]["spec"] == {
            "maxUnavailable": 1, "selector": {"matchLabels": rc.labels("demo", "gateway")}}
        assert "minAvailable" not in pdbs["PodDisruptionBudget", "demo-node"]["spec"]


def test_nodes_with_data_counts_the_claims_left_from_before() -> None:
    names = ["data-demo-node-0", "data-demo-node-4", "data-demo-node-2", "data-other-node-9",
             "data-demo-node-x", "scratch-demo-node-7"]
    assert rc.nodes_with_data("demo", names) == 5
    assert rc.nodes_with_data("demo", []) == 0


# -- the scaling plan -------------------------------------------------------------------------


def test_plan_of_a_new_cluster() -> None:
    p = rc.plan("demo", 0, 3)
    assert p.replicas_first == 3 and p.replicas_after == 3
    assert p.members == ["demo-node-0", "demo-node-1", "demo-node-2"]
    assert not p.scaling


def test_plan_up_adds_replicas_first_then_moves_slots_to_them() -> None:
    p = rc.plan("demo", 3, 5)
    assert p.replicas_first == 5  # the new pods exist before any slot moves
    assert p.members == [f"demo-node-{i}" for i in range(5)]
    assert p.replicas_after == 5
    assert not p.scaling  # nothing to shrink afterwards


def test_plan_down_keeps_the_leaving_pods_until_their_slots_moved_off() -> None:
    p = rc.plan("demo", 5, 2)
    assert p.replicas_first == 5  # leaving pods stay while their slots move off
    assert p.members == ["demo-node-0", "demo-node-1"]  # the lowest ordinals stay
    assert p.replicas_after == 2  # then the StatefulSet shrinks
    assert p.scaling


def test_plan_is_stable_when_nothing_changes_and_resumes_a_half_done_scale_down() -> None:
    same = rc.plan("demo", 4, 4)
    assert (same.replicas_first, same.replicas_after, same.scaling) == (4, 4, False)
    # an operator restarted after the StatefulSet shrank: nothing more to do
    assert rc.plan("demo", 2, 2).members == ["demo-node-0", "demo-node-1"]


# -- storage changes of an existing cluster ---------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("1Gi", 2**30), ("1024Mi", 2**30), ("1G", 10**9), ("1.5Gi", 3 * 2**29), ("500M", 5 * 10**8),
    ("2e3", 2000), ("100m", Decimal("0.1")), ("3", 3), ("lots", None), ("1Gb", None)])
def test_quantities_compare_by_value(text: str, value: Any) -> None:
    assert rc.quantity(text) == (None if value is None else Decimal(value))


def _live(spec: rc.Spec, **claim_spec: Any) -> rc.Manifest:
    """The StatefulSet as the API returns it: claim template with defaults, canonical sizes."""
    sts = rc.statefulset("demo", "ns", spec, spec.nodes)
    claim = sts["spec"]["volumeClaimTemplates"][0]
    claim["spec"]["volumeMode"] = "Filesystem"
    claim["status"] = {"phase": "Pending"}
    claim["spec"].update(claim_spec)
    return sts


def test_unchanged_storage_is_no_change_whatever_the_spelling_of_the_size() -> None:
    spec = rc.Spec.parse({"storage": {"size": "1024Mi", "storageClassName": "ssd"}})
    live = _live(spec, resources={"requests": {"storage": "1Gi"}})  # the API's canonical form
    assert rc.storage_changes(spec, live) == []
    assert rc.storage_changes(rc.Spec(), _live(rc.Spec())) == []
    assert rc.storage_changes(rc.Spec(), {"spec": {}}) == []  # nothing to compare with


def test_a_changed_storage_size_or_class_is_named_by_its_field() -> None:
    made = rc.Spec.parse({"storage": {"size": "1Gi"}})
    live = _live(made)
    bigger = rc.Spec.parse({"storage": {"size": "5Gi"}})
    assert rc.storage_changes(bigger, live) == [
        "spec.storage.size is 5Gi but the node volumes were made with 1Gi"]
    classed = rc.Spec.parse({"storage": {"size": "1Gi", "storageClassName": "fast"}})
    assert rc.storage_changes(classed, live) == [
        "spec.storage.storageClassName is fast but the node volumes were made with (unset)"]
    both = rc.Spec.parse({"storage": {"size": "2Gi"}})
    live = _live(rc.Spec.parse({"storage": {"storageClassName": "slow"}}))
    changes = rc.storage_changes(both, live)
    assert [c.split(" is ")[0] for c in changes] == ["spec.storage.storageClassName",
                                                     "spec.storage.size"]


def test_the_storage_condition_says_a_change_needs_a_manual_migration() -> None:
    cond = rc.storage_condition(["spec.storage.size is 5Gi but the node volumes were made "
                                 "with 1Gi"], None, NOW)
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "StorageInSync", "False", "StorageImmutable")
    assert cond["message"].startswith("spec.storage.size is 5Gi")
    assert "cannot change" in cond["message"] and "migrate" in cond["message"]
    ok = rc.storage_condition([], None, NOW)
    assert (ok["status"], ok["reason"]) == ("True", "Unchanged")


# -- status conditions ------------------------------------------------------------------------

NOW = "2024-05-01T10:00:00Z"
LATER = "2024-05-01T10:05:00Z"


def test_ready_is_true_only_with_every_node_ready_and_no_slot_moving() -> None:
    ready = rc.ready_condition(3, 3, 0, None, NOW)
    assert ready == {"type": "Ready", "status": "True", "reason": "Converged",
                     "message": "3/3 node pods Ready, no slot moving",
                     "lastTransitionTime": NOW}
    moving = rc.ready_condition(3, 3, 12, None, NOW)
    assert (moving["status"], moving["reason"], moving["message"]) == (
        "False", "SlotsMoving", "12 slots still moving")
    short = rc.ready_condition(2, 3, 0, None, NOW)
    assert (short["status"], short["reason"], short["message"]) == (
        "False", "NodesNotReady", "2/3 node pods Ready")
    extra = rc.ready_condition(4, 3, 0, None, NOW)  # readyNodes must equal spec.nodes
    assert extra["status"] == "False"


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    first = rc.ready_condition(2, 3, 0, None, NOW)
    still = rc.ready_condition(1, 3, 0, [first], LATER)  # False again, other message
    assert still["lastTransitionTime"] == NOW and still["message"] == "1/3 node pods Ready"
    now_ready = rc.ready_condition(3, 3, 0, [first], LATER)
    assert now_ready["lastTransitionTime"] == LATER
    other_type = rc.condition("StorageInSync", True, "Unchanged", "", [first], LATER)
    assert other_type["lastTransitionTime"] == LATER
    # what a user or an old operator wrote without a time gets one
    assert rc.condition("Ready", False, "x", "", [{"type": "Ready", "status": "False"}],
                        LATER)["lastTransitionTime"] == LATER


def test_the_crd_status_schema_takes_what_the_operator_writes() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = {"phase": "Running", "epoch": 7, "nodes": 3, "slotsMoving": 0, "readyNodes": 3,
              "progress": "1024/1024 slots moved", "observedGeneration": 4,
              "conditions": [rc.ready_condition(3, 3, 0, None, NOW),
                             rc.storage_condition(["spec.storage.size is 2Gi but x"], None,
                                                  NOW)]}
    jsonschema.validate({"status": status}, schema)
    properties = schema["properties"]["status"]["properties"]
    assert set(status) <= set(properties)
    condition_fields = set(properties["conditions"]["items"]["properties"])
    for cond in status["conditions"]:
        assert set(cond) <= condition_fields


# -- replicated shards ------------------------------------------------------------------------


def test_a_shard_is_a_statefulset_of_its_members_restarted_only_by_the_operator() -> None:
    spec = rc.Spec.parse({"nodes": 3, "replicas": 3, "replication": {"failureTimeoutMs": 1500}})
    sts = rc.shard_statefulset("c", "ns", spec, 1)
    own = {**rc.labels("c", "node"), rc.SHARD_LABEL: "shard-1"}
    assert sts["metadata"]["name"] == "c-shard-1" and sts["spec"]["replicas"] == 3
    assert sts["spec"]["selector"] == {"matchLabels": own}
    assert sts["spec"]["template"]["metadata"]["labels"] == own
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
    [spread] = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": own} and spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--failure-timeout-ms") + 1] == "1500"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"] == own
    assert "volumeClaimTemplates" not in rc.shard_statefulset("c", "ns", spec, 1, False)["spec"]
    assert rc.shard_members("c", 1, 3) == ["c-shard-1-0", "c-shard-1-1", "c-shard-1-2"]
    assert rc.shard_index("c", "c-shard-12") == rc.shard_index("c", "shard-12") == 12
    assert rc.shard_index("c", "c-node") is None


def test_replicated_objects_have_a_budget_per_shard_and_no_node_statefulset() -> None:
    spec = rc.Spec.parse({"nodes": 2, "replicas": 5})
    objs = rc.replicated_objects("c", "ns", spec, 2, ["10.0.0.1:6789"])
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == [("Deployment", "c-gateway"), ("PodDisruptionBudget", "c-gateway"),
                     ("PodDisruptionBudget", "c-shard-0"), ("PodDisruptionBudget", "c-shard-1"),
                     ("Service", "c-gateway"), ("Service", "c-node"),
                     ("StatefulSet", "c-shard-0"), ("StatefulSet", "c-shard-1")]
    budget = next(o for o in objs if o["metadata"]["name"] == "c-shard-1"
                  and o["kind"] == "PodDisruptionBudget")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {
        **rc.labels("c", "node"), rc.SHARD_LABEL: "shard-1"}}}


def test_replication_conditions_name_the_shards_behind_and_without_quorum() -> None:
    full = {"shard-0": {"inSync": 3, "quorum": True}, "shard-1": {"inSync": 3, "quorum": True}}
    conds = {c["type"]: c for c in rc.replication_conditions(full, 3, [], "t0")}
    assert [conds[k]["status"] for k in ("Replicated", "Degraded", "NoQuorum")] == [
        "True", "False", "False"]
    behind = {**full, "shard-1": {"inSync": 2, "quorum": True}}
    conds = {c["type"]: c for c in rc.replication_conditions(behind, 3, list(conds.values()),
                                                             "t1")}
    assert [conds[k]["status"] for k in ("Replicated", "Degraded", "NoQuorum")] == [
        "False", "True", "False"]
    assert "shard-1 (2/3)" in conds["Degraded"]["message"]
    assert conds["NoQuorum"]["lastTransitionTime"] == "t0"  # unchanged status, same time
    lost = {**full, "shard-0": {"inSync": 0, "quorum": False}}
    conds = {c["type"]: c for c in rc.replication_conditions(lost, 3, [], "t2")}
    assert conds["NoQuorum"]["status"] == "True" and "shard-0" in conds["NoQuorum"]["message"]
