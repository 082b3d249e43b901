"""`quantization.wrap`: params on the grid after every update, STE semantics, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import quantization as q
from tests import helpers

SPEC = q.Spec(4, False, "channel")
_fq = jax.jit(q.fake_quant, static_argnums=1)
_fq_step = jax.jit(lambda k, spec: (q.fake_quant(k, spec), q.grid_of(k, spec).scale),
                   static_argnums=1)


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"Dense_0": {"kernel": jax.random.normal(k[0], (8, 16)), "bias": jnp.zeros(16)},
          "Dense_1": {"kernel": 0.3 * jax.random.normal(k[1], (16, 4)), "bias": jnp.zeros(4)}}


def _loss(p, x):
  h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - x[:, :4]) ** 2)


def _run(tx, params, steps):
  """Trains on a fixed regression task; returns the params after every step and the state."""

  @jax.jit
  def run(params):
    def body(carry, i):
      p, s = carry
      x = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (32, 8))
      u, s = tx.update(jax.grad(_loss)(p, x), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p
    (p, s), hist = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return p, s, hist

  return run(params)


def assert_on_grid(history, spec, steps):
  """Kernels equal fake_quant(kernels) after every step: >= 99% bit for bit, all within 1e-5
  of a step, zeros exact.

  `apply_updates` adds ``p + (new - p)``; when an entry's update exceeds its new value in
  magnitude (a sign flip, mostly on the first step from float weights) float32 may miss
  ``new`` by one ulp whatever the update is.
  """
  exact = total = 0
  for t in range(steps):
    for name in history:
      k = np.asarray(history[name]["kernel"][t])
      ref, step = map(np.asarray, _fq_step(k, spec))
      assert np.all(np.abs(k - ref) <= 1e-5 * step), (t, name)
      np.testing.assert_array_equal(k[ref == 0], 0.0)
      exact, total = exact + np.sum(k == ref), total + k.size
  assert exact >= 0.99 * total


@functools.lru_cache
def adam_run(spec=SPEC, steps=12):
  """QAT with adam for ``steps`` steps (cached: several tests inspect the same run)."""
  return _run(q.wrap(optax.adam(3e-2), spec), _params(), steps)


def test_params_on_grid_after_every_update_and_loss_falls():
  final, _, hist = adam_run()
  assert_on_grid(hist, SPEC, 12)
  x = jax.random.normal(jax.random.key(7), (256, 8))
  assert float(_loss(final, x)) < 0.8 * float(_loss(_params(), x))


def test_matches_a_hand_written_ste_loop():
  """Gradients at the quantized params update the latent floats (sgd), params = fq(latent)."""
  lr, params = 0.1, _params()
  _, state, hist = _run(q.wrap(optax.sgd(lr), SPEC), params, 3)
  latent, p = params, params
  for t in range(3):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (32, 8))
    g = jax.jit(jax.grad(_loss))(p, x)
    latent = jax.tree.map(lambda w, gw: w - lr * gw, latent, g)
    p = {n: {"kernel": _fq(latent[n]["kernel"], SPEC), "bias": latent[n]["bias"]}
         for n in latent}
    got = jax.tree.map(lambda x: x[t], hist)
    for n in p:
      np.testing.assert_allclose(got[n]["kernel"], p[n]["kernel"], rtol=0, atol=1e-6)
      np.testing.assert_allclose(got[n]["bias"], p[n]["bias"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(state.latent["Dense_0"]["kernel"], latent["Dense_0"]["kernel"],
                             rtol=1e-5, atol=1e-6)
  assert isinstance(state.latent["Dense_0"]["bias"], optax.MaskedNode)
  assert int(state.count) == 3 and state.count.dtype == jnp.int32


def test_where_selects_leaves_by_path():
  tx = q.wrap(optax.sgd(0.1), q.Spec(3), where=lambda path: path.startswith("Dense_1"))
  final, _, _ = _run(tx, _params(), 2)
  b = np.asarray(final["Dense_1"]["bias"])
  np.testing.assert_array_equal(b, np.asarray(_fq(b, q.Spec(3))))
  assert len(np.unique(np.asarray(final["Dense_0"]["kernel"]))) > 2 ** 3


def test_bad_input_raises_at_init_or_update():
  params = _params()
  with pytest.raises(ValueError, match="quantization.wrap: `where` selects no parameter"):
    q.wrap(optax.sgd(0.1), 8, where=lambda p: False).init(params)
  with pytest.raises(ValueError, match=r"axis must be in \[-2, 2\) for Dense_0/kernel"):
    q.wrap(optax.sgd(0.1), q.Spec(8, True, "channel", 3)).init(params)
  with pytest.raises(ValueError, match="must be floating"):
    q.wrap(optax.sgd(0.1), 8, where=lambda p: True).init({"k": {"kernel": jnp.ones((2, 2), int)}})
  tx = q.wrap(optax.sgd(0.1), 8)
  with pytest.raises(ValueError, match="update needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="bits must be"):
    q.wrap(optax.sgd(0.1), 33)


def test_int32_selected_leaf_is_rejected_naming_it():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  with pytest.raises(ValueError, match=r"quantization.wrap: selected leaf Dense_0/kernel must "
                                       r"be floating .* got int32"):
    q.wrap(optax.sgd(0.1), 8).init(params)


def test_nan_gradients_reach_weights_unless_apply_if_finite():
  """The wrapper's docstring: NaN gradients are not filtered; apply_if_finite skips them."""
  params = _params()
  unguarded, guarded = helpers.nan_gradient_step(lambda: q.wrap(optax.sgd(0.1), 8), params)
  assert np.isnan(np.asarray(unguarded["Dense_0"]["kernel"])).all()
  jax.tree.map(np.testing.assert_array_equal, guarded, params)