"""Paired timing: a candidate against a reference in the same run, one ratio per pair.

The machines are shared and their load drifts during a run. Measuring the compared callables
alternately, with the order rotated every round (two callables: AB BA AB ...), exposes them to
the same drift and to the same order effects; a ratio per pair cancels what the pair shared, and
the median of the ratios ignores the few pairs a burst of load hit unevenly. Best-of (min) times
assume interference only adds time, and a ratio of two independent medians pairs nothing.
"""
import statistics
import time
from typing import Callable, Sequence


def rotated(items: Sequence, r: int) -> list:
    """`items` in round r's order: each item leads in turn."""
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def interleaved(fns: Sequence[Callable[[], object]], rounds: int,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call of each fn over `rounds` rounds, one call of each per round, in rotated
    order. `clock` is read around each call (time.thread_time for single-threaded CPU work; on CUDA
    the fn must synchronize before it returns)."""
    seconds = [[] for _ in fns]
    for r in range(rounds):
        for i in rotated(range(len(fns)), r):
            start = clock()
            fns[i]()
            seconds[i].append(clock() - start)
    return seconds


def paired_ratio(candidate_seconds: Sequence[float], reference_seconds: Sequence[float]) -> dict:
    """Median, quartiles, range and count of candidate[i] / reference[i], with the ratios.
    Quartiles by linear interpolation between order statistics (statistics.quantiles'
    "inclusive" method, numpy.percentile's default); with one pair all of them are that ratio."""
    ratios = [c / r for c, r in zip(candidate_seconds, reference_seconds, strict=True)]
    if not ratios:
        raise ValueError("paired_ratio needs at least one pair")
    p25, median, p75 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": median, "p25": p25, "p75": p75, "min": min(ratios), "max": max(ratios),
            "n": len(ratios), "ratios": ratios}
