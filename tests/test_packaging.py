"""A user who installs lmkiln from a wheel (not an editable checkout) gets every file it reads at run
time: recipes, probe files, pair lists, the chat page, the report template."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_data_file_of_the_package(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a clean copy: a checkout's build/ may hold files from an older build
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=source,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("lmkiln-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "lmkiln"
    data = [
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert len(data) >= 19 and "lmkiln/eval/probes/axes/occupation.yaml" in data
    assert [d for d in data if d not in names] == []
