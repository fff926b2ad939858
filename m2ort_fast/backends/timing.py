"""How `--backend auto` decides: candidates timed in interleaved rounds until the pick is stable,
a pick within the noise of a higher precision given to that precision, and whether the machine
was quiet enough for the pick to be remembered.

Everything here is pure logic over per-batch seconds (``samples``: candidate -> seconds of each
round's batch, in round order) and a load reading, so that it is tested with injected timings:

    run_rounds(calls, precisions, policy, clock=..., load=...) -> Rounds
    decide(samples, precisions, floor) -> Pick (the pick, the ranking, why)

**Rounds.** Each round runs one batch of every candidate still in the race, in an order rotated
from round to round (no candidate always runs first, right after another's cache-hungry batch).
From ``min_rounds`` on, each round decides; timing stops once the last ``stable_rounds`` decisions
agree (stable), or when ``max_rounds`` or the time budget ends (then the run says so). A candidate
whose fastest batch is slower than the leader's slowest is out of the race (reported as timed).

**Noise.** Two candidates are compared round by round: r = seconds of the rival / seconds of the
candidate, in the rounds both ran (a slowdown of the whole machine cancels in r). The candidate is
faster *beyond the noise* when median(r) - 1 exceeds max(``noise_floor``, half the interquartile
range of r). Among the candidates within the noise of the fastest, the pick is the one of highest
precision (fp32 > fp16 > bf16 > int8), then the earliest in ``precisions``' order (the candidate
list's: the reference ``torch`` first), so that two backends at one precision whose medians swap
from run to run within the noise give one pick.

**Busy.** A pick is remembered only when it was made on a quiet machine: the timing was stable,
the other processes' CPU use during the rounds (plus the hypervisor's steal time) left this
process's threads the cores they need (load = our threads + others' cores <= cores +
``BUSY_TOLERANCE_CORES``), and the rounds agree: the pick beat every candidate it is faster than
(beyond the noise) in at least ``agree_share`` of their rounds.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

# more bits first: a pick within the noise of a faster candidate goes to the higher rank
PRECISION_RANK = {"fp32": 4, "fp16": 3, "bf16": 2, "int8": 1}
# others' CPU use (cores) that still counts as quiet: a shell, the logger, the kernel
BUSY_TOLERANCE_CORES = 0.25


@dataclasses.dataclass(frozen=True)
class RoundsPolicy:
    min_rounds: int = 3  # rounds before the first decision
    stable_rounds: int = 3  # consecutive rounds whose decision must agree
    max_rounds: int = 30
    budget_s: float = 60.0  # timing only (builds and warm-ups apart)
    noise_floor: float = 0.03  # closer than 3% is within the noise, whatever the spread
    agree_share: float = 2 / 3


@dataclasses.dataclass(frozen=True)
class LoadReading:
    """CPU use over an interval: ``others_cores`` (other processes, averaged over the interval),
    ``steal_cores`` (taken by the hypervisor), out of ``cores`` (this process's CPUs), with
    ``threads`` compute threads of our own."""

    others_cores: float
    steal_cores: float
    cores: int
    threads: int

    @property
    def load_cores(self) -> float:
        return self.threads + self.others_cores + self.steal_cores

    def busy(self) -> str | None:
        """Why the machine counts as busy, or None."""
        if self.load_cores <= self.cores + BUSY_TOLERANCE_CORES:
            return None
        return (
            f"load {self.load_cores:.2f} cores above the {self.cores} available ({self.threads} threads of ours, "
            f"{self.others_cores:.2f} cores used by other processes, {self.steal_cores:.2f} stolen by the host)"
        )


class ProcStatLoad:
    """Measures :class:`LoadReading` over an interval from /proc/stat (the CPUs this process may
    run on) and this process's own CPU time: ``start()`` then ``stop()``. None where /proc is not."""

    def __init__(self, threads: int):
        self.threads = threads
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._start: tuple[float, float, float, float] | None = None

    def _read(self) -> tuple[float, float, float, float] | None:
        """(busy s, steal s, own CPU s, wall s) now, or None."""
        tick = os.sysconf("SC_CLK_TCK")
        busy = steal = 0.0
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *fields = line.split()
                    if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in self.cpus:
                        continue
                    # user nice system idle iowait irq softirq steal ...
                    values = [int(v) for v in fields[:8]]
                    busy += sum(values[:3]) + sum(values[5:7])
                    steal += values[7]
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()
        return busy / tick, steal / tick, own.user + own.system, time.monotonic()

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> LoadReading | None:
        end = self._read()
        if self._start is None or end is None or end[3] <= self._start[3]:
            return None
        busy, steal, own, wall = (b - a for a, b in zip(self._start, end, strict=True))
        return LoadReading(max(busy - own, 0.0) / wall, steal / wall, len(self.cpus), self.threads)


def paired_ratios(candidate: Sequence[float], rival: Sequence[float]) -> list[float]:
    """rival's seconds / candidate's, round by round over the rounds both ran (> 1: candidate faster)."""
    return [r / c for c, r in zip(candidate, rival, strict=False)]


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of ``values`` (one value: itself thrice)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return q25, q50, q75


def faster_beyond_noise(candidate: Sequence[float], rival: Sequence[float], floor: float) -> bool:
    """Whether ``candidate`` (seconds per round) is faster than ``rival`` beyond the noise."""
    q25, median, q75 = quartiles(paired_ratios(candidate, rival))
    return median - 1 > max(floor, (q75 - q25) / 2)


def win_share(candidate: Sequence[float], rival: Sequence[float]) -> float:
    """The share of the rounds both ran in which ``candidate`` was the faster."""
    ratios = paired_ratios(candidate, rival)
    return sum(r > 1 for r in ratios) / len(ratios)


@dataclasses.dataclass(frozen=True)
class Pick:
    name: str
    ranking: tuple[str, ...]  # fastest (median seconds) first
    why: str


def decide(samples: Mapping[str, Sequence[float]], precisions: Mapping[str, str], floor: float) -> Pick:
    """The pick among ``samples`` (candidate -> seconds per round, at least one round each): the
    fastest by median, unless a candidate of higher precision is within its noise (see the module)."""
    ranking = tuple(sorted(samples, key=lambda name: statistics.median(samples[name])))
    fastest = ranking[0]
    close = [n for n in ranking if n == fastest or not faster_beyond_noise(samples[fastest], samples[n], floor)]
    preference = list(precisions)
    pick = max(close, key=lambda n: (PRECISION_RANK.get(precisions[n], 0), -preference.index(n)))
    if pick != fastest and precisions[pick] == precisions[fastest]:
        why = f"within the noise of {fastest}, which is faster by the medians; same precision, earlier candidate"
    elif pick != fastest:
        why = f"within the noise of {fastest}, which is faster by the medians; higher precision ({precisions[pick]})"
    elif len(ranking) == 1:
        why = "the only candidate"
    elif len(close) > 1:
        why = f"fastest; {', '.join(close[1:])} within its noise, at no higher precision"
    else:
        why = f"fastest, beyond the noise of the next ({ranking[1]})"
    return Pick(pick, ranking, why)


def rounds_disagree(samples: Mapping[str, Sequence[float]], pick: str, floor: float, agree_share: float) -> str | None:
    """Why the rounds disagree with ``pick`` (a candidate it is faster than beyond the noise won
    too many rounds against it), or None."""
    for name, seconds in samples.items():
        if name == pick or not faster_beyond_noise(samples[pick], seconds, floor):
            continue
        share = win_share(samples[pick], seconds)
        if share < agree_share:
            return f"rounds disagree: {pick} is faster than {name} by the medians, yet won {share:.0%} of the rounds"
    return None


def clearly_slower(seconds: Sequence[float], leader: Sequence[float], floor: float) -> bool:
    """Whether a candidate is out of the race: after 3 rounds at least, its fastest batch slower
    than the leader's slowest, and the leader faster beyond the noise."""
    if min(len(seconds), len(leader)) < 3:
        return False
    return min(seconds) > max(leader) and faster_beyond_noise(leader, seconds, floor)


@dataclasses.dataclass
class Rounds:
    """What :func:`run_rounds` measured and decided."""

    samples: dict[str, list[float]]  # candidate -> seconds of its batch in each round it ran
    pick: Pick
    rounds: int
    stable: bool
    stopped: str  # why timing stopped, in words
    left_race: dict[str, int]  # candidate -> the round after which it was out of the race
    load: LoadReading | None
    busy: list[str]  # why the pick is not to be remembered; empty: remember it

    @property
    def remember(self) -> bool:
        return not self.busy


def run_rounds(
    calls: Mapping[str, Callable[[], object]],
    precisions: Mapping[str, str],
    policy: RoundsPolicy = RoundsPolicy(),
    *,
    clock: Callable[[], float] = time.perf_counter,
    load: ProcStatLoad | None = None,
    batches_per_call: Mapping[str, int] | None = None,
) -> Rounds:
    """Time ``calls`` (candidate -> one batch, warmed up) in interleaved rounds and decide (see the
    module). ``precisions``: candidate -> precision name. ``batches_per_call``: candidates whose
    call runs several batches at once (``backends.workers.calls_at_once``): their seconds are per
    batch. ``clock``/``load``: injected in tests."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    batches_per_call = batches_per_call or {}
    racing, decisions, left_race = list(calls), [], {}
    stable, stopped, n = False, "", 0
    if load is not None:
        load.start()
    start = clock()
    while not stopped:
        n += 1
        shift = (n - 1) % len(racing)
        for name in racing[shift:] + racing[:shift]:
            t0 = clock()
            calls[name]()
            samples[name].append((clock() - t0) / batches_per_call.get(name, 1))
        if n >= policy.min_rounds:
            pick = decide({k: samples[k] for k in racing}, precisions, policy.noise_floor)
            decisions.append(pick.name)
            leader = samples[pick.ranking[0]]
            for name in [k for k in racing if clearly_slower(samples[k], leader, policy.noise_floor)]:
                racing.remove(name)
                left_race[name] = n
            recent = decisions[-policy.stable_rounds :]
            if len(racing) == 1 or (len(recent) == policy.stable_rounds and len(set(recent)) == 1):
                stable, stopped = True, f"stable after {n} rounds"
        if not stopped and clock() - start >= policy.budget_s:
            stopped = f"the time budget ({policy.budget_s:g} s) ended after {n} rounds, before the pick was stable"
        elif not stopped and n >= policy.max_rounds:
            stopped = f"{n} rounds (the most allowed) without a stable pick"
    pick = decide(samples, precisions, policy.noise_floor)  # those out of the race cannot win: named in why
    reading = load.stop() if load is not None else None
    busy = [] if stable else [f"not stable: {stopped}"]
    busy += [why for why in (reading.busy() if reading else None, _disagree(samples, racing, pick, policy)) if why]
    return Rounds(samples, pick, n, stable, stopped, left_race, reading, busy)


def _disagree(samples: Mapping[str, list[float]], racing: list[str], pick: Pick, policy: RoundsPolicy) -> str | None:
    return rounds_disagree({k: samples[k] for k in racing}, pick.name, policy.noise_floor, policy.agree_share)
