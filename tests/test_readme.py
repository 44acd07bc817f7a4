"""The README's two commands are the ones that CI and users run."""

import re

from conftest import REPO


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())


def test_readme_starts_with_quickstart_and_test_commands():
    quickstart, tests = readme_commands()[:2]
    assert "atat train --config configs/atat/quickstart.yaml" in quickstart and "atat eval" in quickstart
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
