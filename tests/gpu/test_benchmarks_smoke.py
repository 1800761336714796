"""Every benchmarks/gpu/*.py runs with --smoke on the CPU and appends its table (this test never skips: it keeps
the GPU benchmarks from rotting in CPU CI). The scripts run at once, each as its own process with CUDA hidden,
so the test takes as long as the slowest one (~10-20 s on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks" / "gpu").glob("*.py"))


def test_there_are_gpu_benchmarks_and_a_runner() -> None:
    assert any(s.name == "trainer_mfu.py" for s in SCRIPTS), SCRIPTS
    run_all = (ROOT / "benchmarks" / "gpu" / "run_all.sh").read_text()
    assert "benchmarks/gpu/*.py" in run_all and "tests/gpu" in run_all and "genserver_throughput.py" in run_all
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu" / "run_all.sh")]).returncode == 0


def test_every_gpu_benchmark_runs_with_smoke_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("ASYNCGRPO_RUN_ALL", None)
    runs = {}
    for script in SCRIPTS:
        md = tmp_path / f"{script.stem}.md"
        log = (tmp_path / f"{script.stem}.log").open("w")
        runs[script.stem] = (md, log, subprocess.Popen(
            [sys.executable, str(script), "--smoke", "--append", str(md)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120
    failures = []
    for name, (md, log, proc) in runs.items():
        try:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        out = (tmp_path / f"{name}.log").read_text()
        if rc != 0:
            failures.append(f"{name}: rc {rc}\n{out[-3000:]}")
        elif not md.exists() or "\n## " not in md.read_text() or "|---" not in md.read_text():
            failures.append(f"{name}: no table appended to {md}\n{out[-2000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))
