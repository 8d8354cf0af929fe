"""The README's test command is what CI runs, so the front door stays true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [block.strip() for block in blocks]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if c.endswith("pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert test_command.startswith("pip install torch==2.13.0 && ")
