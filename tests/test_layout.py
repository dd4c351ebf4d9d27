"""The repository layout keeps its promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_mcp_resolves_to_the_official_sdk_even_with_the_repo_root_on_sys_path() -> None:
    # Run from the repo root, where `mcp/` sits: a package there would shadow the SDK.
    probe = "import mcp, mcp.types; print(mcp.__file__); print(mcp.types.Tool.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    location, tool = result.stdout.split()
    assert Path(location).resolve().parent != (REPO_ROOT / "mcp").resolve()
    assert tool == "Tool"
    assert not (REPO_ROOT / "mcp" / "__init__.py").exists()


def test_design_card_top_level_exists() -> None:
    for name in ["pyproject.toml", "p2p_node", "backends", "mcp", "tests", "bootstrap", "docs", "README.md"]:
        assert (REPO_ROOT / name).exists(), name
    for doc in ["ARCHITECTURE.md", "PROTOCOL.md", "benchmarks.md"]:
        assert (REPO_ROOT / "docs" / doc).is_file(), doc
