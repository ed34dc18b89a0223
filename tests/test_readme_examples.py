"""The README's examples, pasted in order on a fresh clone, find every file they use:
its first command makes them (a user may have no photo or poster at hand)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def files_the_examples_read() -> set[str]:
    """Local files the README's commands read: curl's @uploads, the CLI's and the client's inputs."""
    used = set(re.findall(r"=@([\w.-]+\.\w+)", README))
    for line in re.findall(r"^strata (?:remove-bg|layers) ([^\n]*?) -o ", README, re.MULTILINE):
        used |= set(line.split())
    used |= set(re.findall(r'strata\.(?:remove_background|decompose)\("([\w.-]+)"', README))
    return used


def test_the_first_command_makes_every_file_the_examples_read(tmp_path):
    (maker,) = re.findall(r'^\.venv/bin/python -c "\n(.*?)"$', README, re.MULTILINE | re.DOTALL)
    subprocess.run([sys.executable, "-c", maker], cwd=tmp_path, check=True)
    used = files_the_examples_read()
    assert {"photo.jpg", "poster.png"} <= used
    missing = sorted(name for name in used if not (tmp_path / name).is_file())
    assert missing == [], f"the README's examples read {missing}, which its first command does not make"
