"""bench/gpu_session.sh, the one call on a lent GPU machine, proven here before a lease is spent on it: the script
parses and lints; its --dry-run runs every stage's commands on the CPU at the smallest sizes, reports each stage and
leaves no more files than the device tool brings back; a stage that runs out of time is stopped and reported, and
later stages still run."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from legw_fused.ops import EXTENSION_ERROR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ["1", "2", "3", "4", "5"]
# What the device tool brings back from $OUT: at most 8 plain files, no more than 2 folders down, each name made of
# letters, digits, '.', '_' and '-'.
MAX_FILES, MAX_FOLDERS_DOWN = 8, 2
NAME = re.compile(r"[A-Za-z0-9._-]+")
# summary.txt: stage, step, start (s into the session), seconds, limit, status
ROW = re.compile(r"^(\d)\s+(.+?)\s+(\d+)\s+(\d+)\s+(-?\d+|-)\s\s(.+)$")
HAVE_MNIST = importlib.util.find_spec("mnist") is not None

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None or shutil.which("timeout") is None,
                                reason=f"the dry run loads the built extension and uses coreutils' timeout "
                                       f"({EXTENSION_ERROR or 'no timeout command'})")


def run_session(out: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple]]:
    environ = {**os.environ, "OUT": str(out), "PY": sys.executable, **env}
    # conftest turns the Triton interpreter on for this process; the dry run proves the script, and interpreted
    # benchmarks would take minutes.
    environ.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], env=environ, capture_output=True, text=True,
                          timeout=1200)
    rows = [m.groups() for m in map(ROW.match, (out / "summary.txt").read_text().splitlines()) if m]
    return proc, rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    proc, rows = run_session(out)
    return out, proc, rows


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_dry_run_passes_and_reports_every_stage(dry_run):
    out, proc, rows = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted({r[0] for r in rows}) == STAGES
    for stage, step, _, _, _, status in rows:
        if step == "build for sm_90":  # a dry run never compiles: the extension is already built here
            assert status.startswith("skipped: dry run"), status
        elif stage == "5" and not HAVE_MNIST:
            assert status.startswith("skipped: no MNIST"), status
        else:
            assert status.startswith("ok"), (step, status)
    # The GPU tests are collected, and skip without a device.
    pytest_rows = {step: status for stage, step, *_, status in rows if stage in ("2", "3") and "syncs" not in step}
    assert len(pytest_rows) == 3 and all(re.search(r"\b[1-9]\d* skipped", s) for s in pytest_rows.values())


def test_dry_run_leaves_what_the_device_tool_brings_back(dry_run):
    out, _, _ = dry_run
    entries = list(out.rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert len(files) <= MAX_FILES, sorted(map(str, files))
    for p in entries:
        rel = p.relative_to(out)
        assert p.is_file() and not p.is_symlink() or p.is_dir(), rel
        assert all(NAME.fullmatch(part) for part in rel.parts), rel
        assert len(rel.parts) - 1 <= MAX_FOLDERS_DOWN, rel
    expected = {"summary.txt", "build.log", "tests.log", "bench.log", "bench.md", "bench.json"}
    expected |= {"train.log", "train.json"} if HAVE_MNIST else set()
    assert expected <= {p.name for p in files}


def test_dry_run_results_hold_every_stage_output(dry_run):
    out, _, _ = dry_run
    assert "legw_fused._C: loaded" in (out / "build.log").read_text()
    syncs = (out / "tests.log").read_text()
    assert re.search(r"^ok +LARS float32 \[cpp\]", syncs, re.M) and re.search(r"^ok +LSTM fwd\+bwd", syncs, re.M)
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench) == {"optimizer_cpu", "lstm_cpu"}
    for results in bench.values():
        assert results["runs"] and all(r["ms"] > 0 for run in results["runs"] for r in run["rows"])
    tables = (out / "bench.md").read_text()
    assert "| host-161 |" in tables and "| mnist |" in tables
    if HAVE_MNIST:
        train = json.loads((out / "train.json").read_text())
        assert train["task"] == "mnist" and train["runs"] and train["command"].startswith("legw-fused train mnist")
        assert "done legw" in (out / "train.log").read_text()


def test_a_stage_out_of_time_is_stopped_and_later_stages_run(tmp_path):
    proc, rows = run_session(tmp_path, "--stages", "2,5", GPU_SESSION_BUDGET_2="1",
                             GPU_SESSION_MIN_STEP_SECONDS="1")
    assert proc.returncode == 1  # a step that did not finish fails the session
    by_stage = {}
    for stage, step, _, seconds, limit, status in rows:
        by_stage.setdefault(stage, []).append((step, int(seconds), limit, status))
    assert all(status == "skipped: not in --stages" for s in "134" for _, _, _, status in by_stage[s])
    ((_, seconds, limit, status),) = by_stage["2"]
    assert status.startswith("TIMEOUT") and limit == "1" and seconds <= 1 + 15  # SIGINT at 1 s, SIGKILL 15 s later
    ((_, _, _, status),) = by_stage["5"]
    assert status.startswith("ok" if HAVE_MNIST else "skipped: no MNIST"), status
    assert "1 step(s) failed or ran out of time" in proc.stdout
