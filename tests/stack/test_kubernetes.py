"""deploy/kubernetes, checked without a cluster: every overlay renders with `kubectl kustomize`
and validates strictly against Kubernetes' own schemas; what it wires up matches the code;
and the processes it describes, started for real with its environment, answer its probes."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import openai
import pytest
import yaml
from yarl import URL

from tests.gateway.configmap import ConfigMapVolume
from tests.gateway.redis_server import RedisServer
from tests.stack.test_compose import cli_help, interpolated_names
from tests.stack.test_end_to_end import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy/kubernetes"
# The Kubernetes release the manifests are checked against (kubernetes-validate ships the
# schemas of 1.25 to 1.37); raise it when the oldest supported cluster version moves.
KUBERNETES_VERSION = "1.32"
OVERLAYS = ("worker", "vllm")
COMPONENTS = ("network-policy", "service-monitor")
# Fake keys for the processes started here, as if the Secret `gateway-secrets` held them.
# `python -m worker --help` imports torch: once per run is enough.
help_of = functools.cache(cli_help)
SECRETS = {"WORKER_API_KEY": "sk-worker-k8s-0123456789", "GATEWAY_ADMIN_KEY": "admin-k8s-42"}


def kubectl() -> str:
    binary = shutil.which("kubectl")
    assert binary, (
        "kubectl is needed to render deploy/kubernetes (`kubectl kustomize`); it is on the "
        "machine image; elsewhere install it (https://kubernetes.io/docs/tasks/tools/)"
    )
    return binary


@functools.cache
def render(overlay: str, components: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    folder = KUBE / "overlays" / overlay
    if components:
        # An overlay of the overlay, as a user writes one to opt into the components.
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"k8s-test-{os.getpid()}-{overlay}"
        folder.mkdir(exist_ok=True)
        (folder / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(KUBE / "overlays" / overlay, folder)],
                    "components": [
                        os.path.relpath(KUBE / "components" / c, folder) for c in components
                    ],
                }
            )
        )
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if components:
        shutil.rmtree(folder)
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(
        f"no {kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def container(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def env_of(
    docs: tuple[dict[str, Any], ...], spec: dict[str, Any], secrets: dict[str, str]
) -> dict[str, str]:
    """A container's environment as the kubelet gives it: values, ConfigMap keys, and the
    optional Secret keys that `secrets` holds."""
    env: dict[str, str] = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif ref := item["valueFrom"].get("configMapKeyRef"):
            env[item["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets:
                env[item["name"]] = secrets[ref["key"]]
    return env


def port_named(spec: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == name)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selected(pods: dict[str, dict[str, str]], selector: dict[str, str]) -> list[str]:
    """The workloads whose pods a label selector picks."""
    return [name for name, labels in pods.items() if labels_match(selector, labels)]


# --- rendering and schemas ------------------------------------------------------------------


def test_kubectl_is_there() -> None:
    version = subprocess.run(
        [kubectl(), "version", "--client"], capture_output=True, text=True, timeout=30
    )
    assert "Kustomize Version" in version.stdout


@pytest.mark.parametrize("components", [(), COMPONENTS], ids=["plain", "with-components"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(overlay, components) -> None:
    docs = render(overlay, components)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "StatefulSet"} <= kinds
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in Kubernetes itself; checked below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "llm") == "llm", doc["metadata"]
    assert ("NetworkPolicy" in kinds) == bool(components)


def test_strict_validation_catches_a_misspelt_field() -> None:
    gateway = copy.deepcopy(find(render("worker"), "Deployment", "gateway"))
    gateway["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, KUBERNETES_VERSION, strict=True)


def test_base_holds_no_overlay() -> None:
    """kustomize refuses a base folder that contains its own overlays."""
    assert not (KUBE / "base" / "overlays").exists()
    assert (
        subprocess.run([kubectl(), "kustomize", str(KUBE / "base")], capture_output=True).returncode
        == 0
    )


# --- wiring against the code ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_container_matches_its_cli(overlay) -> None:
    from gateway.__main__ import DEFAULT_PORT, _parser

    docs = render(overlay)
    spec = container(docs, "Deployment", "gateway")
    assert "command" not in spec  # the image's ENTRYPOINT: python -m gateway
    args = _parser().parse_args(spec["args"])
    config_path = Path(args.config)
    pod = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    mount = next(m for m in spec["volumeMounts"] if m["name"] == "config")
    # Mounted as a folder: a subPath mount never sees the kubelet's updates.
    assert "subPath" not in mount and config_path.parent == Path(mount["mountPath"])
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_path.name in configmap["data"]
    env = env_of(docs, spec, {})
    port = int(env["GATEWAY_PORT"])
    assert port == DEFAULT_PORT == port_named(spec, "http")
    service = find(docs, "Service", "gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_read_by_its_program(overlay) -> None:
    docs = render(overlay)
    config = find(docs, "ConfigMap", "gateway-config")["data"]["gateway.json"]
    readers = {
        "gateway": help_of("gateway") + " ".join(interpolated_names(config)),
        "worker": help_of("worker") + " HF_HOME",  # HF_HOME: read by huggingface_hub
        # vLLM is not installed here: its two variables are documented by vLLM and
        # huggingface_hub; MODEL and MODEL_NAME are expanded into its arguments.
        "vllm": "VLLM_API_KEY HF_TOKEN HF_HOME",
    }
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]["containers"][0]
        known = readers.get(spec["name"])
        if known is None:
            assert spec["name"] == "redis" and "env" not in spec
            continue
        arguments = " ".join(spec.get("args", []))
        for item in spec.get("env", []):
            name = item["name"]
            assert name in known or f"$({name})" in arguments, (
                f"{spec['name']}: {name} read by nothing"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_endpoint_map_passes_gateway_check(overlay, tmp_path) -> None:
    docs = render(overlay)
    (tmp_path / "gateway.json").write_text(
        find(docs, "ConfigMap", "gateway-config")["data"]["gateway.json"]
    )
    spec = container(docs, "Deployment", "gateway")
    for secrets in ({}, {**SECRETS, "OPENAI_API_KEY": "sk-openai-k8s-000", "VLLM_API_KEY": "v-1"}):
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_NAME")}
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "check", "--config", str(tmp_path / "gateway.json")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **env_of(docs, spec, secrets)},
        )
        assert result.returncode == 0, result.stderr
        assert "ok, " in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_servers_are_the_backends_the_map_names(overlay) -> None:
    docs = render(overlay)
    endpoints = json.loads(find(docs, "ConfigMap", "gateway-config")["data"]["gateway.json"])[
        "endpoints"
    ]
    backends = [b for e in endpoints.values() for b in e.get("backends", [e])]
    # In-cluster names: the Service's own, or its full name in the overlay's namespace.
    names = {overlay, f"{overlay}.llm.svc.cluster.local"}
    served = [URL(b["url"]) for b in backends if URL(b["url"]).host in names]
    assert served, f"the endpoint map names no {overlay} backend: {backends}"
    service = find(docs, "Service", overlay)
    assert service["metadata"]["namespace"] == "llm"
    if overlay == "vllm":
        # A headless Service: one address per ready pod, found by the gateway itself.
        assert service["spec"]["clusterIP"] == "None"
        discovered = [b for b in backends if URL(b["url"]).host in names]
        assert all(b.get("discover") == "dns" for b in discovered), discovered
    spec = container(docs, "Deployment", overlay)
    for url in served:
        assert url.port == service["spec"]["ports"][0]["port"]
        assert port_named(spec, service["spec"]["ports"][0]["targetPort"]) == 8000
    gateway_env = env_of(docs, container(docs, "Deployment", "gateway"), {})
    server_env = env_of(docs, spec, {})
    # The gateway asks for the model under the name the server serves it.
    assert gateway_env["MODEL_NAME"] == server_env["MODEL_NAME"]
    if overlay == "worker":
        assert int(server_env["WORKER_PORT"]) == 8000
    else:
        assert spec["args"][spec["args"].index("--port") + 1] == "8000"
        assert spec["args"][spec["args"].index("--served-model-name") + 1] == "$(MODEL_NAME)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_drain_and_the_pre_stop_pause(overlay) -> None:
    docs = render(overlay)
    pod = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    drain = float(env_of(docs, spec, {})["GATEWAY_DRAIN_TIMEOUT"])
    pre_stop = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and shutil.which("sleep")
    assert pod["terminationGracePeriodSeconds"] > drain + float(pre_stop[1])
    assert spec["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/health"
    assert spec["startupProbe"]["httpGet"]["path"] == "/health"
    rolling = find(docs, "Deployment", "gateway")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_their_pods(overlay) -> None:
    docs = render(overlay, COMPONENTS)
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)
    }
    for workload in workloads(docs):
        assert labels_match(
            workload["spec"]["selector"]["matchLabels"], pods[workload["metadata"]["name"]]
        )
    for service in (d for d in docs if d["kind"] == "Service"):
        chosen = selected(pods, service["spec"]["selector"])
        assert chosen == [service["metadata"]["name"]], (service["metadata"]["name"], chosen)
    pdb = find(docs, "PodDisruptionBudget", "gateway")
    assert selected(pods, pdb["spec"]["selector"]["matchLabels"]) == ["gateway"]
    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert (
        hpa["minReplicas"]
        >= find(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] + 1
    )
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert container(docs, "Deployment", "gateway")["resources"]["requests"]["cpu"]  # HPA needs it
    monitor = find(docs, "ServiceMonitor", "gateway")["spec"]
    gateway_service = find(docs, "Service", "gateway")
    assert labels_match(monitor["selector"]["matchLabels"], gateway_service["metadata"]["labels"])
    assert monitor["endpoints"][0]["port"] in [p["name"] for p in gateway_service["spec"]["ports"]]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        targets = selected(pods, policy["spec"]["podSelector"]["matchLabels"])
        assert targets and "gateway" not in targets, policy["metadata"]["name"]
        allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        assert selected(pods, allowed) == ["gateway"]
        for name in targets:
            spec = container(docs, find_kind(docs, name), name)
            assert policy["spec"]["ingress"][0]["ports"][0]["port"] in [
                p["containerPort"] for p in spec["ports"]
            ]


def find_kind(docs: tuple[dict[str, Any], ...], name: str) -> str:
    return next(w["kind"] for w in workloads(docs) if w["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_names_the_redis_service(overlay) -> None:
    docs = render(overlay)
    url = URL(env_of(docs, container(docs, "Deployment", "gateway"), {})["REDIS_URL"])
    service = find(docs, "Service", "redis")
    assert url.scheme == "redis" and url.host == "redis"
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = find(docs, "StatefulSet", "redis")["spec"]
    assert redis["replicas"] == 1 and redis["serviceName"] == "redis"
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    mounts = redis["template"]["spec"]["containers"][0]["volumeMounts"]
    claim = redis["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": data_dir} in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_pods_hardened(overlay) -> None:
    docs = render(overlay)
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        spec = pod["containers"][0]
        image, _, tag = spec["image"].rpartition(":")
        if image.startswith("llm-gateway/"):
            continue  # this project's images, built from the Dockerfile
        assert re.search(r"\d+\.\d+\.\d+", tag), spec["image"]
        if spec["name"] == "vllm":
            assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
            continue  # vLLM's image runs as root and writes into itself
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    gateway = find(docs, "Deployment", "gateway")["spec"]
    assert gateway["replicas"] == 2
    assert gateway["template"]["spec"]["topologySpreadConstraints"]
    if overlay == "worker":
        worker = container(docs, "Deployment", "worker")
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        startup = worker["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a long model load
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in worker[
            "volumeMounts"
        ]


# --- the processes, started for real with the manifests' environment ---------------------------


def probe_url(spec: dict[str, Any], probe: str, port: int) -> str:
    return f"http://127.0.0.1:{port}{spec[probe]['httpGet']['path']}"


@pytest.fixture(scope="module")
def pods(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Redis, the worker and the gateway as the worker overlay runs them, on loopback: the
    gateway reads its map from a ConfigMap-shaped folder, with the Services' names pointed
    at the loopback ports."""
    docs = render("worker")
    tmp = tmp_path_factory.mktemp("pods")
    redis = RedisServer(tmp).start()
    worker_spec = container(docs, "Deployment", "worker")
    gateway_spec = container(docs, "Deployment", "gateway")
    worker_port, gateway_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if k not in SECRETS}
    worker_env = {
        **base,
        **env_of(docs, worker_spec, SECRETS),
        "WORKER_PORT": str(worker_port),
        "WORKER_HOST": "127.0.0.1",
        # The random-weight demo model in place of SmolLM2, whose first start converts it;
        # the served name stays the overlay's, so the gateway's wiring is what is checked.
        "MODEL_PATH": "demo",
        "WORKER_CACHE_DIR": str(tmp / "cache"),
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TORCH_THREADS": "1",
    }
    gateway_env = {
        **base,
        **env_of(docs, gateway_spec, SECRETS),
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_HOST": "127.0.0.1",
        "REDIS_URL": redis.url,
    }
    volume = ConfigMapVolume(tmp / "config")
    volume.root.mkdir()
    config = find(docs, "ConfigMap", "gateway-config")["data"]["gateway.json"]
    volume.publish_text(config.replace("http://worker:8000", f"http://127.0.0.1:{worker_port}"))
    args = [
        str(volume.root / Path(a).name) if a.startswith("/config/") else a
        for a in gateway_spec["args"]
    ]
    logs = {name: (tmp / f"{name}.log").open("wb") for name in ("worker", "gateway")}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", *worker_spec.get("args", [])],
        cwd=ROOT,
        env=worker_env,
        stdout=logs["worker"],
        stderr=subprocess.STDOUT,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=gateway_env,
        stdout=logs["gateway"],
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(probe_url(worker_spec, "startupProbe", worker_port), worker)
        wait_healthy(probe_url(gateway_spec, "startupProbe", gateway_port), gateway)
        yield {
            "docs": docs,
            "worker": (worker, worker_spec, worker_port),
            "gateway": (gateway, gateway_spec, gateway_port),
            "redis": redis,
            "tmp": tmp,
        }
    finally:
        stop(gateway)
        stop(worker)
        redis.stop()
        for log in logs.values():
            log.close()


@pytest.mark.parametrize("name", ["worker", "gateway"])
@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_processes_answer_their_probes(pods, name, probe) -> None:
    _process, spec, port = pods[name]
    with urllib.request.urlopen(probe_url(spec, probe, port), timeout=5) as response:
        assert response.status == 200


def test_gateway_keeps_limits_in_the_redis_it_is_given(pods) -> None:
    _process, _spec, port = pods["gateway"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
        ready = json.loads(response.read())
    assert ready["limits"]["store"] == "redis" and ready["limits"]["redis"] == "up", ready


def test_redis_probe_command_answers(pods) -> None:
    redis = find(pods["docs"], "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    command = redis["readinessProbe"]["exec"]["command"]
    assert command == redis["livenessProbe"]["exec"]["command"]
    # The probe runs inside the pod, where Redis listens on its default port.
    result = subprocess.run(
        [command[0], "-p", str(pods["redis"].port), *command[1:]],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.stdout.strip() == "PONG"


def test_a_chat_goes_through_the_gateway_to_the_worker_with_the_secret_key(pods) -> None:
    _process, _spec, port = pods["gateway"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == ["local"]
    display = env_of(pods["docs"], _spec, {})["WORKER_DISPLAY_NAME"]
    assert models[0].model_extra["name"] == display
    reply = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.model == "local"
    client.close()
    _worker, _spec, worker_port = pods["worker"]
    direct = openai.OpenAI(
        base_url=f"http://127.0.0.1:{worker_port}/v1", api_key="x", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):  # the worker wants the Secret's key
        direct.models.list()
    direct.close()


def test_a_configmap_update_reaches_the_running_gateway(pods) -> None:
    """The kubelet's ..data swap, twice, and the gateway serves the new map each time."""
    _process, _spec, port = pods["gateway"]
    volume = ConfigMapVolume.existing(pods["tmp"] / "config")
    config = json.loads((volume.root / "gateway.json").read_text())
    for display in ("Renamed once", "Renamed twice"):
        config["endpoints"]["local"]["displayName"] = display
        volume.publish_text(json.dumps(config))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/v1/models", timeout=5
            ) as response:
                if json.loads(response.read())["data"][0]["name"] == display:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the gateway never served {display!r}")


def test_sigterm_drains_within_the_grace_period(pods) -> None:
    """Last: stops the gateway the way the kubelet does, after the preStop pause."""
    process, spec, _port = pods["gateway"]
    pod = find(pods["docs"], "Deployment", "gateway")["spec"]["template"]["spec"]
    pre_stop = float(spec["lifecycle"]["preStop"]["exec"]["command"][1])
    process.send_signal(signal.SIGTERM)
    assert process.wait(pod["terminationGracePeriodSeconds"] - pre_stop) == 0
