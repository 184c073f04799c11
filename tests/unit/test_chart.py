"""The chart tier: charts/shardq rendered by Helm's own engine, every manifest checked offline.

Helm is the real Go library (helm-python-sdk: no helm binary, no cluster). Every rendered
manifest is validated against Kubernetes 1.30's schemas (kubernetes-validate, strict); custom
resources against their CRDs with jsonschema: the ShardqCluster against ours, ServiceMonitor and
PrometheusRule against the subsets of the Prometheus Operator's API written out below. The helm
test hook's script is run for real, with the shardq CLI, against a node on loopback.

A real API server (Kubernetes 1.20) installing the chart is the end-to-end tier's job.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from shardq_operator import reconcile as rc
from tests.helpers import free_port, start_node_process

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "shardq"
CRD_FILE = CHART / "crds" / "shardqcluster.yaml"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
RELEASE, NAMESPACE = "shardq", "queues"
K8S = "1.30.0"
CUSTOM_KINDS = {"ShardqCluster", "ServiceMonitor", "PrometheusRule"}
Doc = dict[str, Any]


def _module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def full_values() -> dict[str, Any]:
    return dict(yaml.safe_load(FULL_VALUES.read_text()))


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        out: dict[str, str] = chart.render(values or {}, name=RELEASE, namespace=namespace,
                                           is_install=True)
    return out


def docs_of(rendered: dict[str, str]) -> list[Doc]:
    return [d for name, text in sorted(rendered.items()) if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]


def crd() -> Doc:
    return dict(yaml.safe_load(CRD_FILE.read_text()))


def crd_schema() -> Doc:
    schema: Doc = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@pytest.fixture(scope="module")
def default_docs() -> list[Doc]:
    return docs_of(render())


@pytest.fixture(scope="module")
def full_docs() -> list[Doc]:
    return docs_of(render(full_values()))


@pytest.fixture(params=["default", "full"])
def docs(request: pytest.FixtureRequest, default_docs: list[Doc],
         full_docs: list[Doc]) -> list[Doc]:
    return default_docs if request.param == "default" else full_docs


# --- Helm itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, "full"])
def test_helm_lint_finds_nothing_above_info(values: str | None) -> None:
    report = helm.lint(CHART, full_values() if values else None, strict=True,
                       namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] > 1]
    assert serious == []


def test_values_schema_rejects_misspelt_and_invalid_values() -> None:
    bad: dict[str, Any]
    for bad in ({"cluster": {"node": 5}}, {"cluster": {"nodes": 0}},
                {"cluster": {"fsync": "sometimes"}}, {"cluster": {"storage": {"size": "lots"}}},
                {"cluster": {"gateway": {"service": {"type": "Ingress"}}}},
                {"image": {"pullPolicy": "Sometimes"}}, {"operatr": {}}):
        with pytest.raises(helm.HelmValuesError):
            render(bad)


def test_values_schema_and_readme_tables_are_generated_from_values_yaml() -> None:
    schema_py = _module(CHART / "schema.py")
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    assert schema_py.undocumented(values, schema_py.parse(text)) == [], "every value has a @param"
    assert schema_py.main(["--check"]) == 0, "run: python charts/shardq/schema.py"
    with helm.Chart.load(CHART) as chart:
        assert chart.schema == json.loads((CHART / "values.schema.json").read_text())
        assert chart.values == values


def test_make_chart_render_writes_what_helm_renders(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s" / "render_chart.py"),
                    "--out", str(tmp_path)], check=True, timeout=60, capture_output=True)
    crds = [crd()]
    for filename, values in (("default.yaml", None), ("full.yaml", full_values())):
        written = [d for d in yaml.safe_load_all((tmp_path / filename).read_text()) if d]
        assert written == crds + docs_of(render(values)), filename


# --- Kubernetes validity ----------------------------------------------------------------------


def test_every_manifest_is_valid_for_kubernetes(docs: list[Doc]) -> None:
    for doc in [crd(), *docs]:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S, strict=True)


#: the API versions of Kubernetes 1.20 (the oldest the chart supports) the chart may use
APIS_1_20 = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "apiextensions.k8s.io/v1",
             "shardq.io/v1alpha1", "monitoring.coreos.com/v1"}


def test_only_api_versions_that_kubernetes_1_20_serves(docs: list[Doc]) -> None:
    assert {d["apiVersion"] for d in [crd(), *docs]} <= APIS_1_20


def _structural_problems(node: Doc, path: str) -> Iterator[str]:
    """What a Kubernetes API server would reject in a CRD schema (the structural rules)."""
    if "$ref" in node:
        yield f"{path}: $ref"
    if "type" not in node and not node.get("x-kubernetes-int-or-string") \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        yield f"{path}: no type"
    for name, sub in node.get("properties", {}).items():
        yield from _structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _structural_problems(node["items"], f"{path}[]")
    for sub in node.get("anyOf", []):
        if set(sub) - {"type"} or not node.get("x-kubernetes-int-or-string"):
            yield f"{path}: anyOf other than int-or-string"


def test_crd_is_structural_with_status_scale_and_printer_columns() -> None:
    c = crd()
    assert c["apiVersion"] == "apiextensions.k8s.io/v1"
    assert (c["spec"]["group"], c["spec"]["names"]["kind"]) == (rc.GROUP, rc.KIND)
    assert c["spec"]["names"]["plural"] == rc.PLURAL
    assert c["spec"]["names"]["shortNames"] == ["sqc"]
    version = c["spec"]["versions"][0]
    assert version["name"] == rc.VERSION and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert list(_structural_problems(version["schema"]["openAPIV3Schema"], "")) == []
    columns = version["additionalPrinterColumns"]
    assert [col["name"] for col in columns] == [
        "Shards", "Replicas", "In-Sync", "Ready", "Phase", "Epoch", "Moving", "Age"]
    for col in columns:
        if col["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = version["schema"]["openAPIV3Schema"]
        for part in col["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == col["type"], col["name"]


def test_crd_defaults_are_the_operators_and_cover_every_field_it_reads() -> None:
    spec = crd_schema()["properties"]["spec"]["properties"]
    parsed = rc.Spec.parse({})
    assert spec["nodes"]["default"] == parsed.nodes
    assert spec["replicas"]["default"] == parsed.replicas
    assert spec["replicas"]["enum"] == list(rc.REPLICA_CHOICES)
    assert (spec["replication"]["properties"]["failureTimeoutMs"]["default"]
            == parsed.failure_timeout_ms)
    assert spec["imagePullPolicy"]["default"] == parsed.image_pull_policy
    assert spec["gateway"]["properties"]["replicas"]["default"] == parsed.gateway_replicas
    gw_service = spec["gateway"]["properties"]["service"]["properties"]
    assert gw_service["type"]["default"] == parsed.service_type
    assert spec["storage"]["properties"]["size"]["default"] == parsed.storage_size
    assert spec["fsync"]["default"] == parsed.fsync
    auth = spec["auth"]["properties"]
    assert auth["tokenKey"]["default"] == parsed.token_key
    assert auth["clusterTokenKey"]["default"] == parsed.cluster_token_key
    assert spec["deletion"]["properties"]["deleteVolumes"]["default"] == parsed.delete_volumes
    # a spec with every field set parses into non-default values everywhere
    every = {
        "nodes": 7, "replicas": 5, "replication": {"failureTimeoutMs": 3000},
        "image": "img:1", "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "gateway": {"replicas": 0, "service": {"type": "NodePort"}},
        "storage": {"storageClassName": "ssd", "size": "5Gi"}, "fsync": "never",
        "resources": {"node": {"limits": {"cpu": 1}}, "gateway": {"requests": {"cpu": "1m"}}},
        "auth": {"secretName": "s", "tokenKey": "t", "clusterTokenKey": "c"},
        "metrics": {"serviceMonitor": True, "labels": {"a": "b"}},
        "deletion": {"deleteVolumes": True},
    }
    jsonschema.validate({"spec": every}, crd_schema())
    full = rc.Spec.parse(every)
    unchanged = [f for f in vars(parsed) if f != "metrics_port_name"
                 and getattr(full, f) == getattr(parsed, f)]
    assert unchanged == []


# --- the custom resources ---------------------------------------------------------------------

DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?)$")
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop",
                        "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal"]},
    "sourceLabels": {"type": "array", "items": {"type": "string",
                                                "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"},
    "regex": {"type": "string"}, "modulus": {"type": "integer"},
    "replacement": {"type": "string"}}}
#: The fields of monitoring.coreos.com/v1 the chart uses, as the Prometheus Operator's API
#: documents them (not its CRD: unknown fields are errors here, to catch typos).
SERVICE_MONITOR = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
    "properties": {
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "selector": {"type": "object", "additionalProperties": False,
                     "properties": {"matchLabels": STR_MAP, "matchExpressions": {"type": "array"}}},
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "any": {"type": "boolean"},
            "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "properties": {
                "port": {"type": "string"}, "path": {"type": "string"},
                "scheme": {"enum": ["http", "https"]},
                "interval": {"type": "string", "pattern": DURATION},
                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                "honorLabels": {"type": "boolean"},
                "relabelings": {"type": "array", "items": RELABEL},
                "metricRelabelings": {"type": "array", "items": RELABEL},
                "authorization": {"type": "object", "additionalProperties": False, "properties": {
                    "type": {"type": "string"},
                    "credentials": {"type": "object", "required": ["key"],
                                    "additionalProperties": False, "properties": {
                                        "name": {"type": "string"}, "key": {"type": "string"},
                                        "optional": {"type": "boolean"}}}}}}}}}}}}
PROMETHEUS_RULE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "additionalProperties": False, "properties": {"groups": {
        "type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": {"type": "string", "pattern": DURATION},
                "rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {
                        "alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]},
                        "for": {"type": "string", "pattern": DURATION},
                        "keep_firing_for": {"type": "string", "pattern": DURATION},
                        "labels": STR_MAP, "annotations": STR_MAP}}}}}}}}}}
CR_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def test_custom_resources_match_their_schemas(docs: list[Doc]) -> None:
    customs = [d for d in docs if d["kind"] in CUSTOM_KINDS]
    assert "ShardqCluster" in {d["kind"] for d in customs}
    for doc in customs:
        schema = crd_schema() if doc["kind"] == "ShardqCluster" else CR_SCHEMAS[doc["kind"]]
        jsonschema.Draft7Validator(schema).validate(doc)
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_the_operator_makes_valid_kubernetes_objects_of_the_charts_cluster(
        docs: list[Doc]) -> None:
    cluster = one(docs, "ShardqCluster")
    spec = rc.Spec.parse(cluster["spec"])
    name = cluster["metadata"]["name"]
    for manifest in rc.objects(name, NAMESPACE, spec, spec.nodes, ["10.0.0.1:6789"]):
        if manifest["kind"] == "PodDisruptionBudget":
            manifest["apiVersion"] = "policy/v1"  # what the operator picks on 1.21+
        kubernetes_validate.validate(manifest, K8S, strict=True)


# --- what the chart makes ---------------------------------------------------------------------


def test_the_cluster_comes_from_values(default_docs: list[Doc], full_docs: list[Doc]) -> None:
    default = rc.Spec.parse(one(default_docs, "ShardqCluster", RELEASE)["spec"])
    assert (default.nodes, default.gateway_replicas, default.fsync) == (3, 2, "always")
    assert default.image == "localhost/shardq:0.1.0" and default.auth_secret is None
    assert default.image_pull_secrets == []
    full = one(full_docs, "ShardqCluster", "queues")
    spec = rc.Spec.parse(full["spec"])
    assert (spec.nodes, spec.gateway_replicas, spec.service_type) == (5, 3, "LoadBalancer")
    assert (spec.storage_class, spec.storage_size, spec.fsync) == ("fast-ssd", "20Gi", "everysec")
    assert spec.auth_secret == "shardq-auth" and spec.delete_volumes
    assert spec.node_resources["limits"] == {"memory": "2Gi"}
    # image.pullSecrets reach the node and gateway pods too, through the ShardqCluster
    assert full["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec.image_pull_secrets == ["registry-credentials"]
    assert full["metadata"]["annotations"]["merged"] == "yes"  # cluster.merge
    assert full["spec"]["metrics"] == {"serviceMonitor": True,
                                       "labels": {"release": "kube-prometheus-stack"}}
    assert [d for d in docs_of(render({"cluster": {"create": False}}))
            if d["kind"] in ("ShardqCluster", "Pod", "ServiceMonitor")] == []


def test_the_operator_runs_shardq_operator_non_root_one_at_a_time(docs: list[Doc]) -> None:
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # kopf runs standalone
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["shardq", "operator"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in docs
                                         if d["kind"] == "ServiceAccount"}
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_operator_overrides_merge_nats_style(full_docs: list[Doc]) -> None:
    deploy = one(full_docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["--namespace", "queues"]
    assert pod["hostAliases"][0]["ip"] == "10.0.0.10"  # operator.podTemplate
    assert pod["containers"][0]["command"] == ["shardq", "operator"]  # kept by the merge
    assert deploy["metadata"]["annotations"] == {"merged": "yes", "owner": "queues@example.com"}
    # merging never leaks into values other templates read
    sa = one(full_docs, "ServiceAccount", "shardq-operator-sa")
    assert sa["metadata"]["annotations"].get("merged") is None


#: what the operator calls (shardq_operator.handlers and .kube) and kopf needs, per group/resource
NAMESPACED_RULES = {
    ("shardq.io", "shardqclusters"): {"get", "list", "watch", "patch", "update"},
    ("shardq.io", "shardqclusters/status"): {"get", "patch", "update"},
    ("shardq.io", "shardqclusters/finalizers"): {"update"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "services"): {"get", "create", "patch", "update"},
    ("", "pods"): {"get", "list", "watch", "delete"},  # rolling restarts of replicated shards
    ("", "configmaps"): {"get", "create", "update", "patch"},  # replicated: store, seeds
    ("", "persistentvolumeclaims"): {"get", "list", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    ("", "events"): {"create", "patch"},
}
DISCOVERY_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def _grants(role: Doc) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                if res == "secrets":
                    assert rule["resourceNames"], "secrets only by name"
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def test_rbac_grants_the_operator_what_it_needs_and_nothing_more(
        default_docs: list[Doc], full_docs: list[Doc]) -> None:
    sa = one(default_docs, "ServiceAccount", f"{RELEASE}-operator")["metadata"]["name"]
    role = one(default_docs, "ClusterRole", f"{RELEASE}-operator")
    assert _grants(role) == NAMESPACED_RULES  # no auth: no secret at all
    discovery = one(default_docs, "ClusterRole", f"{RELEASE}-operator-discovery")
    assert _grants(discovery) == DISCOVERY_RULES
    for binding in (d for d in default_docs if d["kind"].endswith("RoleBinding")
                    and "cleanup" not in d["metadata"]["name"]):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa,
                                        "namespace": NAMESPACE}]
    # operator.watchNamespace: a Role there; secrets: the auth Secret and the extra names only
    role = one(full_docs, "Role", f"{RELEASE}-operator")
    assert role["metadata"]["namespace"] == "queues"
    grants = _grants(role)
    assert grants.pop(("", "secrets")) == {"get"}
    assert grants == NAMESPACED_RULES
    (secret_rule,) = [r for r in role["rules"] if r["resources"] == ["secrets"]]
    assert sorted(secret_rule["resourceNames"]) == ["other-cluster-auth", "shardq-auth"]
    assert one(full_docs, "RoleBinding", f"{RELEASE}-operator")["roleRef"]["kind"] == "Role"
    assert not [d for d in full_docs if d["kind"] == "ClusterRole"
                and d["metadata"]["name"] == f"{RELEASE}-operator"]


def test_a_cluster_outside_the_watched_namespace_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="watchNamespace"):
        render(full_values(), namespace="elsewhere")


def test_auth_secret_is_made_or_taken_from_an_existing_one(full_docs: list[Doc]) -> None:
    secret = one(full_docs, "Secret", "shardq-auth")
    assert set(secret["data"]) == {"token", "cluster-token"}
    generated = one(docs_of(render({"cluster": {"auth": {"enabled": True}}})), "Secret")
    assert all(len(v) > 40 for v in generated["data"].values())  # random, base64
    docs = docs_of(render({"cluster": {"auth": {"enabled": True, "existingSecret": "mine"}}}))
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert one(docs, "ShardqCluster")["spec"]["auth"]["secretName"] == "mine"
    (rule,) = [r for r in one(docs, "ClusterRole", f"{RELEASE}-operator")["rules"]
               if r["resources"] == ["secrets"]]
    assert rule["resourceNames"] == ["mine"]


def test_service_monitor_selects_the_services_the_operator_makes(full_docs: list[Doc]) -> None:
    monitor = one(full_docs, "ServiceMonitor")
    cluster = one(full_docs, "ShardqCluster")["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for service in (rc.headless_service(cluster, NAMESPACE),
                    rc.gateway_service(cluster, NAMESPACE, rc.Spec())):
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    relabel = endpoint["relabelings"][0]
    assert (relabel["targetLabel"], relabel["replacement"]) == ("job", "shardq-${1}")
    assert endpoint["authorization"]["credentials"] == {"name": "shardq-auth", "key": "token"}
    assert monitor["spec"]["targetLabels"] == ["app.kubernetes.io/instance"]  # merge


def test_prometheus_rule_embeds_the_alert_rules_file(full_docs: list[Doc]) -> None:
    rules = yaml.safe_load((CHART / "alerts" / "shardq-rules.yaml").read_text())
    assert one(full_docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(full_docs: list[Doc]) -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    maps = [d for d in full_docs if d["kind"] == "ConfigMap"]
    assert len(maps) == len(files) > 0
    for path, cm in zip(files, maps, strict=True):
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())


def test_monitoring_is_off_by_default(default_docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in default_docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap", "Secret"}


def test_notes_tell_how_to_connect_the_sdk_and_reach_the_dashboard() -> None:
    notes = render()["shardq/templates/NOTES.txt"]
    assert 'Queue("emails", "shardq-gateway.queues.svc:6789")' in notes
    assert "kubectl port-forward -n queues svc/shardq-gateway 6789:6789 6790:6790" in notes
    assert "helm test shardq -n queues" in notes
    assert "token=TOKEN" in render(full_values())["shardq/templates/NOTES.txt"]


# --- the helm test hook -----------------------------------------------------------------------


def _test_pod(docs: list[Doc]) -> Doc:
    pod = one(docs, "Pod", f"{RELEASE}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def _run_hook(pod: Doc, address: str, timeout_s: int, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    hook_env = {e["name"]: e.get("value", "") for e in container["env"]}
    hook_env.update({"SHARDQ_ADDRESS": address, "TIMEOUT_SECONDS": str(timeout_s)}, **(env or {}))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["sh", "-c", container["args"][0]], capture_output=True, text=True,
                          timeout=timeout_s + 30,
                          env={**os.environ, **hook_env, "PATH": path})


def test_helm_test_hook_runs_the_shardq_cli_against_the_gateway_service(
        docs: list[Doc]) -> None:
    pod = _test_pod(docs)
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    assert "shardq push" in script and "shardq pull" in script and "--ack" in script
    env = {e["name"]: e for e in container["env"]}
    cluster = one(docs, "ShardqCluster")["metadata"]["name"]
    assert env["SHARDQ_ADDRESS"]["value"] == f"{rc.gateway_name(cluster)}.{NAMESPACE}.svc:6789"
    assert container["image"] == one(docs, "ShardqCluster")["spec"]["image"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["activeDeadlineSeconds"]


def test_helm_test_hook_pushes_pulls_and_acks_one_job_for_real(
        default_docs: list[Doc], full_docs: list[Doc]) -> None:
    port = free_port()
    node = start_node_process(port)
    try:
        done = _run_hook(_test_pod(default_docs), f"127.0.0.1:{port}", 10)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "pulled and acked job" in done.stdout
    finally:
        node.terminate()
        node.wait(timeout=10)
    # with auth: the token comes from the Secret's list (first one)
    port = free_port()
    node = start_node_process(port, "--token", "client-token-for-ci,second")
    try:
        pod = _test_pod(full_docs)
        done = _run_hook(pod, f"127.0.0.1:{port}", 10,
                         {"SHARDQ_TOKENS": "client-token-for-ci,second"})
        assert done.returncode == 0, done.stdout + done.stderr
        done = _run_hook(pod, f"127.0.0.1:{port}", 3, {"SHARDQ_TOKENS": "wrong"})
        assert done.returncode != 0
    finally:
        node.terminate()
        node.wait(timeout=10)


def test_helm_test_hook_fails_in_bounded_time_without_a_gateway(default_docs: list[Doc]) -> None:
    done = _run_hook(_test_pod(default_docs), f"127.0.0.1:{free_port()}", 2)
    assert done.returncode != 0
    assert "no gateway answered" in done.stdout


# --- uninstall ---------------------------------------------------------------------------------


def _hooks(docs: list[Doc], phase: str) -> list[Doc]:
    return [d for d in docs
            if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == phase]


def test_uninstall_deletes_the_cluster_while_the_operator_still_runs(docs: list[Doc]) -> None:
    hooks = _hooks(docs, "pre-delete")
    assert [d["kind"] for d in hooks] == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    weights = [int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks]
    assert weights[:3] == [-5] * 3 and weights[3] > -5, "RBAC before the Job"
    cluster = one(docs, "ShardqCluster")["metadata"]["name"]
    (rule,) = hooks[1]["rules"]
    assert rule == {"apiGroups": ["shardq.io"], "resources": ["shardqclusters"],
                    "resourceNames": [cluster], "verbs": ["get", "delete"]}
    job = hooks[3]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == hooks[0]["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["command"] == ["python3", "-c"]
    compile(container["args"][0], "cleanup-hook", "exec")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["NAMESPACE"], env["CLUSTER"]) == (NAMESPACE, cluster)
    for off in ({"cleanup": {"enabled": False}}, {"cluster": {"create": False}}):
        assert _hooks(docs_of(render(off)), "pre-delete") == []


def test_the_chart_package_leaves_the_tooling_out(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = {n.removeprefix("shardq/") for n in tar.getnames()}
    assert {"Chart.yaml", "values.schema.json", "crds/shardqcluster.yaml",
            "alerts/shardq-rules.yaml", "templates/tests/push-pull.yaml"} <= names
    assert {p.name for p in (CHART / "dashboards").glob("*.json")} <= {
        n.removeprefix("dashboards/") for n in names}
    assert not [n for n in names if n.endswith(".py") or n.startswith("ci/")
                or n.endswith(".test.yaml")]
