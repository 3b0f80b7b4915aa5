"""The README's Python blocks run as written (each in a fresh interpreter, in an empty folder),
so the README cannot drift from the code."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_its_api_blocks():
    assert len(BLOCKS) >= 3 and all("import fastsae" in b or "from fastsae" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(README.parent))
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
