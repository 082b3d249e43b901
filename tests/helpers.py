"""Shared helpers for tests: a tiny supervised training loop and simulator data.

Kept deliberately small and independent of `compressjax.training`, so transform tests
do not depend on the training package they are meant to feed.
"""

import random
import signal
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax import channels


def modulation_data(cfg: "channels.ChannelConfig", batch_size: int) -> Callable:
  """Returns ``key -> (iq [B, L, 2], label [B])`` drawn by the channel simulator."""

  def data_fn(key):
    batch = channels.simulate(key, cfg, batch_size, task="modulation")
    return batch.iq, batch.label

  return data_fn


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_classifier(apply_fn, params, tx, data_fn, steps, key, loss_fn=None):
  """Trains ``params`` with ``tx`` for ``steps`` jitted steps; returns (params, opt_state).

  Args:
    apply_fn: ``(params, x) -> logits``.
    params: initial parameters.
    tx: any optax transformation (compression wrappers included).
    data_fn: ``key -> (x, labels)``, traced inside the step (data made on device).
    steps: number of steps.
    key: PRNG key; step ``i`` uses ``fold_in(key, i)``.
    loss_fn: ``(params, x, labels) -> scalar``; default cross-entropy of apply_fn.
  """
  if loss_fn is None:
    loss_fn = lambda p, x, y: cross_entropy(apply_fn(p, x), y)

  @jax.jit
  def step(params, opt_state, i):
    x, y = data_fn(jax.random.fold_in(key, i))
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = step(params, opt_state, jnp.int32(i))
  return params, opt_state


def accuracy(apply_fn, params, x, labels) -> float:
  """Top-1 accuracy of ``apply_fn(params, x)`` against ``labels``."""
  logits = jax.jit(apply_fn)(params, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def set_fields(config, override: dict) -> None:
  """Sets dotted fields of an ``ml_collections`` config: ``{"train.steps": 0}``."""
  for key, value in override.items():
    obj = config
    *parents, leaf = key.split(".")
    for p in parents:
      obj = obj[p]
    obj[leaf] = value


def is_key_bias(path) -> bool:
  """Whether a key path is an attention key bias.

  Softmax is invariant to a constant added to every logit of a query, so the key bias has
  an exactly-zero gradient; Adam normalizes its rounding noise into +-lr steps, and those
  differ between any two reduction orders (devices, vmap). Comparisons across orders skip it.
  """
  return "'key']['bias'" in jax.tree_util.keystr(path)


def assert_params_close(got, want, rtol: float, atol: float) -> None:
  """Every leaf but the attention key bias (`is_key_bias`) agrees to the tolerance."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    if not is_key_bias(path):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def nan_gradient_step(make_tx, params):
  """One update with all-NaN gradients: ``(new params unguarded, new params under
  optax.apply_if_finite)``, ``make_tx()`` building the transform under test each time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  out = []
  for tx in (make_tx(), optax.apply_if_finite(make_tx(), max_consecutive_errors=5)):
    updates, _ = tx.update(grads, tx.init(params), params)
    out.append(optax.apply_updates(params, updates))
  return tuple(out)


def kill_after_first_checkpoint(args: list, cwd: str, ckpt_dir, max_delay: float) -> int:
  """Starts ``args``, SIGKILLs it a random 0..``max_delay`` s after its first periodic
  checkpoint lands in ``ckpt_dir``; returns its exit code (``-SIGKILL`` when killed)."""
  proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not (ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
      assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, max_delay))  # somewhere in the next steps
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode
