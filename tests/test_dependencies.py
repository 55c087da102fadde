"""Face analysis installs everywhere: cheap imports, and no compiler needed for the [faces] extra."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnxruntime", "dlib", "cv2")

_IMPORT_PROBE = """
import json, sys
import fastface, fastface.faces
before = {m: m in sys.modules for m in %(heavy)r}
from fastface.faces import get_backend
get_backend("dlib")
after = {m: m in sys.modules for m in %(heavy)r}
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_fastface_and_faces_loads_no_backend():
    code = _IMPORT_PROBE % {"heavy": HEAVY}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(state["before"].values()), f"imported too early: {state['before']}"
    # the probe can see an import happen: building the dlib backend does load dlib
    assert state["after"]["dlib"] is True
    assert state["after"]["onnxruntime"] is False


_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|"
    r"Could not fetch URL|No route to host|Connection refused|ProxyError|timed out", re.IGNORECASE)
_NO_WHEEL = re.compile(r"Could not find a version that satisfies the requirement ([^\s;]+)")


def test_default_and_faces_extras_resolve_to_wheels_only(tmp_path):
    """``pip install ".[faces]"`` from the registries needs no compiler: every dependency is a wheel."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
        "--disable-pip-version-check", "--report", str(report),
        "-c", str(REPO_ROOT / "constraints.txt"), f"{REPO_ROOT}[faces]",
    ]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and _UNREACHABLE.search(output) and not _NO_WHEEL.search(output):
        pytest.skip(f"package registry unreachable: {_UNREACHABLE.search(output).group(0)}")
    if proc.returncode != 0:
        missing = _NO_WHEEL.findall(output)
        detail = f"no wheel for {', '.join(missing)} (it would be built from source)" if missing else output[-2000:]
        pytest.fail(f"the [faces] install does not resolve to wheels only: {detail}")
    items = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in items}
    assert {"onnxruntime", "dlib-bin", "numpy", "pillow"} <= names
    not_wheels = [
        item["metadata"]["name"] for item in items
        if not item["download_info"]["url"].endswith(".whl")
        and not item["download_info"]["url"].startswith(REPO_ROOT.as_uri())  # the project itself
    ]
    assert not not_wheels, f"resolved to source distributions: {not_wheels}"
    assert "insightface" not in names
    # Our own distribution name: "fastface" on the index is an unrelated project.
    assert "fastface-id" in names and "fastface" not in names
