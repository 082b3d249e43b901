"""Pruning schedules: when masks are recomputed, and to which sparsity.

A schedule is data plus two pure functions of the step count (the number of
updates already applied), so it traces inside ``jit`` and needs no Python-side
state:

* ``fires(count) -> bool``: recompute the masks at this update;
* ``target(count, final) -> sparsity``: the sparsity the masks get when they are
  recomputed at ``count``, given the final sparsity chosen in `wrap`.

`iterative` also names a ``rewind_step``: the wrapper records the selected weights
as they are at that count and, at every prune event, lands the surviving weights
back on those values (lottery-ticket rewinding).
"""

import dataclasses
from typing import Callable

import chex
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When masks are recomputed and to what sparsity (see the module docstring).

  Not callable on purpose: ``optax.inject_hyperparams`` treats every callable
  argument as a hyperparameter schedule.

  Attributes:
    name: the factory that built it ("one_shot", "polynomial", "iterative").
    fires: ``count -> bool array``, true at the updates that recompute masks.
    target: ``(count, final_sparsity) -> float array``, the sparsity set at ``count``.
    first_step: the first count at which ``fires`` is true.
    rewind_step: count at which surviving weights are recorded for rewinding,
      or ``None`` for no rewinding.
  """
  name: str
  fires: Callable[[chex.Array], chex.Array]
  target: Callable[[chex.Array, chex.Numeric], chex.Array]
  first_step: int
  rewind_step: int | None = None


def _check_int(field: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{field} must be an int >= {low}, got {value!r}")


def one_shot(step: int = 0) -> Schedule:
  """Prunes once, to the final sparsity, at update ``step``.

  Args:
    step: the count (number of updates already applied) of the prune event.

  Returns:
    A `Schedule`.
  """
  _check_int("one_shot.step", step, 0)

  def fires(count):
    return count == step

  def target(count, final):
    return jnp.where(count >= step, final, 0.0)

  return Schedule("one_shot", fires, target, first_step=step)


def polynomial(begin: int, end: int, every: int, power: float = 3.0) -> Schedule:
  """Gradual pruning from 0 to the final sparsity between ``begin`` and ``end``.

  Zhu & Gupta (2017), "To prune, or not to prune", eq. (1) with initial sparsity 0:
  ``s_t = s_f * (1 - (1 - (t - begin) / (end - begin)) ** power)``, with masks
  recomputed every ``every`` updates from ``begin`` and once more at ``end``
  (so the final sparsity is reached even when ``every`` does not divide the span).

  Args:
    begin: count of the first prune event (its target is 0).
    end: count of the last prune event (its target is the final sparsity).
    every: updates between prune events.
    power: the exponent; 3 is the paper's cubic schedule.

  Returns:
    A `Schedule`.
  """
  _check_int("polynomial.begin", begin, 0)
  _check_int("polynomial.end", end, begin + 1)
  _check_int("polynomial.every", every, 1)
  if not power > 0:
    raise ValueError(f"polynomial.power must be > 0, got {power!r}")

  def fires(count):
    on_grid = (count - begin) % every == 0
    return ((count >= begin) & (count <= end) & on_grid) | (count == end)

  def target(count, final):
    frac = jnp.clip((count - begin) / (end - begin), 0.0, 1.0)
    return final * (1.0 - (1.0 - frac) ** power)

  return Schedule("polynomial", fires, target, first_step=begin)


def iterative(every: int, rounds: int, rewind_step: int = 0) -> Schedule:
  """Iterative magnitude pruning with weight rewinding (the lottery-ticket procedure).

  Frankle & Carbin (2019), "The Lottery Ticket Hypothesis"; rewinding to an early
  step rather than to initialisation as in Frankle et al. (2020), "Linear Mode
  Connectivity and the Lottery Ticket Hypothesis". Round ``r = 1..rounds`` fires at
  count ``r * every``, removes the same fraction of the surviving weights each round
  (sparsity ``1 - (1 - s_f) ** (r / rounds)``) and rewinds the survivors to their
  values at count ``rewind_step``; training then resumes from there.

  Args:
    every: updates of (re)training per round.
    rounds: number of prune-and-rewind rounds.
    rewind_step: count whose weights are restored (0 = the initial weights).

  Returns:
    A `Schedule` with ``rewind_step`` set.
  """
  _check_int("iterative.every", every, 1)
  _check_int("iterative.rounds", rounds, 1)
  _check_int("iterative.rewind_step", rewind_step, 0)
  if rewind_step >= every:
    raise ValueError(
        f"iterative.rewind_step must be < every ({every}) so the weights are recorded "
        f"before the first prune event, got {rewind_step}")

  def fires(count):
    return (count > 0) & (count % every == 0) & (count <= rounds * every)

  def target(count, final):
    done = jnp.clip(count // every, 0, rounds)
    return 1.0 - (1.0 - final) ** (done / rounds)

  return Schedule("iterative", fires, target, first_step=every, rewind_step=rewind_step)
