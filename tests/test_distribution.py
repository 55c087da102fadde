"""The distribution is ``fastface-id`` (the name ``fastface`` on the package index is another project)."""

from __future__ import annotations

import re
from pathlib import Path

from fastface.provenance import DIST_NAME, describe, install_hint, source_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
_WRONG = re.compile(r"pip install[^\n`]*[\"' ]fastface(\[|==|[\"'\s]|$)")


def test_pyproject_uses_our_distribution_name_and_extras_point_to_it():
    text = (REPO_ROOT / "pyproject.toml").read_text()  # tomllib is Python >= 3.11 only
    assert re.search(r'^name = "([^"]+)"', text, re.M).group(1) == DIST_NAME == "fastface-id"
    assert '"fastface[' not in text and '"fastface-id[faces]"' in text
    assert re.search(r'^fastface = "fastface.cli:main"$', text, re.M)


def test_no_message_or_document_tells_users_to_install_the_other_fastface():
    offenders = []
    for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"), *(REPO_ROOT / "src").rglob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _WRONG.search(line) or "fastface[" in line:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    assert install_hint("faces") == 'pip install "fastface-id[faces]"'


def test_source_commit_names_this_checkout():
    commit = source_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    assert describe()["commit"] == commit
