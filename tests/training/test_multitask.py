"""Tests of the multi-task objective: losses vs NumPy, masks, and the shared forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.channels.simulate import Batch
from compressjax.models import iq_transformer as iqt
from compressjax.training import multitask

RNG = np.random.default_rng(0)
B, L, M, C, T = 4, 6, 4, 3, 2


def _batch(**fields):
  base = dict(iq=np.zeros((B, L, 2), np.float32), label=np.zeros(B, np.int32),
              snr_db=np.zeros(B, np.float32), symbols=np.zeros((B, L), np.int32),
              bits=np.zeros((B, L, 2), np.int32), pilot_mask=np.arange(L) < 2,
              taps=np.zeros((B, T), np.complex64), noise_var=np.ones(B, np.float32))
  base.update(fields)
  return Batch(**{k: jnp.asarray(v) for k, v in base.items()})


def _np_ce(logits, labels):
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def _case():
  labels = RNG.integers(0, C, B)
  symbols = RNG.integers(0, M, (B, L))
  taps = (RNG.normal(size=(B, T)) + 1j * RNG.normal(size=(B, T))).astype(np.complex64)
  batches = {"modulation": _batch(label=labels), "symbols": _batch(symbols=symbols),
             "channel": _batch(taps=taps)}
  outputs = {"modulation": RNG.normal(size=(B, C)).astype(np.float32),
             "symbols": RNG.normal(size=(B, L, M)).astype(np.float32),
             "channel": RNG.normal(size=(B, T, 2)).astype(np.float32)}
  return batches, outputs


def test_task_losses_match_numpy_with_pilot_mask_and_weights():
  batches, out = _case()
  weights = {"modulation": 0.5, "channel": 2.0}  # symbols weighs 1
  loss, m = multitask.task_losses(out, batches, weights)
  mod = _np_ce(out["modulation"], np.asarray(batches["modulation"].label)).mean()
  ce = _np_ce(out["symbols"], np.asarray(batches["symbols"].symbols))
  sym = ce[:, 2:].mean()  # the first two positions are pilots
  taps = np.asarray(batches["channel"].taps)
  est = out["channel"][..., 0] + 1j * out["channel"][..., 1]
  chan = (np.abs(est - taps) ** 2).sum(-1).mean()
  np.testing.assert_allclose(m["modulation/loss"], mod, rtol=1e-5)
  np.testing.assert_allclose(m["symbols/loss"], sym, rtol=1e-5)
  np.testing.assert_allclose(m["channel/loss"], chan, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.5 * mod + sym + 2.0 * chan, rtol=1e-5)
  np.testing.assert_allclose(m["channel/nmse"],
                             (np.abs(est - taps) ** 2).sum() / (np.abs(taps) ** 2).sum(), rtol=1e-5)
  ser = (out["symbols"].argmax(-1) != np.asarray(batches["symbols"].symbols))[:, 2:].mean()
  np.testing.assert_allclose(m["symbols/ser"], ser, rtol=1e-6)


def test_time_varying_taps_are_averaged_over_the_frame():
  taps = RNG.normal(size=(B, L, T)).astype(np.complex64)
  got = multitask.block_taps(_batch(taps=taps))
  np.testing.assert_allclose(got[..., 0], taps.real.mean(1), rtol=1e-5, atol=1e-6)


def test_kd_losses_route_teacher_logits_and_keep_the_channel_target():
  batches, out = _case()
  teacher = {k: v + 1.0 for k, v in out.items()}
  # A recognisable kd_fn: squared logit gap per example / position, plus the label.
  kd = lambda s, t, y: jnp.sum((s - t) ** 2, -1) + y
  loss, m = multitask.kd_task_losses(out, batches, teacher, kd)
  np.testing.assert_allclose(m["modulation/loss"],
                             C + np.asarray(batches["modulation"].label).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["symbols/loss"],
                             M + np.asarray(batches["symbols"].symbols)[:, 2:].mean(), rtol=1e-5)
  _, plain = multitask.task_losses(out, batches)
  np.testing.assert_allclose(m["channel/loss"], plain["channel/loss"], rtol=1e-6)
  np.testing.assert_allclose(m["modulation/ce"], plain["modulation/loss"], rtol=1e-6)


def test_bad_weights_and_tasks_are_rejected():
  batches, out = _case()
  with pytest.raises(ValueError, match="weights keys"):
    multitask.task_losses(out, batches, {"symbol": 1.0})
  with pytest.raises(ValueError, match="tasks must be"):
    multitask.check_tasks(("modulation", "modulation"))


@pytest.mark.parametrize("rows", [(4, 4, 4), (4, 2, 4)], ids=["interleaved", "concatenated"])
def test_multitask_forward_gives_each_task_its_own_rows(rows):
  cfg = iqt.IQTransformerConfig(width=8, depth=1, num_heads=1, head_dim=4, mlp_dim=8,
                                patch=2, seq_len=L, num_classes=C, num_symbols=M, num_taps=T)
  model = iqt.IQTransformer(cfg)
  params = iqt.init_params(cfg, jax.random.key(0))
  iq = RNG.normal(size=(3, 2, L, 2)).astype(np.float32)
  batches = {t: _batch(iq=np.concatenate([iq[i]] * 2)[:n])
             for i, (t, n) in enumerate(zip(multitask.TASKS, rows))}
  fwd = jax.jit(multitask.multitask_forward(model.apply))
  out = fwd({"params": params}, batches)
  apply = jax.jit(model.apply)
  for t in multitask.TASKS:
    ref = apply({"params": params}, batches[t].iq)[t]
    np.testing.assert_allclose(out[t], ref, rtol=1e-5, atol=1e-5)


def test_kd_with_the_library_kd_loss_at_alpha_zero_is_plain_cross_entropy():
  from compressjax import distillation  # pylint: disable=g-import-not-at-top
  batches, out = _case()
  teacher = {k: -v for k, v in out.items()}
  kd = lambda s, t, y: distillation.kd_loss(s, t, y, temperature=2.0, alpha=0.0)
  loss, m = multitask.kd_task_losses(out, batches, teacher, kd)
  want, plain = multitask.task_losses(out, batches)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["symbols/loss"], plain["symbols/loss"], rtol=1e-5)
