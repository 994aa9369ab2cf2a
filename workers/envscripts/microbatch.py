"""The micro-batch arithmetic shared by the probe (workers/envscripts/batch_probe.py, in the TRAINING
env) and the panel (app/services/batching.py): which micro-batches to measure, what a measured
probe predicts for the sizes it did not measure, and which split of an optimizer step is fastest.

An optimizer step of S sequences per GPU can be split into a micro-batch m (per_device_train_batch_size)
and S / m accumulation steps: the same sequences per step, so the same loss curve, and the split only
changes speed and memory. Standard library only: both environments import this file.

A measurement is a dict: {"micro": m, "ok": bool, "peak_reserved_mib", "peak_allocated_mib",
"fb_s" (forward + backward of one micro-batch), "opt_s" (clip + optimizer step + zero_grad), "error"};
the size the probe expects to be chosen also has "loop_step_s" (an optimizer step of the trainer's own
loop at `loop_accumulation` micro-batches per step, over "loop_steps" steps).
"""

from __future__ import annotations

import statistics
from typing import Any

# Two options within this share of the best throughput are as fast: the larger micro-batch wins
# (fewer, larger kernels; the probe's timing noise is about 1 %).
AS_FAST = 0.99


def divisors(n: int) -> list[int]:
    """The divisors of n, ascending (O(√n): n is a step size, at most a few thousand)."""
    small, large, d = [], [], 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def probe_plan(step: int) -> list[int]:
    """1, 2, 4, 8, … below the step size, then the step size itself."""
    plan, micro = [], 1
    while micro < step:
        plan.append(micro)
        micro *= 2
    return plan + [step] if step > 0 else []


def memory_budget_mib(total_mib: float, overhead_mib: float, margin: float) -> float:
    """What a run may take of a device: its memory less the safety margin, less what is not
    PyTorch's (the CUDA context, other processes)."""
    return total_mib * (1.0 - margin) - overhead_mib


def _fitted(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((m for m in measurements if m.get("ok")), key=lambda m: m["micro"])


def smallest_failure(measurements: list[dict[str, Any]]) -> int | None:
    failed = [m["micro"] for m in measurements if not m.get("ok")]
    return min(failed) if failed else None


def predict(measurements: list[dict[str, Any]], micro: int) -> dict[str, float] | None:
    """Peak memory and forward+backward time of `micro`: measured, or interpolated linearly between
    the measured sizes around it. None past the largest size that fitted, or at or past one that
    ran out of memory: nothing is extrapolated."""
    failed = smallest_failure(measurements)
    if failed is not None and micro >= failed:
        return None
    fitted = _fitted(measurements)
    keys = ("peak_reserved_mib", "peak_allocated_mib", "fb_s")
    for m in fitted:
        if m["micro"] == micro:
            return {key: float(m[key]) for key in keys}
    below = [m for m in fitted if m["micro"] < micro]
    above = [m for m in fitted if m["micro"] > micro]
    if not below or not above:
        return None
    low, high = below[-1], above[0]
    share = (micro - low["micro"]) / (high["micro"] - low["micro"])
    return {key: float(low[key]) + share * (float(high[key]) - float(low[key])) for key in keys}


def extrapolated_memory(measurements: list[dict[str, Any]], micro: int, base_mib: float) -> float | None:
    """Peak reserved memory of an unmeasured, larger `micro`, on the line through the two largest
    sizes that fitted (through `base_mib`, the memory before any step, when only one did)."""
    fitted = _fitted(measurements)
    if not fitted:
        return None
    last = fitted[-1]
    if len(fitted) >= 2:
        prev = fitted[-2]
        slope = (last["peak_reserved_mib"] - prev["peak_reserved_mib"]) / (last["micro"] - prev["micro"])
    else:
        slope = (last["peak_reserved_mib"] - base_mib) / last["micro"]
    return last["peak_reserved_mib"] + max(slope, 0.0) * (micro - last["micro"])


def plan_next(measurements: list[dict[str, Any]], step: int, budget_mib: float, base_mib: float) -> int | None:
    """The next micro-batch the probe should measure, or None when it is done. It goes 1, 2, 4, …
    and the step size, and stops at the first size that runs out of memory or past the budget;
    when it stops below the step size, it also measures the largest divisor of the step size that
    lies between the last size that fitted and the one that did not, so that the choice is always
    a measured or interpolated size."""
    tried = {m["micro"] for m in measurements}
    fitted = _fitted(measurements)
    if fitted and fitted[-1]["peak_reserved_mib"] > budget_mib:
        return None  # the largest that ran already takes more than a run may: nothing larger fits
    last_ok = fitted[-1]["micro"] if fitted else 0

    def between(limit: int) -> int | None:
        for d in reversed(divisors(step)):
            if last_ok < d < limit and d not in tried:
                guess = extrapolated_memory(measurements, d, base_mib)
                if guess is None or guess <= budget_mib:
                    return d
        return None

    failed = smallest_failure(measurements)
    if failed is not None:
        return between(failed)
    for candidate in probe_plan(step):
        if candidate in tried:
            continue
        guess = extrapolated_memory(measurements, candidate, base_mib)
        if guess is not None and guess > budget_mib:
            return between(candidate)
        return candidate
    return None


def optimizer_step_s(measurements: list[dict[str, Any]]) -> float:
    times = [float(m["opt_s"]) for m in measurements if m.get("ok") and m.get("opt_s") is not None]
    return statistics.median(times) if times else 0.0


def loop_factor(measurements: list[dict[str, Any]]) -> float:
    """The trainer loop's time per optimizer step over what the passes alone predict for the same
    split (1.0 when the probe ran no loop). It scales every split alike: the choice between splits
    stays the passes', the time per step becomes the loop's."""
    for m in _fitted(measurements):
        if m.get("loop_step_s") and m.get("fb_s"):
            passes = int(m.get("loop_accumulation") or 1) * float(m["fb_s"]) + optimizer_step_s(measurements)
            if passes > 0:
                return float(m["loop_step_s"]) / passes
    return 1.0


def options(measurements: list[dict[str, Any]], step: int, budget_mib: float, seq_len: int) -> list[dict[str, Any]]:
    """Every split of `step` sequences per GPU the measurements can speak for, with its predicted
    peak memory, time per optimizer step (the trainer loop's, loop_factor) and tokens/s (per GPU)."""
    opt_s = optimizer_step_s(measurements)
    factor = loop_factor(measurements)
    found = []
    for micro in divisors(step):
        predicted = predict(measurements, micro)
        if predicted is None:
            continue
        accumulation = step // micro
        step_s = (accumulation * predicted["fb_s"] + opt_s) * factor
        found.append({
            "micro": micro, "accumulation": accumulation,
            "peak_reserved_mib": round(predicted["peak_reserved_mib"], 1),
            "peak_allocated_mib": round(predicted["peak_allocated_mib"], 1),
            "fb_s": predicted["fb_s"], "step_s": step_s,
            "tokens_per_s": step * seq_len / step_s if step_s > 0 else 0.0,
            "fits": predicted["peak_reserved_mib"] <= budget_mib,
            "measured": any(m.get("ok") and m["micro"] == micro for m in measurements),
        })
    return found


def choose(measurements: list[dict[str, Any]], step: int, budget_mib: float, seq_len: int) -> dict[str, Any]:
    """The fastest split that fits, and the smaller ones that fit (largest first: where an
    out-of-memory error falls back to). {"micro": None, ...} when none fits."""
    found = options(measurements, step, budget_mib, seq_len)
    fitting = [o for o in found if o["fits"]]
    if not fitting:
        return {"micro": None, "options": found, "fallbacks": []}
    best = max(o["tokens_per_s"] for o in fitting)
    chosen = max((o for o in fitting if o["tokens_per_s"] >= AS_FAST * best), key=lambda o: o["micro"])
    fallbacks = sorted((o["micro"] for o in fitting if o["micro"] < chosen["micro"]), reverse=True)
    return {**chosen, "options": found, "fallbacks": fallbacks}


def covers(measurements: list[dict[str, Any]], step: int, budget_mib: float) -> bool:
    """Whether a stored probe answers for `step`: it measured the step size itself, or it stopped
    below it because a size ran out of memory or past the budget."""
    fitted = _fitted(measurements)
    if any(m["micro"] >= step for m in fitted) or any(m["micro"] <= step for m in measurements if not m.get("ok")):
        return True
    return bool(fitted) and fitted[-1]["peak_reserved_mib"] > budget_mib


def next_smaller(micro: int, step: int) -> int | None:
    """The largest divisor of the step size below `micro` (the out-of-memory fallback)."""
    smaller = [d for d in divisors(step) if d < micro]
    return smaller[-1] if smaller else None
