"""Cost of a model: parameters, bytes, FLOPs from XLA, and latency of the jitted forward.

FLOPs come from XLA's cost analysis of the compiled program
(``jax.jit(f).lower(*args).compile().cost_analysis()``; in jax 0.10 a dict with a
``"flops"`` entry, older versions returned a list of one dict per computation). They
count what XLA will execute on this backend (a multiply-add is 2 FLOPs; zeros in a
pruned dense kernel still cost), so they measure the compiled program, not an idealized
sparse one. Bytes come from a caller-supplied exporter (the packed export of
`compressjax.quantization`), never from a formula.
"""

from collections.abc import Callable, Mapping, Sequence
import statistics
import time
from typing import Any

import jax
import numpy as np


def param_counts(params: Any) -> dict[str, int]:
  """Total and non-zero entries of the array leaves of ``params``.

  Args:
    params: a parameter pytree.

  Returns:
    ``{"params": total, "nonzero": count of entries != 0}``.
  """
  leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
  return {"params": int(sum(x.size for x in leaves)),
          "nonzero": int(sum(np.count_nonzero(x) for x in leaves))}


def packed_bytes(params: Any, nbytes_fn: Callable[[Any], int] | None = None) -> int:
  """Bytes of the stored model.

  Args:
    params: a parameter pytree.
    nbytes_fn: the exporter's byte count (e.g. ``compressjax.quantization`` export's
      ``nbytes``, which packs int8/int4 codes, scales and sparsity bitmasks); None
      counts the buffers as they are (float32 for an uncompressed model).

  Returns:
    The byte count.
  """
  if nbytes_fn is not None:
    return int(nbytes_fn(params))
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))


def _flops_of(cost: Any) -> float:
  if isinstance(cost, (list, tuple)):
    return float(sum(_flops_of(c) for c in cost))
  if not isinstance(cost, Mapping) or "flops" not in cost:
    raise ValueError(f"cost_analysis must report 'flops', got {cost!r}")
  return float(cost["flops"])


def flops(fn: Callable[..., Any], *args: Any) -> float:
  """FLOPs of one call ``fn(*args)`` from XLA's cost analysis of the compiled program.

  Args:
    fn: a jax-traceable function (e.g. ``lambda v, x: model.apply(v, x)``), or a jitted
      one (its compiled program is reused: no second compilation).
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    The FLOP count (float).
  """
  return _flops_of(_jitted(fn).lower(*args).compile().cost_analysis())


def _jitted(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` itself if it is already jitted (sharing its compilation cache), else its jit."""
  return fn if hasattr(fn, "lower") else jax.jit(fn)


def latency(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time in seconds of the jitted ``fn(*args)``, after warm-up.

  Each timed call ends with ``block_until_ready`` on every output, so asynchronous
  dispatch does not hide the work.

  Args:
    fn: a jax-traceable function, or a jitted one (reused as is).
    *args: concrete arguments.
    warmup: untimed calls first (the first one compiles).
    repeats: timed calls.

  Returns:
    The median seconds per call.
  """
  if warmup < 1 or repeats < 1:
    raise ValueError(f"warmup and repeats must be >= 1, got {warmup}, {repeats}")
  jitted = _jitted(fn)
  for _ in range(warmup):
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def model_cost(apply_fn: Callable[..., Any], variables: Mapping[str, Any], sample: Any, *,
               nbytes_fn: Callable[[Any], int] | None = None, repeats: int = 10
               ) -> dict[str, float]:
  """Parameter counts, bytes, forward FLOPs and median latency of one model.

  Args:
    apply_fn: ``model.apply`` (called as ``apply_fn(variables, sample)``, inference), or
      its jit (pass the same jitted object for every model of one architecture: it
      compiles once).
    variables: ``{"params": ..., **other collections}``.
    sample: one input batch (its batch size is the one measured).
    nbytes_fn: the exporter's byte count for ``variables["params"]`` (see
      `packed_bytes`).
    repeats: timed calls for the latency.

  Returns:
    ``{"params", "nonzero", "bytes", "flops", "latency_ms"}``.
  """
  fwd = _jitted(apply_fn)  # one program for the FLOPs and the latency
  counts = param_counts(variables["params"])
  return {**counts, "bytes": packed_bytes(variables["params"], nbytes_fn),
          "flops": flops(fwd, variables, sample),
          "latency_ms": 1e3 * latency(fwd, variables, sample, repeats=repeats)}


def interleaved_latency(calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
                        rounds: int = 10, warmup: int = 2, repeats: int = 3,
                        seed: int = 0) -> np.ndarray:
  """Wall times of several functions timed in interleaved rounds: ``[rounds, len(calls)]``.

  Each round calls every function, in an order shuffled per round, so a slow spell of a
  shared machine hits all of them alike and the ratio of two columns, taken round by
  round, is far steadier than two separate medians (identical models measured apart differ
  by 20-30% on a loaded 2-core CPU; interleaved, their per-round ratios center on 1). The
  shuffle keeps a position in the round (the first call after another program runs slower,
  its caches cold) from favouring one function. A function's time in a round is the
  fastest of ``repeats`` back-to-back calls: a served model runs call after call.

  Args:
    calls: ``(fn, args)`` pairs; ``fn`` jitted or not (jitted here once each).
    rounds: timed rounds.
    warmup: untimed rounds first (the first compiles).
    repeats: back-to-back calls per function per round (the fastest counts).
    seed: seed of the per-round orders.

  Returns:
    Seconds per call, one row per round, columns in the order of ``calls``.
  """
  if warmup < 1 or rounds < 1 or repeats < 1:
    raise ValueError(f"warmup, rounds and repeats must be >= 1, got {warmup}, {rounds}, "
                     f"{repeats}")
  fns = [(_jitted(fn), args) for fn, args in calls]
  for _ in range(warmup):
    for fn, args in fns:
      jax.block_until_ready(fn(*args))
  rng = np.random.default_rng(seed)
  times = np.full((rounds, len(fns)), np.inf)
  for r in range(rounds):
    for i in rng.permutation(len(fns)):
      fn, args = fns[i]
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[r, i] = min(times[r, i], time.perf_counter() - t0)
  return times


def latency_ratio(times: np.ndarray, base: np.ndarray) -> dict[str, Any]:
  """A model's latency relative to a base model timed in the same rounds.

  Args:
    times: the model's seconds per round (a column of `interleaved_latency`).
    base: the base model's, same rounds.

  Returns:
    ``{"ratio", "lo", "hi", "noisy"}``: the median of the per-round ratios, their 10th
    and 90th percentiles, and whether that spread covers 1 (no difference shown).
  """
  ratios = np.asarray(times) / np.asarray(base)
  lo, mid, hi = np.percentile(ratios, [10, 50, 90])
  return {"ratio": float(mid), "lo": float(lo), "hi": float(hi),
          "noisy": bool(lo <= 1.0 <= hi)}
