"""scripts/bench.py's queue-depth rows tell a server that sleeps (waits for requests)
from one that waits, runnable, for a CPU: the main thread's run and run-queue times from
/proc/PID/schedstat, as fractions of the run (issue 17: on the loaded 2-core machine the
"busy 56%" of chainfs's server at QD16 was running 0.53-0.60 and waiting for a CPU
0.36-0.46, not sleeping)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench() -> ModuleType:
    """scripts/bench.py as a fresh module (its dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_parse_schedstat() -> None:
    # run time (ns), run-queue wait (ns), timeslices
    assert bench().parse_schedstat("2750000000 2550000000 342448\n") == (
        2750000000,
        2550000000,
    )


def test_shares_of_the_run() -> None:
    b = bench()
    ran, waited = b.sched_shares((1_000_000_000, 500_000_000), (3_750_000_000, 3_050_000_000), 5.0)
    assert (ran, waited) == pytest.approx((0.55, 0.51))
    assert all(math.isnan(x) for x in b.sched_shares(None, (1, 2), 5.0))
    assert all(math.isnan(x) for x in b.sched_shares((1, 2), None, 5.0))


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat")
def test_sched_ns_of_a_process() -> None:
    got = bench().sched_ns(os.getpid())
    assert got is not None
    assert all(isinstance(x, int) and x >= 0 for x in got)
    assert got[0] > 0  # this process has run


def test_fio_with_cpu_gives_the_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    b = bench()
    fio_json = {
        "jobs": [
            {
                "error": 0,
                "read": {"total_ios": 1000, "iops": 200.0, "runtime": 5000},
                "write": {"total_ios": 0, "iops": 0.0, "runtime": 0},
            }
        ]
    }
    monkeypatch.setattr(b, "run", lambda args: "fio-3.33\n" + json.dumps(fio_json))
    readings = iter([(10_000, 20_000), (10_000 + 5_000, 20_000 + 1_000)])
    monkeypatch.setattr(b, "sched_ns", lambda pid: next(readings))
    clock = iter([100.0, 100.00001])
    monkeypatch.setattr(b, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    iops, cpu_us, ran, waited = b.fio_with_cpu(["fio"], os.getpid())
    assert iops == 200.0
    assert cpu_us >= 0
    assert (ran, waited) == pytest.approx((0.5, 0.1))


def test_qd_table_has_the_columns() -> None:
    b = bench()
    r = b.QdResults()
    label = "4 KiB random read, libaio QD16"
    r.rows[label] = (
        [(60000.0, 7.0, 0.47, 0.51), (80000.0, 6.9, 0.55, 0.39)],
        [(100000.0, 6.7, 0.58, 0.35)],
    )
    r.rows["no schedstat"] = ([(1.0, 1.0, math.nan, math.nan)], [(2.0, 1.0, 0.1, 0.2)])
    rows = b.qd_rows(r)
    assert len(b.QD_HEADER) == len(rows[0])
    cells = dict(zip(b.QD_HEADER, rows[0], strict=True))
    assert cells["chainfs"] == "80000"  # the best run, with its own figures
    assert cells["chainfs ran/waited"] == "0.55/0.39"
    assert cells["qsd ran/waited"] == "0.58/0.35"
    assert cells["ratio"] == "0.80"
    assert dict(zip(b.QD_HEADER, rows[1], strict=True))["chainfs ran/waited"] == "-"
