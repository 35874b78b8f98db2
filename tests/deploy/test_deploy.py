"""The Helm chart and the kustomize manifests: Helm's own lint, rendering,
Kubernetes schema validation, and agreement with the real binary (settings
accepted, probe paths served, SIGTERM handled within the grace period)."""

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "uincall-enricher"
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir())
BINARY = os.environ.get("UINCALL_BIN", str(ROOT / "target" / "debug" / "uincall-enricher"))
KUBE_VERSION = "1.34.0"
# Custom resources have no schema in Kubernetes' own set.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication",
             "KafkaTopic", "KafkaUser"}

ALL_FEATURES = {
    "tokens": {"acf528a2-d0e2-4a7b-8513-000000000000": "example-not-a-token"},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "keda": {"enabled": True, "authentication": {
        "secretName": "kafka-client", "sasl": "scram_sha512", "tls": True}},
    "podAnnotations": {"example.com/team": "contact-centre"},
    "tracing": {"otlpEndpoint": "http://127.0.0.1:1", "sampler": "parentbased_traceidratio",
                "samplerArg": "0.1"},
    "extraEnv": [
        {"name": "UINCALL__PIPELINE__MAX_IN_FLIGHT", "value": "128"},
        {"name": "UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD",
         "valueFrom": {"secretKeyRef": {"name": "kafka-credentials", "key": "password"}}},
    ],
    "extraEnvFrom": [{"secretRef": {"name": "kafka-client"}}],
    "extraVolumes": [{"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}}],
    "extraVolumeMounts": [{"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True}],
    "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "uincall-enricher"}}}],
    "priorityClassName": "contact-centre",
    "grafanaDashboard": {"enabled": True},
    "strimzi": {"cluster": "main", "topics": {"create": True}, "user": {"create": True}},
    "global": {"imageRegistry": "registry.example"},
}
HPA = {"hpa": {"enabled": True}, "existingSecret": "tokens-from-vault"}
# The push receiver with everything it has switched on.
TENANT = "acf528a2-d0e2-4a7b-8513-000000000000"
PUSH_HOST = "push.example.com"
INGEST = {"ingest": {
    "enabled": True,
    "secrets": {"existingSecret": "push-secrets", "tenants": [TENANT]},
    "ingress": {"enabled": True, "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "64k"},
                "hosts": [PUSH_HOST], "tls": [{"secretName": "push-example-com-tls", "hosts": [PUSH_HOST]}]},
    "autoscaling": {"enabled": True},
    "networkPolicy": {"enabled": True, "from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]},
}}
# Secured Kafka, one file per mode, shared with the broker tests: the chart
# values, the non-secret properties the ConfigMap must carry, and the
# variables the pod must get from the Secret `kafka-credentials`.
KAFKA_AUTH = {p.stem: json.loads(p.read_text())
              for p in sorted((ROOT / "tests" / "fixtures" / "kafka-auth").glob("*.json"))}
KAFKA_SECRET = "kafka-credentials"
# The nightly reconcile: a CronJob running `backfill` (docs/backfill.md).
RECONCILE = {"reconcile": {"enabled": True}}
# Its state on a claim, more arguments, its own placement, beside the receiver.
RECONCILE_PVC = {**INGEST, "reconcile": {
    "enabled": True, "stateVolume": {"existingClaim": "reconcile-state"}, "extraArgs": ["--dry-run"],
    "schedule": "15 2 * * *", "timeZone": "Europe/London", "startingDeadlineSeconds": None,
    "podAnnotations": {"example.com/team": "contact-centre"}, "podLabels": {"example.com/cost": "nightly"},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "reconcile"}}}]}}
# OpenShift: the restricted SCC assigns the uid and gids (values.yaml).
OPENSHIFT = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
UID_FIELDS = ("runAsUser", "runAsGroup", "fsGroup")
# A container security context with more than the default's.
CONTAINER_SECURITY = {"containerSecurityContext": {
    "runAsNonRoot": True, "privileged": False, "seccompProfile": {"type": "RuntimeDefault"}}}
# The receiver's own pod and container security contexts.
INGEST_SECURITY = {"ingest": {
    **INGEST["ingest"],
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 10002, "runAsGroup": 10002, "fsGroup": 10002,
                           "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                 "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}}}
RUNBOOKS = "https://runbooks.example.com/uincall/operations.md"
# Kafka credentials and the brokers' CA through extraEnv, extraEnvFrom,
# extraVolumes and extraVolumeMounts (not kafka.existingSecret), which the
# shared settings file points at; the receiver overrides one variable and
# adds one of its own.
EXTRA_CA = "/etc/kafka-ca/ca.crt"
EXTRA_KAFKA = {
    "settings": {"kafka": {"properties": {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "ssl.ca.location": EXTRA_CA}}},
    "extraEnv": [
        {"name": "UINCALL__KAFKA__PROPERTIES__SASL_USERNAME", "value": "enricher"},
        {"name": "UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD",
         "valueFrom": {"secretKeyRef": {"name": "kafka-client", "key": "password"}}},
        {"name": "UINCALL__LOG__LEVEL", "value": "debug"},
    ],
    "extraEnvFrom": [{"secretRef": {"name": "kafka-client-extra"}}],
    "extraVolumes": [{"name": "kafka-ca", "secret": {"secretName": "kafka-ca",
                                                     "items": [{"key": "ca.crt", "path": "ca.crt"}]}}],
    "extraVolumeMounts": [{"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True}],
}
INGEST_EXTRA = {**EXTRA_KAFKA, "ingest": {**INGEST["ingest"], "extraEnv": [
    {"name": "UINCALL__LOG__LEVEL", "value": "warn"},
    {"name": "UINCALL__INGEST__FORWARD_TIMEOUT", "value": "3s"}]}}
# KEDA reading the lag as the worker does: OAUTHBEARER (the token endpoint
# and scope from the worker's settings, extensions from values) and mTLS.
KEDA_SECRET = "keda-kafka"
KEDA_EXTENSIONS = "logicalCluster=lkc-1,identityPoolId=pool-1"
KEDA_OAUTHBEARER = {**KAFKA_AUTH["oauthbearer"]["values"], "keda": {"enabled": True, "authentication": {
    "secretName": KEDA_SECRET, "sasl": "oauthbearer", "tls": True, "oauth": {"extensions": KEDA_EXTENSIONS}}}}
KEDA_MTLS = {**KAFKA_AUTH["mtls"]["values"], "keda": {"enabled": True, "authentication": {
    "secretName": KEDA_SECRET, "tls": True, "clientCertificate": True, "keyPassword": True}}}
STRIMZI_TLS = {"strimzi": {"cluster": "main", "topics": {"create": True},
                           "user": {"create": True, "authentication": "tls"}}}
VALUE_SETS = {"defaults": {}, "all-features": ALL_FEATURES, "hpa-existing-secret": HPA,
              **{f"kafka-auth-{mode}": f["values"] for mode, f in KAFKA_AUTH.items()},
              "ingest": {**INGEST, "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
              **{f"ingest-kafka-auth-{mode}": {**f["values"], **INGEST} for mode, f in KAFKA_AUTH.items()},
              "ingest-extra-env": INGEST_EXTRA,
              "ingest-security-contexts": INGEST_SECURITY,
              "reconcile": RECONCILE,
              "reconcile-all-features": {**ALL_FEATURES, **RECONCILE},
              **{f"reconcile-kafka-auth-{mode}": {**f["values"], **RECONCILE} for mode, f in KAFKA_AUTH.items()},
              "reconcile-pvc-ingest": RECONCILE_PVC,
              "openshift-ingest-reconcile": {**OPENSHIFT, **INGEST, **RECONCILE},
              "container-security-context-ingest-reconcile": {**CONTAINER_SECURITY, **INGEST, **RECONCILE},
              "runbook-base-url": {"prometheusRule": {"enabled": True, "runbookBaseUrl": RUNBOOKS}},
              "strimzi-tls": STRIMZI_TLS,
              "keda-kafka-auth-oauthbearer": KEDA_OAUTHBEARER,
              "keda-kafka-auth-mtls": KEDA_MTLS}
KAFKA_COMPONENT = "production+kafka-credentials"
INGEST_COMPONENT = "production+ingest"
INGEST_KAFKA_COMPONENTS = "production+ingest+kafka-credentials"
BACKFILL_COMPONENT = "production+backfill"
# Everything: the receiver, the reconcile and both with the worker's Kafka credentials.
BACKFILL_KAFKA_COMPONENTS = "production+ingest+backfill+kafka-credentials+backfill/kafka-credentials"
OPENSHIFT_COMPONENT = "production+openshift"
# The receiver and the reconcile before openshift: it patches them too.
OPENSHIFT_COMPONENTS = "production+ingest+backfill+openshift"
STRIMZI_COMPONENT = "production+strimzi"
PUSH_SECRETS_PREFIX = "UINCALL__INGEST__SECRETS__"


def chart_docs(values):
    rendered = helm.Chart.load(CHART).render(values, name="enricher", namespace="uincall")
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def kustomize_docs(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        check=True, capture_output=True, text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kustomize_with_component(overlay, *components, namespace=None):
    """An overlay with components of deploy/components added, in this
    order, as an overlay of one's own would add them (one adding resources
    sets the overlay's namespace, as deploy/components/ingest says)."""
    with tempfile.TemporaryDirectory() as tmp:
        # kustomize takes relative paths only.
        deploy = os.path.relpath(ROOT / "deploy", tmp)
        Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            + (f"namespace: {namespace}\n" if namespace else "")
            + f"resources:\n  - {deploy}/overlays/{overlay}\n"
            + "components:\n" + "".join(f"  - {deploy}/components/{c}\n" for c in components))
        out = subprocess.run(["kubectl", "kustomize", tmp],
                             check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def all_renderings():
    for name, values in VALUE_SETS.items():
        yield f"chart:{name}", chart_docs(values)
    for overlay in OVERLAYS:
        yield f"kustomize:{overlay}", kustomize_docs(overlay)
    yield f"kustomize:{KAFKA_COMPONENT}", kustomize_with_component("production", "kafka-credentials")
    yield f"kustomize:{INGEST_COMPONENT}", kustomize_with_component("production", "ingest", namespace="uincall")
    yield (f"kustomize:{INGEST_KAFKA_COMPONENTS}",
           kustomize_with_component("production", "ingest", "kafka-credentials", namespace="uincall"))
    yield f"kustomize:{BACKFILL_COMPONENT}", kustomize_with_component("production", "backfill", namespace="uincall")
    yield (f"kustomize:{BACKFILL_KAFKA_COMPONENTS}",
           kustomize_with_component("production", *BACKFILL_KAFKA_COMPONENTS.split("+")[1:], namespace="uincall"))
    yield f"kustomize:{OPENSHIFT_COMPONENT}", kustomize_with_component("production", "openshift")
    yield (f"kustomize:{OPENSHIFT_COMPONENTS}",
           kustomize_with_component("production", *OPENSHIFT_COMPONENTS.split("+")[1:], namespace="uincall"))
    yield f"kustomize:{STRIMZI_COMPONENT}", kustomize_with_component("production", "strimzi", namespace="uincall")


RENDERINGS = dict(all_renderings())
# Renderings whose pods need a secured broker's credentials (a CA file, a
# password) to start: the broker tests start the worker with those
# (tests/it/secured.rs); the rest start here.
SECURED = ({f"chart:{name}" for name in VALUE_SETS if "kafka-auth-" in name}
           | {f"kustomize:{KAFKA_COMPONENT}", "chart:ingest-extra-env",
              f"kustomize:{INGEST_KAFKA_COMPONENTS}", f"kustomize:{BACKFILL_KAFKA_COMPONENTS}"})
# Renderings with the push receiver (chart:ingest*, kustomize:*+ingest*).
INGEST_RENDERINGS = [name for name in RENDERINGS if "ingest" in name]
# Renderings with the nightly reconcile's CronJob (chart:reconcile*, kustomize:*+backfill*).
RECONCILE_RENDERINGS = [name for name in RENDERINGS if "reconcile" in name or "backfill" in name]
# The reconcile changes nothing of the worker (test_reconcile_leaves_the_rest_of_the_release_alone):
# its renderings' workers are started as the ones without it.
STARTABLE = [name for name in RENDERINGS if name not in SECURED and name not in RECONCILE_RENDERINGS]


def is_ingest(doc):
    """A resource of the push receiver (labelled app.kubernetes.io/component: ingest)."""
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "ingest"


def one(docs, kind, ingest=False):
    """The one resource of a kind: the worker's, or with ingest=True the push receiver's."""
    found = [d for d in docs if d["kind"] == kind and is_ingest(d) == ingest]
    assert len(found) == 1, f"expected one {kind}{' of ingest' if ingest else ''}, found {len(found)}"
    return found[0]


def settings_text(docs):
    (text,) = [d["data"]["settings.toml"] for d in docs
               if d["kind"] == "ConfigMap" and "settings.toml" in d.get("data", {})]
    return text


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_passes_helm_lint(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, report


def test_values_schema_rejects_tokens_in_settings():
    chart = helm.Chart.load(CHART)
    with pytest.raises(Exception):
        chart.validate_schema({"settings": {"kafka": {"brokers": "b:9092"}, "api": {"tokens": {"t": "x"}}}})
    with pytest.raises(Exception):
        chart.validate_schema({"replicaCount": "three"})


def test_optional_features_render_their_resources():
    kinds = {d["kind"] for d in RENDERINGS["chart:all-features"]}
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Secret"} <= kinds
    assert "HorizontalPodAutoscaler" not in kinds
    hpa = RENDERINGS["chart:hpa-existing-secret"]
    assert "HorizontalPodAutoscaler" in {d["kind"] for d in hpa}
    assert "Secret" not in {d["kind"] for d in hpa}
    volumes = one(hpa, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tokens", "secret": {"secretName": "tokens-from-vault"}} in volumes


def test_tracing_values_become_the_standard_variables():
    (container,) = one(RENDERINGS["chart:all-features"], "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:1"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_RESOURCE_ATTRIBUTES"].startswith("k8s.pod.name=$(POD_NAME),")
    (default,) = one(RENDERINGS["chart:defaults"], "Deployment")["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in default["env"]}
    assert not any(n.startswith("OTEL_") for n in names), "no export unless asked for"


def test_extra_values_reach_the_pod():
    docs = RENDERINGS["chart:all-features"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["UINCALL__KAFKA__CLIENT_ID"]["value"] == "uincall-enricher-$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kafka-credentials"
    assert container["envFrom"] == [{"secretRef": {"name": "kafka-client"}}]
    assert {"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True} in container["volumeMounts"]
    assert {"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}} in pod["volumes"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod["priorityClassName"] == "contact-centre"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def pod_templates(docs):
    """The pod templates of a rendering's Deployments and CronJobs."""
    return ([d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
            + [d["spec"]["jobTemplate"]["spec"]["template"] for d in docs if d["kind"] == "CronJob"])


def without_uid_fields(docs):
    """The rendering with runAsUser, runAsGroup and fsGroup taken out of every pod's security context."""
    docs = json.loads(json.dumps(docs))
    for template in pod_templates(docs):
        for field in UID_FIELDS:
            template["spec"]["securityContext"].pop(field, None)
    return docs


@pytest.mark.parametrize("name, plain", [
    ("chart:openshift-ingest-reconcile", lambda: chart_docs({**INGEST, **RECONCILE})),
    (f"kustomize:{OPENSHIFT_COMPONENT}", lambda: RENDERINGS["kustomize:production"]),
    (f"kustomize:{OPENSHIFT_COMPONENTS}",
     lambda: kustomize_with_component("production", "ingest", "backfill", namespace="uincall")),
], ids=["chart", "component", "component-ingest-backfill"])
def test_openshift_leaves_the_uid_and_gids_to_the_cluster(name, plain):
    # Its restricted SCC assigns them from the namespace's range and refuses
    # a pod asking for the image's 10001.
    docs = RENDERINGS[name]
    templates = pod_templates(docs)
    assert len(templates) == (3 if "ingest" in name else 1), "the worker, the receiver, the reconcile"
    for template in templates:
        ctx = template["spec"]["securityContext"]
        assert not set(UID_FIELDS) & set(ctx), (template["metadata"]["labels"], ctx)
        assert ctx == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    # And nothing else changes.
    before = plain()
    assert all(set(UID_FIELDS) <= set(t["spec"]["securityContext"]) for t in pod_templates(before))
    assert sorted(map(json.dumps, docs)) == sorted(map(json.dumps, without_uid_fields(before)))


def test_container_and_receiver_security_contexts_as_set():
    # containerSecurityContext: every container of the release.
    docs = RENDERINGS["chart:container-security-context-ingest-reconcile"]
    templates = pod_templates(docs)
    assert len(templates) == 3
    want = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            **CONTAINER_SECURITY["containerSecurityContext"]}
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert container["securityContext"] == want, container["name"]
    # ingest's own: the receiver's pod and container only.
    docs = RENDERINGS["chart:ingest-security-contexts"]
    pod, container = container_of_ingest(docs)
    assert pod["securityContext"] == INGEST_SECURITY["ingest"]["podSecurityContext"]
    assert container["securityContext"] == INGEST_SECURITY["ingest"]["containerSecurityContext"]
    worker_pod, worker = container_of(docs)
    default_pod, default = container_of(RENDERINGS["chart:defaults"])
    assert worker_pod["securityContext"] == default_pod["securityContext"]
    assert worker["securityContext"] == default["securityContext"]


def test_config_change_rolls_the_pods():
    def checksum(values):
        dep = one(chart_docs(values), "Deployment")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({}) != checksum({"settings": {"kafka": {"brokers": "other:9092"}}})


def test_standard_labels_on_every_chart_resource():
    for doc in RENDERINGS["chart:all-features"] + RENDERINGS["chart:reconcile-pvc-ingest"]:
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
            assert key in labels, (doc["kind"], key)


@pytest.mark.parametrize("name", RENDERINGS.keys())
def test_manifests_validate_against_kubernetes_schemas(name):
    for doc in RENDERINGS[name]:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] and doc["metadata"]["name"] and doc["spec"], doc
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", RENDERINGS.keys())
def test_pod_security_and_resources(name):
    docs = RENDERINGS[name]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == (2 if name in INGEST_RENDERINGS else 1)
    for deployment in deployments:
        ingest = is_ingest(deployment)
        pdb = one(docs, "PodDisruptionBudget", ingest=ingest)
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", "drains pass an outage"
    cronjobs = [d for d in docs if d["kind"] == "CronJob"]
    assert len(cronjobs) == (1 if name in RECONCILE_RENDERINGS else 0)
    templates = ([d["spec"]["template"] for d in deployments]
                 + [c["spec"]["jobTemplate"]["spec"]["template"] for c in cronjobs])
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def write_settings(docs, directory):
    path = Path(directory) / "settings.toml"
    path.write_text(settings_text(docs))
    return path


@pytest.mark.parametrize("name", RENDERINGS.keys())
def test_rendered_settings_are_accepted_by_the_binary(name):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_settings(RENDERINGS[name], tmp)
        # The tokens directory is the Secret's mount point in the pod.
        env = {**os.environ, "UINCALL__API__TOKENS_DIR": tmp}
        result = subprocess.run([BINARY, "--config", str(path), "check-config"],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.mark.parametrize("name", STARTABLE)
def test_probes_ports_and_signal_handling_match_the_binary(name):
    docs = RENDERINGS[name]
    settings = tomllib.loads(settings_text(docs))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert settings["http"]["listen"].endswith(f":{port}"), "container port is the side port"
    assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    drain = float(settings["pipeline"]["drain_timeout"].rstrip("s"))
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain + 10, "grace period covers drain and flush"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tokens"] == settings["api"]["tokens_dir"]
    assert container["args"][-1] == f"{mounts['config']}/settings.toml"
    assert "secret" in volumes["tokens"] and "configMap" in volumes["config"]

    # The binary serves the probe paths: liveness answers 200 while it waits
    # for a broker, readiness answers 503 (exists, not ready), and SIGTERM
    # ends it with exit 0 well inside the grace period.
    with tempfile.TemporaryDirectory() as tmp:
        path = write_settings(docs, tmp)
        local = free_port()
        # The container's own variables (the OTEL_* ones with tracing on),
        # the downward API's pod name filled in.
        own = {e["name"]: e["value"].replace("$(POD_NAME)", "enricher-0")
               for e in container.get("env", []) if "value" in e}
        env = {**os.environ, **own, "UINCALL__API__TOKENS_DIR": tmp,
               "UINCALL__KAFKA__BROKERS": "127.0.0.1:1",
               "UINCALL__HTTP__LISTEN": f"127.0.0.1:{local}"}
        proc = subprocess.Popen([BINARY, *container["args"][:-1], str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            live = f"http://127.0.0.1:{local}{container['livenessProbe']['httpGet']['path']}"
            ready = f"http://127.0.0.1:{local}{container['readinessProbe']['httpGet']['path']}"
            deadline = time.monotonic() + 30
            while http_status(live) is None:
                assert proc.poll() is None, "the binary exited"
                assert time.monotonic() < deadline, "side port never answered"
                time.sleep(0.05)  # poll interval while the port opens
            assert http_status(live) == 200
            assert http_status(ready) == 503
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=grace) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("name", ["chart:all-features", "chart:ingest"])
def test_every_alert_links_its_runbook_in_the_operations_guide(name):
    rule = one(RENDERINGS[name], "PrometheusRule")
    guide = (ROOT / "docs" / "operations.md").read_text()
    # GitHub's anchors: headings lower-cased, punctuation dropped.
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", guide, re.M)}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    # The push receiver's alerts come with it only.
    receiver = {"UincallEnricherIngestUnavailable", "UincallEnricherIngestRefused"}
    assert (receiver <= {r["alert"] for r in alerts}) == (name == "chart:ingest"), name
    for r in alerts:
        url = r["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base.startswith("https://") and base.endswith("/docs/operations.md"), url
        assert anchor == r["alert"].lower() and anchor in anchors, (r["alert"], url)


def test_runbook_links_follow_the_base_url_set():
    rule = one(RENDERINGS["chart:runbook-base-url"], "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for r in alerts:
        assert r["annotations"]["runbook_url"] == f"{RUNBOOKS}#{r['alert'].lower()}", r["alert"]


def test_the_dashboard_configmap_carries_the_dashboard_file():
    cms = [d for d in RENDERINGS["chart:all-features"]
           if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    (cm,) = cms
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "uincall-enricher.json").read_text())
    assert json.loads(cm["data"]["uincall-enricher.json"]) == shipped


def test_keda_reads_the_lag_with_the_clusters_credentials():
    docs = RENDERINGS["chart:all-features"]
    scaled = one(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("kafka-client", "username"),
                    "password": ("kafka-client", "password"), "ca": ("kafka-client", "ca")}
    assert "configMapTargetRef" not in auth["spec"]
    plain = chart_docs({"keda": {"enabled": True}})
    assert "authenticationRef" not in one(plain, "ScaledObject")["spec"]["triggers"][0]
    assert not [d for d in plain if d["kind"] == "TriggerAuthentication"]


def keda_auth(docs):
    """The trigger's metadata, and the TriggerAuthentication's parameters:
    {parameter: (kind, name, key)}, from Secrets and ConfigMaps."""
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert set(auth["spec"]) <= {"secretTargetRef", "configMapTargetRef"}, "nothing else is rendered"
    refs = {}
    for field, kind in (("secretTargetRef", "Secret"), ("configMapTargetRef", "ConfigMap")):
        for r in auth["spec"].get(field, []):
            assert r["parameter"] not in refs, r
            refs[r["parameter"]] = (kind, r["name"], r["key"])
    return trigger["metadata"], refs


def test_keda_oauthbearer_gets_its_token_as_the_worker_does():
    # KEDA's parameters (its Apache Kafka scaler): the client id and secret
    # as username and password; the token endpoint, scopes and extensions
    # read from the TriggerAuthentication only, from a ConfigMap here.
    docs = RENDERINGS["chart:keda-kafka-auth-oauthbearer"]
    metadata, refs = keda_auth(docs)
    assert (metadata["sasl"], metadata["tls"]) == ("oauthbearer", "enable")
    secret = {p: r for p, r in refs.items() if r[0] == "Secret"}
    assert secret == {p: ("Secret", KEDA_SECRET, p) for p in ("username", "password", "ca")}
    config = {p: r for p, r in refs.items() if r[0] == "ConfigMap"}
    assert set(config) == {"oauthTokenEndpointUri", "scopes", "oauthExtensions"}
    (name,) = {r[1] for r in config.values()}
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    values = {p: cm["data"][key] for p, (_, _, key) in config.items()}
    # The worker's own endpoint and scope (settings.kafka.properties), the extensions set.
    properties = KAFKA_AUTH["oauthbearer"]["properties"]
    assert values == {"oauthTokenEndpointUri": properties["sasl.oauthbearer.token.endpoint.url"],
                      "scopes": properties["sasl.oauthbearer.scope"], "oauthExtensions": KEDA_EXTENSIONS}
    assert not SECRET_PROPERTY.search(json.dumps(cm["data"]))

    # Values before the worker's; librdkafka's space separated scope becomes KEDA's comma separated scopes.
    def oauth_values(oauth, scope):
        values = json.loads(json.dumps(KEDA_OAUTHBEARER))
        values["settings"]["kafka"]["properties"]["sasl.oauthbearer.scope"] = scope
        values["keda"]["authentication"]["oauth"] = oauth
        docs = chart_docs(values)
        _, refs = keda_auth(docs)
        data = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        return {p: data[n][k] for p, (kind, n, k) in refs.items() if kind == "ConfigMap"}
    assert oauth_values({"tokenEndpointUri": "https://idp.example.com/token", "scopes": "a,b"}, "kafka") == {
        "oauthTokenEndpointUri": "https://idp.example.com/token", "scopes": "a,b"}
    assert oauth_values({}, " kafka  openid ")["scopes"] == "kafka,openid"


def test_keda_client_certificate_takes_cert_key_and_key_password():
    metadata, refs = keda_auth(RENDERINGS["chart:keda-kafka-auth-mtls"])
    assert metadata["tls"] == "enable" and "sasl" not in metadata
    assert refs == {p: ("Secret", KEDA_SECRET, p) for p in ("ca", "cert", "key", "keyPassword")}
    assert not [d for d in RENDERINGS["chart:keda-kafka-auth-mtls"]
                if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-keda")]
    # Without keyPassword: no such parameter (an unencrypted key).
    values = json.loads(json.dumps(KEDA_MTLS))
    del values["keda"]["authentication"]["keyPassword"]
    _, refs = keda_auth(chart_docs(values))
    assert set(refs) == {"ca", "cert", "key"}


@pytest.mark.parametrize("authentication, message", [
    ({"sasl": "oauthbearer"}, "needs the token endpoint"),
    ({"clientCertificate": True}, "clientCertificate needs keda.authentication.tls"),
    ({"tls": True, "keyPassword": True}, "set keda.authentication.clientCertificate too"),
], ids=["oauthbearer-without-endpoint", "certificate-without-tls", "key-password-without-certificate"])
def test_keda_authentication_mistakes_fail_the_rendering(authentication, message):
    values = {"keda": {"enabled": True, "authentication": {"secretName": KEDA_SECRET, **authentication}}}
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart_docs(values)


def test_keda_authentication_values_schema():
    chart = helm.Chart.load(CHART)
    for bad in ({"sasl": "oidc"}, {"oauth": {"tokenEndpointUri": "login.example.com/token"}},
                {"oauth": {"scopes": "kafka openid"}}, {"oauth": {"extensions": "logicalCluster"}},
                {"oauth": {"clientSecret": "x"}}, {"keyPassword": "secret"}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"keda": {"enabled": True, "authentication": bad}})
    chart.validate_schema({"keda": {"enabled": True, "authentication": {
        "secretName": KEDA_SECRET, "sasl": "oauthbearer", "tls": True, "oauth": {
            "tokenEndpointUri": "https://idp.example.com/token", "scopes": "kafka,openid",
            "extensions": KEDA_EXTENSIONS}}}})


# The ACLs of the KafkaUser (chart and component): (type, name, pattern)
# -> operations, for the default settings.
STRIMZI_ACLS = {
    # backfill (the reconcile) writes to it, its producer reading
    # max.message.bytes; the push receiver writes to it.
    ("topic", "uincall.call-ended", "literal"): {"Describe", "DescribeConfigs", "Read", "Write"},
    # backfill --skip-enriched reads it, assigned partitions, nothing committed.
    ("topic", "uincall.call-enriched", "literal"): {"Describe", "DescribeConfigs", "Write", "Read"},
    # The push receiver writes to it too with ingest.dead_letter_refused.
    ("topic", "uincall.call-ended.dlq", "literal"): {"Describe", "DescribeConfigs", "Write", "Read"},
    ("group", "uincall-enricher", "literal"): {"Describe", "Read"},
    # Both `uincall-enricher.replay` (no filters) and `….replay.<digest>`.
    ("group", "uincall-enricher.replay", "prefix"): {"Describe", "Read"},
    # ... and looks up the coordinator of its reader's group all the same.
    ("group", "uincall-enricher.backfill", "literal"): {"Describe"},
    # kafka.delivery = exactly_once: <group_id>-<pod name> per pod.
    ("transactionalId", "uincall-enricher-", "prefix"): {"Describe", "Write"},
}


def acls_of(user):
    acls = {}
    for a in user["spec"]["authorization"]["acls"]:
        key = (a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"])
        assert key not in acls and len(set(a["operations"])) == len(a["operations"]), a
        acls[key] = set(a["operations"])
    return acls


def topics_of(docs):
    return {d["spec"]["topicName"]: d for d in docs if d["kind"] == "KafkaTopic"}


@pytest.mark.parametrize("name, authentication", [("chart:all-features", "scram-sha-512"), ("chart:strimzi-tls", "tls")])
def test_strimzi_topics_and_a_user_with_the_acls_worker_replay_backfill_and_receiver_need(name, authentication):
    docs = RENDERINGS[name]
    topics = topics_of(docs)
    assert set(topics) == {"uincall.call-ended", "uincall.call-enriched", "uincall.call-ended.dlq"}
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "main"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", t["metadata"]["name"])
    user = one(docs, "KafkaUser")
    assert user["spec"]["authentication"] == {"type": authentication}
    assert user["spec"]["authorization"]["type"] == "simple"
    assert acls_of(user) == STRIMZI_ACLS
    assert not [d for d in RENDERINGS["chart:defaults"] if d["kind"] in ("KafkaTopic", "KafkaUser")]


def test_strimzi_component_has_the_charts_topics_and_acls():
    # Both derive from the same settings: the base's settings.toml names
    # the chart's default topics and group.
    base = tomllib.loads((ROOT / "deploy" / "base" / "settings.toml").read_text())["kafka"]
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]["kafka"]
    for key in ("group_id", "input_topic", "output_topic", "dead_letter_topic"):
        assert base[key] == chart_values[key], key
    docs = RENDERINGS[f"kustomize:{STRIMZI_COMPONENT}"]
    chart = chart_docs({"strimzi": {"cluster": "main", "topics": {"create": True}, "user": {"create": True}}})
    user, chart_user = one(docs, "KafkaUser"), one(chart, "KafkaUser")
    assert acls_of(user) == acls_of(chart_user) == STRIMZI_ACLS
    assert user["spec"]["authentication"] == chart_user["spec"]["authentication"]
    assert user["spec"]["authorization"]["type"] == chart_user["spec"]["authorization"]["type"]
    topics, chart_topics = topics_of(docs), topics_of(chart)
    assert set(topics) == set(chart_topics) == {base["input_topic"], base["output_topic"], base["dead_letter_topic"]}
    for name, topic in topics.items():
        assert topic["metadata"]["name"] == chart_topics[name]["metadata"]["name"]
        assert topic["spec"] == chart_topics[name]["spec"], name
    # One Kafka cluster for all, in the overlay's namespace.
    strimzi = [d for d in docs if d["apiVersion"].startswith("kafka.strimzi.io/")]
    assert len(strimzi) == 4
    assert {d["metadata"]["labels"]["strimzi.io/cluster"] for d in strimzi} == {"my-cluster"}
    assert {d["metadata"]["namespace"] for d in strimzi} == {"uincall"}
    # The rest is the production overlay's.
    rest = [d for d in docs if d not in strimzi]
    assert sorted(map(json.dumps, rest)) == sorted(map(json.dumps, RENDERINGS["kustomize:production"]))


def container_of(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def container_of_ingest(docs):
    pod = one(docs, "Deployment", ingest=True)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def mounted_secret_key(pod, container, path):
    """(Secret, key) of the file the container sees at `path`: the innermost
    mount holding it, a secret or projected volume, the item at that path."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is not on a volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert mount.get("readOnly") is True, mount
    relative = path[len(mount["mountPath"].rstrip("/")) + 1:]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if "secret" in volume:
        sources = [{"secret": {"name": volume["secret"]["secretName"], **volume["secret"]}}]
    else:
        sources = volume.get("projected", {}).get("sources", [])
    for source in sources:
        secret = source.get("secret")
        for item in (secret or {}).get("items", []):
            if item["path"] == relative:
                return secret["name"], item["key"]
    raise AssertionError(f"{path}: no Secret item at {relative} in volume {mount['name']}")


def property_of(variable):
    """The librdkafka property an UINCALL__KAFKA__PROPERTIES__* variable sets."""
    prefix = "UINCALL__KAFKA__PROPERTIES__"
    assert variable.startswith(prefix), variable
    return variable[len(prefix):].lower().replace("_", ".")


# Values of these properties are secrets; the binary's check-config prints
# them as [redacted]. User names and client ids are identifiers.
SECRET_PROPERTY = re.compile(r"password|secret|key\.pem$|jaas|^sasl\.oauthbearer\.config$")


def check_config_with_pod_env(docs, container, tmp):
    """check-config on a rendering's settings with the container's
    environment: plain values as rendered, a fake value for each
    secretKeyRef. Returns the result and the fake values by variable."""
    path = write_settings(docs, tmp)
    fakes = {e["name"]: f"s3cret-value-{e['valueFrom']['secretKeyRef']['key']}"
             for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    own = {e["name"]: e["value"].replace("$(POD_NAME)", "enricher-0")
           for e in container["env"] if "value" in e}
    env = {**os.environ, **own, **fakes, "UINCALL__API__TOKENS_DIR": tmp}
    result = subprocess.run([BINARY, "--config", str(path), "check-config"],
                            capture_output=True, text=True, env=env)
    return result, fakes


@pytest.mark.parametrize("mode", KAFKA_AUTH.keys())
def test_secured_kafka_fixture_credentials_come_from_the_secret(mode):
    # Linted strict and validated with the other renderings
    # (chart:kafka-auth-<mode>); here what the broker tests rely on.
    fixture = KAFKA_AUTH[mode]
    assert set(fixture) == {"values", "properties", "env"}
    docs = RENDERINGS[f"chart:kafka-auth-{mode}"]
    settings = tomllib.loads(settings_text(docs))
    assert settings["kafka"]["properties"] == fixture["properties"]

    pod, container = container_of(docs)
    env = {e["name"]: e for e in container["env"]}
    for want in fixture["env"]:
        got = env[want["name"]]
        if "secret" in want:
            assert got == {"name": want["name"], "valueFrom": {
                "secretKeyRef": {"name": KAFKA_SECRET, "key": want["secret"]}}}
        else:
            assert set(got) == {"name", "value"}, got
            assert mounted_secret_key(pod, container, got["value"]) == (KAFKA_SECRET, want["file"])
    mapped = {property_of(e["name"]) for e in fixture["env"]}

    # The ConfigMap carries no credential: no mapped property, no secret-looking one, no PEM.
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert not mapped & set(settings["kafka"]["properties"])
    assert not [p for p in settings["kafka"]["properties"] if SECRET_PROPERTY.search(p)]
    assert "-----BEGIN" not in json.dumps(cm) and "s3cret-value" not in json.dumps(cm)
    assert "Secret" not in {d["kind"] for d in docs}, "the chart creates no Secret for Kafka"

    with tempfile.TemporaryDirectory() as tmp:
        result, fakes = check_config_with_pod_env(docs, container, tmp)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)["kafka"]["properties"]
    for key, value in fixture["properties"].items():
        assert printed[key] in (value, "[redacted]"), key
    for want in fixture["env"]:
        prop = property_of(want["name"])
        if "file" in want:
            assert printed[prop] == env[want["name"]]["value"]
        elif SECRET_PROPERTY.search(prop):
            assert printed[prop] == "[redacted]", prop
            assert fakes[want["name"]] not in result.stdout + result.stderr
        else:
            # An identifier (a user name, a client id): shown or redacted.
            assert printed[prop] in (fakes[want["name"]], "[redacted]"), prop


def test_kafka_credentials_follow_the_charts_env_and_precede_extra_env():
    values = {**KAFKA_AUTH["scram"]["values"],
              "tracing": {"otlpEndpoint": "http://127.0.0.1:1"},
              "extraEnv": [{"name": "UINCALL__PIPELINE__MAX_IN_FLIGHT", "value": "128"}]}
    pod, container = container_of(chart_docs(values))
    names = [e["name"] for e in container["env"]]
    kafka = [i for i, n in enumerate(names) if n.startswith("UINCALL__KAFKA__PROPERTIES__")]
    assert [names[i] for i in kafka] == sorted(names[i] for i in kafka), "sorted by property"
    assert kafka == list(range(kafka[0], kafka[-1] + 1))
    assert max(names.index(n) for n in ("POD_NAME", "UINCALL__KAFKA__CLIENT_ID",
                                        "OTEL_EXPORTER_OTLP_ENDPOINT")) < kafka[0]
    assert names.index("UINCALL__PIPELINE__MAX_IN_FLIGHT") == kafka[-1] + 1 == len(names) - 1
    volume = {v["name"]: v for v in pod["volumes"]}["kafka-credentials"]
    assert volume == {"name": "kafka-credentials", "projected": {"sources": [
        {"secret": {"name": KAFKA_SECRET, "items": [{"key": "ca.crt", "path": "kafka-credentials/ca.crt"}]}}]}}
    assert {"name": "kafka-credentials", "mountPath": "/etc/uincall-enricher/kafka",
            "readOnly": True} in container["volumeMounts"]


def test_kafka_files_from_other_secrets_and_nothing_by_default():
    # Strimzi: the user's Secret, and the cluster CA from the cluster's own Secret.
    values = {"kafka": {"existingSecret": {
        "name": "enricher", "properties": {"sasl.password": "password"},
        "files": {"ssl.ca.location": {"secret": "main-cluster-ca-cert", "key": "ca.crt"},
                  "ssl.truststore.location": {"secret": "main-cluster-ca-cert", "key": "ca.p12"}}}}}
    docs = chart_docs(values)
    pod, container = container_of(docs)
    env = {e["name"]: e for e in container["env"]}
    ca = env["UINCALL__KAFKA__PROPERTIES__SSL_CA_LOCATION"]["value"]
    assert ca == "/etc/uincall-enricher/kafka/main-cluster-ca-cert/ca.crt"
    assert mounted_secret_key(pod, container, ca) == ("main-cluster-ca-cert", "ca.crt")
    sources = {v["name"]: v for v in pod["volumes"]}["kafka-credentials"]["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources] == ["main-cluster-ca-cert"], "one source per Secret"
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # A file from another Secret needs no name.
    only_ca = {"kafka": {"existingSecret": {"files": {
        "ssl.ca.location": {"secret": "main-cluster-ca-cert", "key": "ca.crt"}}}}}
    pod, container = container_of(chart_docs(only_ca))
    assert "kafka-credentials" in {v["name"] for v in pod["volumes"]}
    # Nothing mapped, nothing rendered (a name alone included).
    for values in ({}, {"kafka": {"existingSecret": {"name": "kafka-credentials"}}}):
        pod, container = container_of(chart_docs(values))
        assert "kafka-credentials" not in {v["name"] for v in pod["volumes"]}
        assert "kafka-credentials" not in {m["name"] for m in container["volumeMounts"]}
        assert not [e for e in container["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]


@pytest.mark.parametrize("values, message", [
    ({"kafka": {"existingSecret": {"properties": {"sasl.password": "password"}}}},
     "kafka.existingSecret.name is empty"),
    ({"kafka": {"existingSecret": {"files": {"ssl.ca.location": "ca.crt"}}}},
     "kafka.existingSecret.name is empty"),
    ({"settings": {"kafka": {"properties": {"sasl.username": "enricher"}}},
      "kafka": {"existingSecret": {"name": "k", "properties": {"sasl.username": "username"}}}},
     "set both in settings.kafka.properties and in kafka.existingSecret"),
    ({"kafka": {"existingSecret": {"name": "k", "properties": {"ssl.ca.location": "ca"},
                                   "files": {"ssl.ca.location": "ca.crt"}}}},
     "in both properties and files"),
], ids=["property-without-name", "file-without-name", "also-in-settings", "property-and-file"])
def test_kafka_credentials_mistakes_fail_the_rendering(values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart_docs(values)


def test_values_schema_refuses_kafka_secrets_in_settings():
    chart = helm.Chart.load(CHART)
    for prop in ("sasl.password", "ssl.key.password", "ssl.key.pem",
                 "sasl.oauthbearer.client.secret", "sasl.oauthbearer.config", "sasl.jaas.config"):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"settings": {"kafka": {"brokers": "b:9092", "properties": {prop: "x"}}}})
    for bad in ({"name": "Not_A_Name"}, {"properties": {"SASL_PASSWORD": "password"}},
                {"files": {"ssl.ca.location": {"secret": "ca"}}}, {"files": {"ssl.ca.location": "../x"}},
                {"secretName": "x"}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"kafka": {"existingSecret": bad}})
    # Non-secret properties, the token endpoint's URL among them, stay in settings.
    chart.validate_schema({"settings": {"kafka": {"brokers": "b:9092", "properties": {
        "security.protocol": "SASL_SSL", "sasl.username": "enricher",
        "sasl.oauthbearer.token.endpoint.url": "https://login.example.com/oauth2/token",
        "ssl.key.location": "/x"}}}})


def test_kafka_credentials_component_matches_the_chart_and_is_opt_in():
    docs = RENDERINGS[f"kustomize:{KAFKA_COMPONENT}"]
    pod, container = container_of(docs)
    env = {e["name"]: e for e in container["env"]}
    secret = "uincall-enricher-kafka"
    for variable, key in (("UINCALL__KAFKA__PROPERTIES__SASL_USERNAME", "username"),
                          ("UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD", "password")):
        assert env[variable]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}
    ca = env["UINCALL__KAFKA__PROPERTIES__SSL_CA_LOCATION"]["value"]
    assert ca == f"/etc/uincall-enricher/kafka/{secret}/ca.crt", "the chart's layout"
    assert mounted_secret_key(pod, container, ca) == (secret, "ca.crt")
    # The rest of the pod is the production overlay's.
    production = RENDERINGS["kustomize:production"]
    _, plain = container_of(production)
    assert {e["name"] for e in plain["env"]} <= set(env)
    assert container["resources"] == plain["resources"]
    # Neither overlay uses it unless asked.
    for overlay in OVERLAYS:
        pod, _ = container_of(RENDERINGS[f"kustomize:{overlay}"])
        assert "kafka-credentials" not in {v["name"] for v in pod["volumes"]}

    with tempfile.TemporaryDirectory() as tmp:
        result, fakes = check_config_with_pod_env(docs, container, tmp)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)["kafka"]["properties"]
    assert printed["security.protocol"] == "SASL_SSL" and printed["sasl.mechanism"] == "SCRAM-SHA-512"
    assert printed["sasl.password"] == "[redacted]" and printed["ssl.ca.location"] == ca
    assert fakes["UINCALL__KAFKA__PROPERTIES__SASL_PASSWORD"] not in result.stdout + result.stderr


# The push receiver, `uincall-enricher ingest` (docs/ingest.md).

def seconds(duration):
    """A settings duration as the binary writes it ("5s", "500ms", "1m") in seconds."""
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration).groups()
    return float(value) * {"ms": 0.001, "s": 1, "m": 60}[unit]


def selects(selector, labels):
    """Whether a matchLabels selector (or a Service's plain selector) selects these labels."""
    match = selector.get("matchLabels", selector)
    assert match and not selector.get("matchExpressions"), selector
    return all(labels.get(k) == v for k, v in match.items())


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_ingest_is_off_by_default():
    for name in ("chart:defaults", "chart:all-features", *(f"kustomize:{o}" for o in OVERLAYS)):
        docs = RENDERINGS[name]
        assert not [d for d in docs if is_ingest(d)], name
        assert "ingest" not in tomllib.loads(settings_text(docs)), name
    # Both overlays leave the component out (the production one says how to add it).
    for overlay in OVERLAYS:
        text = (ROOT / "deploy" / "overlays" / overlay / "kustomization.yaml").read_text()
        assert not re.search(r"^\s*-\s*\S*components/ingest", text, re.M), overlay


@pytest.mark.parametrize("mode", KAFKA_AUTH.keys())
def test_ingest_container_runs_ingest_with_the_push_secrets_and_the_workers_kafka_credentials(mode):
    fixture = KAFKA_AUTH[mode]
    docs = chart_docs({**fixture["values"], **INGEST})
    worker = one(docs, "Deployment")
    deployment = one(docs, "Deployment", ingest=True)
    assert deployment["metadata"]["name"] == f"{worker['metadata']['name']}-ingest"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["ingest", "--config", "/etc/uincall-enricher/settings.toml"]
    assert container["image"] == worker_container["image"]
    # Each key of the Secret becomes UINCALL__INGEST__SECRETS__<tenant id>.
    assert container["envFrom"] == [{"prefix": PUSH_SECRETS_PREFIX, "secretRef": {"name": "push-secrets"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["UINCALL__KAFKA__CLIENT_ID"]["value"] == "uincall-enricher-ingest-$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The fixture's Kafka credentials, exactly as the worker gets them.
    for want in fixture["env"]:
        got = env[want["name"]]
        if "secret" in want:
            assert got == {"name": want["name"], "valueFrom": {
                "secretKeyRef": {"name": KAFKA_SECRET, "key": want["secret"]}}}
        else:
            assert mounted_secret_key(pod, container, got["value"]) == (KAFKA_SECRET, want["file"])
    kafka_env = [e for e in container["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]
    assert kafka_env == [e for e in worker_container["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    worker_volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-credentials"] == worker_volumes["kafka-credentials"]
    assert volumes["config"] == worker_volumes["config"], "the worker's ConfigMap"
    # No access token on the receiver: an empty directory at api.tokens_dir.
    settings = tomllib.loads(settings_text(docs))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[settings["api"]["tokens_dir"]]]
    assert not [v for v in pod["volumes"] if "secret" in v], "no Secret volume but Kafka's"
    # Pushes on http, health and metrics on metrics, as the settings say.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9464}
    assert settings["ingest"]["listen"] == "0.0.0.0:8080"
    assert settings["http"]["listen"] == "0.0.0.0:9464"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert "replicas" not in deployment["spec"], "the HPA sets them"
    assert pod["securityContext"] == worker["spec"]["template"]["spec"]["securityContext"]
    assert container["securityContext"] == worker_container["securityContext"]


def ingest_check_config(docs, tmp):
    """check-config with the receiver's container environment as a pod
    would have it: plain values as rendered, a fake value for each
    secretKeyRef, and the push-secrets Secret's keys (TENANT) under the
    envFrom prefix; the empty tokens directory is `tmp`. Returns the
    container, the result and the fake push secret."""
    deployment = one(docs, "Deployment", ingest=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    path = write_settings(docs, tmp)
    fakes = {e["name"]: f"s3cret-value-{e['valueFrom']['secretKeyRef']['key']}"
             for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    own = {e["name"]: e["value"].replace("$(POD_NAME)", "enricher-ingest-0")
           for e in container["env"] if "value" in e}
    (source,) = [s for s in container["envFrom"] if s.get("prefix") == PUSH_SECRETS_PREFIX]
    push_secret = "push-s3cret-0123456789abcdef"
    pushed = {f"{source['prefix']}{TENANT}": push_secret}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("UINCALL__")},
           **own, **fakes, **pushed, "UINCALL__API__TOKENS_DIR": tmp}
    result = subprocess.run([BINARY, "--config", str(path), "check-config"],
                            capture_output=True, text=True, env=env)
    return container, result, push_secret


def test_ingest_gets_the_release_wide_extra_env_env_from_and_volumes():
    # extraEnv, extraEnvFrom, extraVolumes and extraVolumeMounts carry Kafka
    # credentials and CA files that the settings both read point at: the
    # receiver needs them as much as the worker.
    docs = RENDERINGS["chart:ingest-extra-env"]
    pod, container = container_of_ingest(docs)
    worker_pod, worker = container_of(docs)
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "no variable twice"
    overridden = {e["name"] for e in INGEST_EXTRA["ingest"]["extraEnv"]}
    extra = [e for e in EXTRA_KAFKA["extraEnv"] if e["name"] not in overridden]
    # The chart's own variables, extraEnv (less what ingest.extraEnv sets), then ingest.extraEnv.
    tail = extra + INGEST_EXTRA["ingest"]["extraEnv"]
    assert container["env"][-len(tail):] == tail
    assert container["env"][:-len(tail)] == [
        e if e["name"] != CLIENT_ID else {"name": CLIENT_ID, "value": "uincall-enricher-ingest-$(POD_NAME)"}
        for e in worker["env"][:-len(EXTRA_KAFKA["extraEnv"])]]
    # The push secrets first, then extraEnvFrom.
    assert container["envFrom"] == [{"prefix": PUSH_SECRETS_PREFIX, "secretRef": {"name": "push-secrets"}},
                                    *EXTRA_KAFKA["extraEnvFrom"]]
    assert worker["envFrom"] == EXTRA_KAFKA["extraEnvFrom"]
    for volume in EXTRA_KAFKA["extraVolumes"]:
        assert volume in pod["volumes"] and volume in worker_pod["volumes"]
    for mount in EXTRA_KAFKA["extraVolumeMounts"]:
        assert mount in container["volumeMounts"] and mount in worker["volumeMounts"]
    # The CA file the shared settings name is there in both pods.
    settings = tomllib.loads(settings_text(docs))
    assert settings["kafka"]["properties"]["ssl.ca.location"] == EXTRA_CA
    assert mounted_secret_key(pod, container, EXTRA_CA) == ("kafka-ca", "ca.crt")
    assert mounted_secret_key(worker_pod, worker, EXTRA_CA) == ("kafka-ca", "ca.crt")

    # The binary takes the receiver's settings with that environment: the
    # worker's credentials and level, ingest.extraEnv's overrides.
    with tempfile.TemporaryDirectory() as tmp:
        _, result, _ = ingest_check_config(docs, tmp)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["log"]["level"] == "warn" and printed["ingest"]["forward_timeout"] == "3s"
    properties = printed["kafka"]["properties"]
    assert properties["sasl.username"] == "enricher", "a user name is not a secret"
    assert properties["sasl.password"] == "[redacted]" and properties["ssl.ca.location"] == EXTRA_CA
    # ... and the worker's with its own.
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = check_config_with_pod_env(docs, worker, tmp)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["log"]["level"] == "debug"


@pytest.mark.parametrize("name", INGEST_RENDERINGS)
def test_ingest_ports_and_grace_period_match_the_settings_the_binary_reads(name):
    # `ingest` connects to a broker before it opens its ports, and without
    # one gives up after 30 s with exit 1: it is not started here. The
    # settings it would run with are: check-config with the container's
    # environment prints them.
    docs = RENDERINGS[name]
    pod = one(docs, "Deployment", ingest=True)["spec"]["template"]["spec"]
    with tempfile.TemporaryDirectory() as tmp:
        container, result, push_secret = ingest_check_config(docs, tmp)
    assert result.returncode == 0, result.stderr
    assert container["args"][0] == "ingest"
    settings = tomllib.loads(result.stdout)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"http", "metrics"}
    assert settings["ingest"]["listen"] == f"0.0.0.0:{ports['http']}"
    assert settings["http"]["listen"] == f"0.0.0.0:{ports['metrics']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The Secret's key is the tenant of the push URL; its value is never shown.
    assert settings["ingest"]["secrets"] == {TENANT: "[redacted]"}
    assert push_secret not in result.stdout + result.stderr
    assert settings["kafka"]["client_id"] == "uincall-enricher-ingest-enricher-ingest-0"
    # SIGTERM comes after the preStop sleep; then the pushes in flight wait
    # up to forward_timeout each and the producer flushes (up to 10 s).
    (sleep,) = [int(a) for a in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert 0 < sleep and pod["terminationGracePeriodSeconds"] > sleep + seconds(settings["ingest"]["forward_timeout"]) + 10


@pytest.mark.parametrize("name", RENDERINGS.keys())
def test_services_and_disruption_budgets_select_their_pods(name):
    docs = RENDERINGS[name]
    # The reconcile's pods, as a Job of the CronJob creates them.
    jobs = [c["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            for c in docs if c["kind"] == "CronJob"]
    for kind, selector in (("Service", lambda d: d["spec"].get("selector")),
                           ("PodDisruptionBudget", lambda d: d["spec"].get("selector")),
                           ("NetworkPolicy", lambda d: d["spec"].get("podSelector")),
                           ("Deployment", lambda d: d["spec"].get("selector"))):
        for doc in (d for d in docs if d["kind"] == kind):
            # A budget without a selector selects no pod (policy/v1).
            assert selector(doc), (kind, doc["metadata"]["name"])
            labels = pod_labels(one(docs, "Deployment", ingest=is_ingest(doc)))
            assert selects(selector(doc), labels), (kind, doc["metadata"]["name"])
            for job in jobs:
                assert not selects(selector(doc), job), (kind, doc["metadata"]["name"], "selects the reconcile's pods")


@pytest.mark.parametrize("name", INGEST_RENDERINGS)
def test_worker_and_ingest_selectors_do_not_overlap(name):
    docs = RENDERINGS[name]
    worker, ingest = one(docs, "Deployment"), one(docs, "Deployment", ingest=True)
    workers, receivers = pod_labels(worker), pod_labels(ingest)
    assert selects(worker["spec"]["selector"], workers) and not selects(worker["spec"]["selector"], receivers)
    assert selects(ingest["spec"]["selector"], receivers) and not selects(ingest["spec"]["selector"], workers)
    # Everything else selecting pods selects one side only.
    for doc in docs:
        selector = {"Service": lambda d: d["spec"]["selector"],
                    "PodDisruptionBudget": lambda d: d["spec"]["selector"],
                    "NetworkPolicy": lambda d: d["spec"]["podSelector"]}.get(doc["kind"])
        if selector:
            own, other = (receivers, workers) if is_ingest(doc) else (workers, receivers)
            assert selects(selector(doc), own) and not selects(selector(doc), other), doc["metadata"]["name"]
    # Each ServiceMonitor selects its side's Services only.
    services = [d for d in docs if d["kind"] == "Service"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        chosen = [s for s in services if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert chosen and all(is_ingest(s) == is_ingest(monitor) for s in chosen)
        assert any(p["name"] == "metrics" for s in chosen for p in s["spec"]["ports"])
    # The worker's Deployment selector is immutable: the same as without the receiver.
    plain = RENDERINGS["chart:defaults" if name.startswith("chart:") else "kustomize:production"]
    assert worker["spec"]["selector"] == one(plain, "Deployment")["spec"]["selector"]


def test_ingest_service_ingress_autoscaler_network_policy_and_disruption_budget():
    docs = RENDERINGS["chart:ingest"]
    deployment = one(docs, "Deployment", ingest=True)
    name = deployment["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service" and is_ingest(s)}
    assert set(services) == {name, f"{name}-metrics"}
    assert services[name]["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert services[f"{name}-metrics"]["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    assert all(s["spec"]["selector"] == selector for s in services.values())
    assert one(docs, "ServiceMonitor", ingest=True)["spec"]["endpoints"][0]["port"] == "metrics"

    ingress = one(docs, "Ingress", ingest=True)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "push-example-com-tls", "hosts": [PUSH_HOST]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == PUSH_HOST
    assert rule["http"]["paths"] == [{"path": "/push", "pathType": "Prefix", "backend": {
        "service": {"name": name, "port": {"name": "http"}}}}]
    # Without hosts: one rule for any host.
    (rule,) = one(chart_docs({"ingest": {**INGEST["ingest"], "ingress": {"enabled": True}}}),
                  "Ingress", ingest=True)["spec"]["rules"]
    assert "host" not in rule and rule["http"]["paths"][0]["path"] == "/push"

    hpa = one(docs, "HorizontalPodAutoscaler", ingest=True)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and not is_ingest(d)]

    policy = one(docs, "NetworkPolicy", ingest=True)
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress not restricted"
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    assert rules == {"http": INGEST["ingest"]["networkPolicy"]["from"], "metrics": [{"podSelector": {}}]}
    # Defaults: pushes from anywhere, metrics from the namespace.
    plain = one(chart_docs({"ingest": {**INGEST["ingest"], "networkPolicy": {"enabled": True}}}),
                "NetworkPolicy", ingest=True)
    rules = {r["ports"][0]["port"]: r.get("from") for r in plain["spec"]["ingress"]}
    assert rules == {"http": None, "metrics": [{"podSelector": {}}]}

    pdb = one(docs, "PodDisruptionBudget", ingest=True)
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # One replica: no budget (it would block every drain); the replicas as set.
    single = chart_docs({"ingest": {"enabled": True, "replicaCount": 1,
                                    "secrets": {"existingSecret": "push-secrets"}}})
    assert one(single, "Deployment", ingest=True)["spec"]["replicas"] == 1
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget" and is_ingest(d)]
    assert not [d for d in single if d["kind"] in ("Ingress", "NetworkPolicy", "HorizontalPodAutoscaler")]


def test_ingest_notes_give_the_push_urls_and_where_the_secrets_are():
    notes = helm.Chart.load(CHART).render(VALUE_SETS["ingest"], name="enricher", namespace="uincall")
    (text,) = [t for p, t in notes.items() if p.endswith("NOTES.txt")]
    assert f"https://{PUSH_HOST}/push/{TENANT}/<secret>/call-event" in text
    # The basic-auth form first: the path form's secret lands in access logs.
    assert text.index(f"https://{PUSH_HOST}/push/call-event") < text.index(f"/push/{TENANT}/")
    assert "Secret push-secrets" in text and PUSH_SECRETS_PREFIX + "<tenant_id>" in text
    plain = helm.Chart.load(CHART).render({"ingest": {"enabled": True, "secrets": {"existingSecret": "p"}}},
                                          name="enricher", namespace="uincall")
    (text,) = [t for p, t in plain.items() if p.endswith("NOTES.txt")]
    assert "https://<host>/push/<tenant_id>/<secret>/call-event" in text and "TLS" in text


def test_ingest_values_mistakes_are_refused():
    with pytest.raises(helm.HelmRenderError, match=re.escape("ingest.secrets.existingSecret")):
        chart_docs({"ingest": {"enabled": True}})
    chart = helm.Chart.load(CHART)
    for bad in ({"ingest": {"enabled": "yes"}}, {"ingest": {"replicas": 2}},
                {"ingest": {"secrets": {"existingSecret": "Not_A_Name"}}},
                {"ingest": {"ingress": {"hosts": ["https://push.example.com"]}}},
                {"ingest": {"autoscaling": {"targetCPUUtilizationPercentage": 170}}},
                {"settings": {"kafka": {"brokers": "b:9092"}, "ingest": {"listen": "0.0.0.0:80"}}},
                {"settings": {"kafka": {"brokers": "b:9092"}, "ingest": {"secrets": {TENANT: "x" * 16}}}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
    chart.validate_schema({"settings": {"kafka": {"brokers": "b:9092"}, "ingest": {
        "forward_timeout": "3s", "max_body_bytes": 131072, "forward_commands": ["call_hangup"]}}})


def test_ingest_component_matches_the_chart_and_gets_the_kafka_credentials():
    docs = RENDERINGS[f"kustomize:{INGEST_COMPONENT}"]
    deployment = one(docs, "Deployment", ingest=True)
    assert deployment["metadata"]["namespace"] == "uincall"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The ConfigMap's generated name reached the receiver.
    (config,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert config["configMap"]["name"] in {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert container["envFrom"] == [{"prefix": PUSH_SECRETS_PREFIX,
                                     "secretRef": {"name": "uincall-enricher-ingest-secrets"}}]
    _, worker = container_of(docs)
    assert container["image"] == worker["image"], "the overlay's image"
    # As the chart renders it.
    _, chart = container_of_ingest(RENDERINGS["chart:ingest"])
    for key in ("name", "args", "ports", "livenessProbe", "readinessProbe", "lifecycle", "securityContext"):
        assert container[key] == chart[key], key
    assert {m["mountPath"] for m in container["volumeMounts"]} == {m["mountPath"] for m in chart["volumeMounts"]}
    assert {e["name"]: e.get("value") for e in container["env"]} == {
        e["name"]: e.get("value") for e in chart["env"]}
    assert one(docs, "PodDisruptionBudget", ingest=True)["spec"]["minAvailable"] == 1
    assert {s["metadata"]["name"] for s in docs if s["kind"] == "Service" and is_ingest(s)} == {
        "uincall-enricher-ingest", "uincall-enricher-ingest-metrics"}

    # With kafka-credentials after it: the worker's credentials, the same way.
    docs = RENDERINGS[f"kustomize:{INGEST_KAFKA_COMPONENTS}"]
    pod, container = container_of_ingest(docs)
    has_the_workers_kafka_credentials(docs, pod, container)


def has_the_workers_kafka_credentials(docs, pod, container):
    """The kustomize component kafka-credentials gave `container` of `pod`
    the worker's Kafka variables and credentials volume, its CA file mounted
    from the Secret's key; returns the variables."""
    worker_pod, worker = container_of(docs)
    kafka = [e for e in container["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]
    assert kafka and kafka == [e for e in worker["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kafka-credentials"] == {v["name"]: v for v in worker_pod["volumes"]}["kafka-credentials"]
    ca = {e["name"]: e for e in container["env"]}["UINCALL__KAFKA__PROPERTIES__SSL_CA_LOCATION"]["value"]
    assert mounted_secret_key(pod, container, ca) == ("uincall-enricher-kafka", "ca.crt")
    return kafka

# The nightly reconcile: a CronJob running `uincall-enricher backfill`
# (docs/backfill.md), values reconcile, component deploy/components/backfill.

STATE_FILE = "backfill.state.json"
# After `--config <settings file>`; then `--state <dir>/backfill.state.json`.
NIGHTLY = ["backfill", "--all-tenants", "--from", "yesterday", "--to", "today", "--skip-enriched"]
CLIENT_ID = "UINCALL__KAFKA__CLIENT_ID"


def cronjob_of(docs):
    """The reconcile's CronJob, its pod spec and its container."""
    cronjob = one(docs, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return cronjob, pod, container


def state_volume(pod, container):
    """The volume holding --state's file, and that file's path."""
    args = container["args"]
    path = args[args.index("--state") + 1]
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (mount,) = mounts
    assert not mount.get("readOnly"), "the state is written"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume, path


def without(entries, name):
    return [e for e in entries if e["name"] != name]


def test_reconcile_is_off_by_default():
    for name in ("chart:defaults", "chart:all-features", "chart:ingest", *(f"kustomize:{o}" for o in OVERLAYS)):
        assert not [d for d in RENDERINGS[name] if d["kind"] == "CronJob"], name
    for overlay in OVERLAYS:
        text = (ROOT / "deploy" / "overlays" / overlay / "kustomization.yaml").read_text()
        assert not re.search(r"^\s*-\s*\S*components/backfill", text, re.M), overlay


def test_reconcile_leaves_the_rest_of_the_release_alone():
    # Enabling it adds the CronJob and changes no other resource (the
    # renderings with it are not started: their workers are these).
    for plain, name in (("chart:defaults", "chart:reconcile"), ("chart:all-features", "chart:reconcile-all-features"),
                        *((f"chart:kafka-auth-{m}", f"chart:reconcile-kafka-auth-{m}") for m in KAFKA_AUTH),
                        ("kustomize:production", f"kustomize:{BACKFILL_COMPONENT}")):
        docs = [d for d in RENDERINGS[name] if d["kind"] != "CronJob"]
        before = RENDERINGS[plain]
        if name.startswith("kustomize:"):
            # The component's overlay sets the namespace again: the same one.
            assert {d["metadata"].get("namespace") for d in docs} == {"uincall"}
        assert sorted(map(json.dumps, docs)) == sorted(map(json.dumps, before)), name


def test_reconcile_runs_the_nightly_backfill():
    cronjob, pod, container = cronjob_of(RENDERINGS["chart:reconcile"])
    _, worker = container_of(RENDERINGS["chart:reconcile"])
    config = worker["args"][worker["args"].index("--config") + 1]
    volume, state = state_volume(pod, container)
    assert container["args"] == ["--config", config, *NIGHTLY, "--state", state]
    assert state.endswith(f"/{STATE_FILE}")
    # An emptyDir, kept across the container's restarts in the same pod.
    assert pod["restartPolicy"] == "OnFailure"
    assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"]["sizeLimit"]
    spec = cronjob["spec"]
    assert (spec["schedule"], spec["timeZone"], spec["concurrencyPolicy"]) == ("30 1 * * *", "Asia/Shanghai", "Forbid")
    assert spec["startingDeadlineSeconds"] == 3600
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (3, 3)
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 6 and job["activeDeadlineSeconds"] == 21600
    # kubectl create job --from=cronjob/<name> <name>-manual fits in 63 characters.
    assert len(cronjob["metadata"]["name"]) <= 52
    long = chart_docs({"fullnameOverride": "x" * 63, **RECONCILE})
    assert len(one(long, "CronJob")["metadata"]["name"]) <= 52
    for doc in long:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)

    # The claim, more arguments after the chart's, the schedule and placement as set.
    cronjob, pod, container = cronjob_of(RENDERINGS["chart:reconcile-pvc-ingest"])
    values = RECONCILE_PVC["reconcile"]
    volume, state = state_volume(pod, container)
    assert container["args"] == ["--config", config, *NIGHTLY, "--state", state, *values["extraArgs"]]
    assert volume == {"name": volume["name"], "persistentVolumeClaim": {"claimName": "reconcile-state"}}
    assert (cronjob["spec"]["schedule"], cronjob["spec"]["timeZone"]) == (values["schedule"], values["timeZone"])
    assert "startingDeadlineSeconds" not in cronjob["spec"], "null: no limit"
    template = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"]["example.com/cost"] == "nightly"
    assert pod["nodeSelector"] == values["nodeSelector"] and pod["tolerations"] == values["tolerations"]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]
    worker_pod, _ = container_of(RENDERINGS["chart:reconcile-pvc-ingest"])
    assert "nodeSelector" not in worker_pod, "the reconcile's placement is its own"
    assert "topologySpreadConstraints" not in worker_pod
    # Not the worker's either.
    _, pod, _ = cronjob_of(RENDERINGS["chart:reconcile-all-features"])
    assert "topologySpreadConstraints" not in pod


@pytest.mark.parametrize("name", [n for n in RECONCILE_RENDERINGS if n.startswith("chart:")])
def test_reconcile_pod_gets_the_workers_settings_tokens_and_kafka_credentials(name):
    docs = RENDERINGS[name]
    cronjob, pod, container = cronjob_of(docs)
    worker_pod, worker = container_of(docs)
    for key in ("image", "imagePullPolicy", "securityContext"):
        assert container[key] == worker[key], key
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext",
                "imagePullSecrets", "priorityClassName"):
        assert pod.get(key) == worker_pod.get(key), key
    # The worker's env in the worker's order (the chart's variables, the
    # OTEL_* ones, kafka.existingSecret's sorted, extraEnv); a client id of its own.
    assert without(container["env"], CLIENT_ID) == without(worker["env"], CLIENT_ID)
    assert [e["name"] for e in container["env"]] == [e["name"] for e in worker["env"]]
    client_id = {e["name"]: e for e in container["env"]}[CLIENT_ID]
    assert client_id == {"name": CLIENT_ID, "value": "uincall-enricher-reconcile-$(POD_NAME)"}
    assert container.get("envFrom") == worker.get("envFrom")
    # The worker's volumes and mounts (settings, tokens Secret, Kafka
    # files, extraVolumes), and the state's.
    state, _ = state_volume(pod, container)
    assert without(pod["volumes"], state["name"]) == worker_pod["volumes"]
    assert without(container["volumeMounts"], state["name"]) == worker["volumeMounts"]
    settings = tomllib.loads(settings_text(docs))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tokens"] == settings["api"]["tokens_dir"], "--all-tenants: the tokens Secret's keys"
    assert "secret" in {v["name"]: v for v in pod["volumes"]}["tokens"]
    assert container["args"][:2] == ["--config", f"{mounts['config']}/settings.toml"]
    # A kafka.existingSecret fixture's credentials, from the fixture's Secret.
    mode = name.removeprefix("chart:reconcile-kafka-auth-")
    for want in KAFKA_AUTH[mode]["env"] if mode in KAFKA_AUTH else []:
        got = {e["name"]: e for e in container["env"]}[want["name"]]
        if "secret" in want:
            assert got["valueFrom"] == {"secretKeyRef": {"name": KAFKA_SECRET, "key": want["secret"]}}
        else:
            assert mounted_secret_key(pod, container, got["value"]) == (KAFKA_SECRET, want["file"])
    # The binary takes the settings with the container's environment.
    with tempfile.TemporaryDirectory() as tmp:
        result, fakes = check_config_with_pod_env(docs, container, tmp)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["kafka"]["client_id"] == "uincall-enricher-reconcile-enricher-0"
    for variable, fake in fakes.items():
        if SECRET_PROPERTY.search(property_of(variable)):
            assert fake not in result.stdout + result.stderr, variable


def test_reconcile_values_mistakes_are_refused():
    chart = helm.Chart.load(CHART)
    for bad in ({"schedule": 5}, {"schedule": ""}, {"enabled": "yes"}, {"timeZone": "Asia Shanghai"},
                {"concurrencyPolicy": "Never"}, {"backoffLimit": -1}, {"startingDeadlineSeconds": 5},
                {"activeDeadlineSeconds": "6h"}, {"extraArgs": "--dry-run"}, {"extraArgs": [3]},
                {"extraArgs": ["--from", "2024-01-01"]}, {"extraArgs": ["--state=/tmp/x"]},
                {"stateVolume": {"existingClaim": "Not_A_Name"}}, {"stateVolume": {"sizeLimit": "lots"}},
                {"stateVolume": {"emptyDir": {}}}, {"restartPolicy": "Never"}, {"podLabels": {"a": 1}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"reconcile": {"enabled": True, **bad}})
    chart.validate_schema({"reconcile": {"enabled": True, "timeZone": "", "schedule": "@daily",
                                         "activeDeadlineSeconds": None, "extraArgs": ["--dry-run"],
                                         "stateVolume": {"existingClaim": "reconcile-state", "sizeLimit": "1Mi"}}})


def test_reconcile_notes_say_how_to_run_it_once():
    def notes(values):
        rendered = helm.Chart.load(CHART).render(values, name="enricher", namespace="uincall")
        (text,) = [t for p, t in rendered.items() if p.endswith("NOTES.txt")]
        return text
    name = one(RENDERINGS["chart:reconcile"], "CronJob")["metadata"]["name"]
    text = notes(RECONCILE)
    assert f"kubectl -n uincall create job --from=cronjob/{name} {name}-manual" in text
    assert " ".join(NIGHTLY) in text and "emptyDir" in text
    assert "emptyDir" not in notes(RECONCILE_PVC)
    assert "cronjob/" not in notes({})


def test_backfill_component_matches_the_chart_and_gets_the_kafka_credentials():
    docs = RENDERINGS[f"kustomize:{BACKFILL_COMPONENT}"]
    cronjob, pod, container = cronjob_of(docs)
    assert cronjob["metadata"]["namespace"] == "uincall"
    # The ConfigMap's generated name reached the CronJob.
    (config,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert config["configMap"]["name"] in {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    worker_pod, worker = container_of(docs)
    assert config == {v["name"]: v for v in worker_pod["volumes"]}["config"]
    assert {v["name"]: v for v in pod["volumes"]}["tokens"] == {v["name"]: v for v in worker_pod["volumes"]}["tokens"]
    assert container["image"] == worker["image"], "the overlay's image"
    assert pod["serviceAccountName"] == worker_pod["serviceAccountName"]
    # As the chart renders it.
    chart_job, chart_pod, chart = cronjob_of(RENDERINGS["chart:reconcile"])
    for key in ("name", "args", "securityContext", "resources"):
        assert container[key] == chart[key], key
    assert {e["name"]: e.get("value") for e in container["env"]} == {e["name"]: e.get("value") for e in chart["env"]}
    assert ({m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}
            == {m["mountPath"]: m.get("readOnly") for m in chart["volumeMounts"]})
    assert state_volume(pod, container)[0] == state_volume(chart_pod, chart)[0]
    for key in ("restartPolicy", "automountServiceAccountToken", "securityContext"):
        assert pod[key] == chart_pod[key], key
    spec, chart_spec = cronjob["spec"], chart_job["spec"]
    for key in ("schedule", "timeZone", "concurrencyPolicy", "startingDeadlineSeconds",
                "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
        assert spec[key] == chart_spec[key], key
    for key in ("backoffLimit", "activeDeadlineSeconds"):
        assert spec["jobTemplate"]["spec"][key] == chart_spec["jobTemplate"]["spec"][key], key
    labels = spec["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "reconcile"

    # With kafka-credentials and backfill/kafka-credentials: the worker's credentials, the same way.
    docs = RENDERINGS[f"kustomize:{BACKFILL_KAFKA_COMPONENTS}"]
    _, pod, container = cronjob_of(docs)
    kafka = has_the_workers_kafka_credentials(docs, pod, container)
    # And the receiver's (ingest listed before kafka-credentials) are the same.
    _, receiver = container_of_ingest(docs)
    assert kafka == [e for e in receiver["env"] if e["name"].startswith("UINCALL__KAFKA__PROPERTIES__")]


def test_backfill_help_mentions_every_flag_the_cronjob_passes():
    # Needs a binary with the backfill subcommand.
    _, _, container = cronjob_of(RENDERINGS["chart:reconcile-pvc-ingest"])
    result = subprocess.run([BINARY, "backfill", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    flags = {a.split("=")[0] for a in container["args"] if a.startswith("--")}
    assert {"--config", "--all-tenants", "--from", "--to", "--skip-enriched", "--state", "--dry-run"} <= flags
    for flag in sorted(flags):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s=,]|$)", result.stdout, re.M), flag
