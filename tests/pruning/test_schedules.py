"""Tests of the pruning schedules against the papers' formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.pruning import schedules


def _fires(schedule, steps):
  return [t for t in range(steps) if bool(schedule.fires(jnp.int32(t)))]


def test_one_shot_fires_once_at_its_step():
  s = schedules.one_shot(3)
  assert _fires(s, 10) == [3]
  np.testing.assert_allclose(float(s.target(jnp.int32(3), 0.8)), 0.8)


def test_polynomial_matches_zhu_gupta_cubic():
  s = schedules.polynomial(begin=2, end=12, every=4)
  assert _fires(s, 20) == [2, 6, 10, 12]
  for t in range(0, 16):
    frac = min(max((t - 2) / 10, 0.0), 1.0)
    want = 0.9 * (1 - (1 - frac) ** 3)  # Zhu & Gupta (2017), eq. (1), s_i = 0
    np.testing.assert_allclose(float(s.target(jnp.int32(t), 0.9)), want, rtol=1e-6, atol=1e-7)


def test_iterative_prunes_a_constant_fraction_of_survivors_per_round():
  s = schedules.iterative(every=5, rounds=3, rewind_step=2)
  assert _fires(s, 30) == [5, 10, 15]
  assert s.rewind_step == 2
  kept = [1 - float(s.target(jnp.int32(t), 0.875)) for t in (5, 10, 15)]
  # 1 - 0.875 = 0.5 ** 3: each round keeps half of the survivors.
  np.testing.assert_allclose(kept, [0.5, 0.25, 0.125], rtol=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.polynomial(5, 5, 1), "polynomial.end must be an int >= 6"),
    (lambda: schedules.polynomial(0, 10, 0), "polynomial.every must be an int >= 1"),
    (lambda: schedules.one_shot(-1), "one_shot.step must be an int >= 0"),
    (lambda: schedules.iterative(4, 2, rewind_step=4), "iterative.rewind_step must be < every"),
])
def test_bad_schedule_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()
