"""Run rotator's command line under cProfile, in every thread, measuring CPU time (not waits).

    python bench/profiled.py OUT.pstats --config FILE run --once
    python -m pstats OUT.pstats        # then: sort tottime / stats 30, or sort cumulative / stats 40

cProfile alone sees only the thread it was started in, and a pass rotates users in worker threads; here
each thread gets a profiler of its own, and every profile of a thread that finished is merged into
OUT.pstats when the process exits. The clock is the thread's CPU time (``time.thread_time``), so a
thread sleeping through a propagation wait or blocked on a socket counts nothing. Profiling slows the
code down 2-3 times: use it to see where the CPU goes, never for the figures in docs/benchmarks.md
(``fleet_bench.py --profile FILE`` runs the pass's child this way).
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import sys
import threading
import time


def main() -> None:
    out, sys.argv = sys.argv[1], ["rotator", *sys.argv[2:]]
    finished: list[cProfile.Profile] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()
            with lock:
                finished.append(profile)

    threading.Thread.run = run  # type: ignore[method-assign]  # every thread started from now on
    main_thread = cProfile.Profile(time.thread_time)

    def dump() -> None:
        main_thread.disable()
        stats = pstats.Stats(main_thread)
        with lock:
            for profile in finished:
                stats.add(profile)
        stats.dump_stats(out)

    atexit.register(dump)
    main_thread.enable()
    from rotator.cli import main as rotator

    rotator()


if __name__ == "__main__":
    main()
