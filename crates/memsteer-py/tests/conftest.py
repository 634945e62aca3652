import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "fixtures"


def _binary() -> str:
    """The `memsteer` binary the parity tests compare against (MEMSTEER_BIN, else the debug build)."""
    given = os.environ.get("MEMSTEER_BIN")
    if given:
        return given
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    built = target / "debug" / "memsteer"
    if not built.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "memsteer-cli"], cwd=ROOT, check=True)
    return str(built)


@pytest.fixture(scope="session")
def cli():
    binary = _binary()

    def run(*args: str) -> str:
        out = subprocess.run([binary, *args], capture_output=True, text=True)
        assert out.returncode == 0, f"memsteer {args} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    return run


@pytest.fixture()
def tiny_model(tmp_path):
    """The tiny GPT-2 with a tokenizer, in a fresh directory."""
    src = FIXTURES / "lm" / "tiny-gpt2-tokenizer"
    dst = tmp_path / "tiny"
    shutil.copytree(src, dst)
    return dst
