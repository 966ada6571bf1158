"""The documentation: the mkdocs site builds strictly (a broken link, a page missing from the nav
or a docstring mkdocstrings cannot render fails it), and the README stays short with working
links."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 300

# [text](target) and ![alt](target); the target ends at whitespace or ")".
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def relative_links(markdown: str) -> list[str]:
    """Link targets that point into the repository (no scheme, no bare anchor), anchors cut off."""
    text = FENCE.sub("", markdown)
    targets = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


# Public names documented on their module's page rather than on their own.
DOCUMENTED_WITH_MODULE = {"diswot_score": "search"}


def public_names() -> list[str]:
    """``visdistill.__all__``, read without importing torch."""
    tree = ast.parse((ROOT / "visdistill" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError("visdistill/__init__.py defines no __all__")


def mkdocs_command() -> list[str]:
    """mkdocs from this interpreter's environment, so the test checks what is installed here."""
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the docs extra is not installed ({exc.name}); pip install -e '.[docs]'")
    return [sys.executable, "-m", "mkdocs"]


def test_relative_links_finds_file_links_only():
    text = (
        "[a](docs/a.md) [b](docs/b.md#part) [c](https://x.org/c.md) [d](#anchor) "
        "![img](docs/images/i.png) [e](mailto:x@y.z)\n```\n[f](not/a/link.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "docs/b.md", "docs/images/i.png"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (limit {README_MAX_LINES}): move detail into docs/"
    )


def test_readme_keeps_the_two_setup_commands():
    """The set-up contract: install + quickstart, install + tests (what CI runs)."""
    text = README.read_text(encoding="utf-8")
    assert (
        "bash scripts/install.sh && .venv/bin/visdistill fit --config configs/quickstart.yaml"
        in text
    )
    assert "bash scripts/install.sh && .venv/bin/python -m pytest -q" in text


def test_readme_relative_links_point_to_existing_files():
    targets = relative_links(README.read_text(encoding="utf-8"))
    assert targets, "README.md links to no docs page"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_api_reference_covers_every_public_name():
    """Each name of ``visdistill.__all__`` has a ``::: visdistill.<name>`` entry in docs/api/."""
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: visdistill\.(\w+)\s*$", pages, re.M))
    missing = [
        name
        for name in public_names()
        if name not in documented and DOCUMENTED_WITH_MODULE.get(name) not in documented
    ]
    assert not missing, (
        f"public names without an API reference entry: {missing}; add '::: visdistill.<name>' "
        "to the fitting page under docs/api/ (and the page to mkdocs.yml's nav if it is new)"
    )


def test_docs_do_not_point_outside_the_project():
    """Users have the repository, not the notes it was written from."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in [README, *sorted((ROOT / "docs").rglob("*.md"))]
        if re.search(r"(\.\./)?shared/(methods|DESIGN)", p.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"these pages point outside the project: {offenders}"


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`: fails on broken links and anchors, nav entries to missing pages,
    and API pages whose objects or docstrings cannot be rendered."""
    command = mkdocs_command()
    result = subprocess.run(
        [
            *command,
            "build",
            "--strict",
            "--quiet",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    # mkdocstrings rendered the docstrings, not just the page titles
    terms_page = (tmp_path / "api" / "terms" / "index.html").read_text(encoding="utf-8")
    assert "Hinton knowledge distillation" in terms_page
    assert (tmp_path / "methods" / "kd" / "index.html").is_file()
