"""scripts/gpu_check.sh, the one prepared GPU run: its dry run checks every step on a CPU machine."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env_python = Path(sys.executable).parent  # the benches run with this environment's python
    env = {"PATH": f"{env_python}:/usr/bin:/bin"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_the_dry_run_checks_every_bench_and_its_options_and_runs_none():
    res = _run("--dry-run")
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("would run")]
    assert [s.split(": ", 1)[1].split()[1] for s in steps] == [
        "bench/pretrain_vs_hf.py",
        "bench/finetune_vs_peft.py",
        "bench/decode_vs_llamacpp.py",
        "bench/grpo_vs_trl.py",
    ]
    assert all("--device cuda" in s for s in steps)
    assert res.stdout.rstrip().endswith("dry run ok (4 steps)")


def test_an_unknown_option_is_one_line_and_exit_code_2():
    res = _run("--fast")
    assert res.returncode == 2
    assert res.stderr.strip() == "gpu_check.sh: unknown option '--fast' (expected --dry-run or nothing)"
