"""How alignd installs: one import package, ``alignd``, whatever the repository's folders are called, with a light
public module for plugin authors."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import alignd

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    """The packages list is written by hand (the folders are mapped onto ``alignd``): a new folder must be in it, or
    a wheel would silently leave it out."""
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    expected = set()
    for package, folder in setuptools["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            expected.add(".".join((package, *parts)))
    data_only = set(setuptools.get("package-data", {}))  # folders of data files, without an __init__.py
    assert expected | data_only == listed, f"missing: {sorted(expected - listed)}, stale: {sorted(listed - expected)}"


def test_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    """Nothing named ``server``, ``plugins`` or ``clients`` lands at the top of site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("alignd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"alignd"}
    # The web pages travel as package data; the built-ins and domains sit under alignd.
    assert "alignd/clients/web/index.html" in names
    assert "alignd/plugins/thumbs.py" in names and "alignd/feedback/hookspecs.py" in names


def test_public_module_is_light_and_complete() -> None:
    """``import alignd`` gives a plugin author everything in ``__all__`` without torch, vLLM or the web framework."""
    code = ("import sys, alignd\n"
            "missing = [n for n in alignd.__all__ if not hasattr(alignd, n)]\n"
            "heavy = [m for m in ('torch', 'vllm', 'transformers', 'litestar') if m in sys.modules]\n"
            "print(missing, heavy)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[] []"
    for name in ("hookimpl", "Feedback", "Signal", "PreferencePair", "Label", "Rejection", "RegisterKind",
                 "CompletionRecord", "choice_text", "completion_prompt"):
        assert name in alignd.__all__


def test_plugin_docs_and_example_use_only_the_public_module() -> None:
    """What plugin authors copy imports ``alignd`` only, never its internals (they may change between releases)."""
    internal = re.compile(r"^\s*(from alignd\.\w|import alignd\.)", re.MULTILINE)
    for path in (REPO / "docs" / "plugins.md", REPO / "tests" / "plugin_example" / "alignd_unsafe.py"):
        assert not internal.findall(path.read_text()), f"{path.name} imports alignd internals"
