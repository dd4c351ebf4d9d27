"""The LiteLLM half of the routing and overhead benchmarks.

LiteLLM is asyncio-based and heavy, so it never shares an interpreter with the node: it
lives in its own virtual environment (`benchmarks/.venv-litellm`, created on first use
with `pip install 'litellm[proxy]'`; nothing is added to pyproject). The benchmark
scripts import this module only for the helpers below, which use the standard library
alone; `route` runs inside that environment:

    benchmarks/.venv-litellm/bin/python benchmarks/_litellm_side.py route --job JOB.json

`route` builds a `litellm.Router` over the simulated upstreams with the strategy the job
names, replays the job's arrival schedule with streamed chat requests and writes one JSON
record per request (TTFT, end-to-end time, tokens, error) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".venv-litellm"
# Comparable to our manager's defaults (max_attempts=3, failure_threshold=3, cooldown=5 s):
# two retries after the first attempt, a deployment cooled down after 3 failures for 5 s.
# The OpenAI SDK's own retries are off, so every retry is the router's and may move.
ROUTER_SETTINGS: dict[str, Any] = {"num_retries": 2, "allowed_fails": 3, "cooldown_time": 5, "timeout": 300}
QUIET_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch of the price list at import
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_SCHEMA_UPDATE": "True",
}


# ---- helpers for the benchmark scripts (standard library only) -----------------------------


def litellm_python(explicit: str | None) -> tuple[str | None, str]:
    """The interpreter that has LiteLLM, creating the venv on first use; or None and why not."""
    if explicit:
        return (explicit, "") if _has_litellm(explicit) else (None, f"{explicit} cannot import litellm")
    python = DEFAULT_VENV / "bin" / "python"
    if python.exists() and _has_litellm(str(python)):
        return str(python), ""
    print(f"[litellm] creating {DEFAULT_VENV} and installing litellm[proxy] (minutes)...", file=sys.stderr)
    try:
        subprocess.run(["python3", "-m", "venv", str(DEFAULT_VENV)], check=True, capture_output=True)
        # Keep the environment out of git status and out of ruff's walk of the tree.
        (DEFAULT_VENV / ".gitignore").write_text("*\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "litellm[proxy]"], check=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return None, f"installing litellm failed: {exc}"
    return (str(python), "") if _has_litellm(str(python)) else (None, "litellm installed but cannot be imported")


def _has_litellm(python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "import litellm"], capture_output=True, timeout=120, env=litellm_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def litellm_version(python: str) -> str:
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.stdout.strip() or "unknown"


def litellm_env() -> dict[str, str]:
    return {**os.environ, **QUIET_ENV}


def run_router(python: str, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs `route` in LiteLLM's interpreter; returns its per-request records."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(job, fh)
    try:
        done = subprocess.run(
            [python, __file__, "route", "--job", fh.name],
            capture_output=True,
            text=True,
            env=litellm_env(),
            timeout=job["duration_s"] + 300,
        )
    finally:
        os.unlink(fh.name)
    if done.returncode != 0:
        raise RuntimeError(f"the LiteLLM router run failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@contextlib.contextmanager
def running_proxy(python: str, upstream_url: str, port: int, model: str) -> Iterator[tuple[str, int]]:
    """LiteLLM's proxy (`litellm --config`, one uvicorn worker) in front of one upstream: its
    URL and process id."""
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "litellm.yaml"
        deployment = {
            "model_name": model,
            "litellm_params": {"model": f"openai/{model}", "api_base": upstream_url, "api_key": "x", "max_retries": 0},
        }
        # No auth, like the node: LiteLLM refuses that unless told it is meant (local use).
        general = {"dangerously_permit_weak_or_unset_master_key": True}
        config.write_text(json.dumps({"model_list": [deployment], "general_settings": general}))  # JSON is YAML
        log = (Path(workdir) / "proxy.log").open("wb")
        command = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--num_workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=litellm_env(),
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while not _answers(url + "/health/liveliness"):
                if process.poll() is not None or time.monotonic() > deadline:
                    output = (Path(workdir) / "proxy.log").read_text()[-3000:]
                    raise RuntimeError(f"LiteLLM proxy did not start:\n{output}")
                time.sleep(0.3)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# ---- inside LiteLLM's interpreter ------------------------------------------------------------


async def _route(job: dict[str, Any]) -> None:
    import asyncio

    import httpx
    from litellm import Router

    model_list = [
        {
            "model_name": "sim",
            "litellm_params": {"model": f"openai/{job['model']}", "api_base": url, "api_key": "x", "max_retries": 0},
            "model_info": {"id": name},
        }
        for name, url in zip(job["names"], job["urls"], strict=True)
    ]
    router = Router(model_list=model_list, routing_strategy=job["strategy"], **ROUTER_SETTINGS)
    records: list[dict[str, Any]] = []

    async def one(index: int, offset: float, start: float) -> None:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        sent = time.perf_counter()
        record: dict[str, Any] = {"index": index, "ttft": None, "tokens": 0, "error": None}
        response: Any = None
        try:
            async with asyncio.timeout(job["client_timeout_s"]):
                response = await router.acompletion(
                    model="sim",
                    messages=[{"role": "user", "content": job["prompts"][index]}],
                    max_tokens=job["max_tokens"],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in response:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if record["ttft"] is None:
                            record["ttft"] = time.perf_counter() - sent
                        record["tokens"] += 1
        except TimeoutError:
            record["error"] = f"client gave up after {job['client_timeout_s']} s"
        except Exception as exc:  # a failed client request is a result here, not a crash
            record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if response is not None and hasattr(response, "aclose"):  # frees the upstream connection
                with contextlib.suppress(Exception):
                    await response.aclose()
        record["e2e"] = time.perf_counter() - sent
        record["finished"] = time.perf_counter() - start
        records.append(record)

    async with httpx.AsyncClient() as client:  # same start line for every run: reset the upstreams now
        for url in job["urls"]:
            (await client.post(url.removesuffix("/v1") + "/_sim/reset")).raise_for_status()
    start = time.perf_counter()
    await asyncio.gather(*(one(i, offset, start) for i, offset in enumerate(job["arrivals"])))
    for record in sorted(records, key=lambda r: r["index"]):
        print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    route = commands.add_parser("route", help="replay a job's arrivals through litellm.Router")
    route.add_argument("--job", required=True)
    args = parser.parse_args()
    if args.command == "route":
        import asyncio
        import logging

        logging.disable(logging.WARNING)  # retries and cooldowns are counted, not printed
        asyncio.run(_route(json.loads(Path(args.job).read_text())))


if __name__ == "__main__":
    main()
