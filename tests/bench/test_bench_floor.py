"""The idle-loop floor under the CPU target: what an event loop costs per wakeup, doing nothing else."""

from __future__ import annotations

from bench.floor import wakeup_floor


def test_the_floor_counts_this_threads_cpu_per_1000_wakeups_of_the_loop_serve_runs() -> None:
    floor = wakeup_floor(0.001, 50)

    assert floor["period_s"] == 0.001 and floor["wakeups"] == 50
    assert floor["loop"] == "uvloop"  # requirements.txt installs it, and `serve` takes it when installed
    # Each wakeup costs some CPU, and far less than the millisecond between wakeups.
    assert 0 < floor["cpu_s_per_1k_wakeups"] < 1.0
