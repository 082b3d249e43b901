import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compressjax import distillation
from tests import helpers


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kd(s, t, y, temp, alpha):
  """Independent float64 reference of Hinton et al. (2015)."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  ce = -np.take_along_axis(_np_log_softmax(s), y[..., None], -1)[..., 0]
  log_pt, log_ps = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  return (1 - alpha) * ce + alpha * temp**2 * kl


def _logits(seed, shape, scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def test_kd_loss_matches_numpy_reference():
  s, t = _logits(0, (16, 7)), _logits(1, (16, 7))
  y = np.random.default_rng(2).integers(0, 7, 16)
  for temp, alpha in ((1.0, 0.5), (4.0, 0.3), (10.0, 0.9)):
    got = distillation.kd_loss(s, t, y, temperature=temp, alpha=alpha)
    chex.assert_shape(got, (16,))
    np.testing.assert_allclose(got, _np_kd(s, t, y, temp, alpha), rtol=2e-5, atol=1e-5)


def test_kd_loss_per_position_with_mask():
  s, t = _logits(3, (4, 5, 6)), _logits(4, (4, 5, 6))
  y = np.random.default_rng(5).integers(0, 6, (4, 5))
  mask = np.random.default_rng(6).random((4, 5)) > 0.4
  got = jax.jit(distillation.kd_loss)(s, t, y, 2.0, 0.7, mask)
  want = np.where(mask, _np_kd(s, t, y, 2.0, 0.7), 0.0)
  chex.assert_shape(got, (4, 5))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
  s, t = _logits(7, (32, 10)), _logits(8, (32, 10))
  y = np.random.default_rng(9).integers(0, 10, 32)
  ce = -np.take_along_axis(_np_log_softmax(s.astype(np.float64)), y[:, None], -1)[:, 0]
  got = distillation.kd_loss(s, t, y, temperature=3.0, alpha=0.0)
  np.testing.assert_allclose(got, ce, rtol=1e-5, atol=1e-6)


def test_kl_gradient_vanishes_when_student_equals_teacher():
  t = jnp.asarray(_logits(10, (8, 5)))
  loss = lambda s: jnp.sum(distillation.kd_loss(s, t, None, temperature=4.0, alpha=1.0))
  np.testing.assert_allclose(jax.grad(loss)(t), 0.0, atol=1e-6)
  # ... and not elsewhere: the same loss has a real gradient at another point.
  assert float(jnp.abs(jax.grad(loss)(t + jnp.asarray(_logits(11, (8, 5))))).max()) > 1e-2


def test_teacher_receives_no_gradient():
  s, t = jnp.asarray(_logits(12, (8, 5))), jnp.asarray(_logits(13, (8, 5)))
  y = jnp.arange(8) % 5
  g = jax.grad(lambda t: jnp.sum(distillation.kd_loss(s, t, y, alpha=0.5)))(t)
  np.testing.assert_array_equal(g, 0.0)


def test_t_squared_keeps_gradient_scale_across_temperatures():
  # d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T)) -> (centred s - t) / C for large T, while
  # dKL/ds alone falls as 1/T^2.
  s, t = jnp.asarray(_logits(14, (64, 10))), jnp.asarray(_logits(15, (64, 10)))
  temps = (4.0, 8.0, 16.0, 32.0)

  def norm(fn, temp):
    return float(jnp.linalg.norm(jax.grad(lambda s: jnp.sum(fn(s, temp)))(s)))

  with_t2 = [norm(lambda s, T: distillation.kd_loss(s, t, None, T, 1.0), T) for T in temps]
  without = [norm(lambda s, T: distillation.soft_kl(s, t, T), T) for T in temps]
  assert max(with_t2) / min(with_t2) < 1.3, with_t2
  for lo, hi in zip(without[:-1], without[1:]):
    assert 0.15 < hi / lo < 0.35, without  # about 1/4 per doubling of T
  # The large-T limit: (centred s - centred t) / C.
  d = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
  np.testing.assert_allclose(with_t2[-1], float(jnp.linalg.norm(d / 10)), rtol=0.05)


def test_soft_kl_ignores_classes_with_zero_teacher_probability():
  s = jnp.array([[1.0, 2.0, 0.5]])
  t = jnp.array([[0.0, 1.0, -jnp.inf]])
  # Only the two classes the teacher can emit count; the student's log-probs are over all 3.
  log_ps = _np_log_softmax(np.asarray(s, np.float64))[0, :2]
  log_pt = _np_log_softmax(np.array([[0.0, 1.0]]))[0]
  want = (np.exp(log_pt) * (log_pt - log_ps)).sum()
  np.testing.assert_allclose(distillation.soft_kl(s, t)[0], want, rtol=1e-5)


def test_traced_hyperparameters_vmap_over_a_sweep():
  s, t = _logits(16, (4, 3)), _logits(17, (4, 3))
  y = np.array([0, 1, 2, 0])
  alphas = jnp.array([0.0, 0.5, 1.0])
  got = jax.vmap(lambda a: distillation.kd_loss(s, t, y, 2.0, a))(alphas)
  want = np.stack([_np_kd(s, t, y, 2.0, float(a)) for a in alphas])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=-0.1), "alpha must be in \\[0, 1\\], got -0.1"),
    (dict(alpha=1.5), "alpha must be in \\[0, 1\\], got 1.5"),
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    (dict(temperature=-2.0), "temperature must be > 0, got -2.0"),
])
def test_kd_loss_rejects_bad_hyperparameters(kwargs, match):
  s = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=match):
    distillation.kd_loss(s, s, np.zeros(2, np.int32), **kwargs)


def test_kd_loss_rejects_bad_shapes():
  s = np.zeros((2, 3), np.float32)
  y = np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="teacher_logits must have the student_logits shape"):
    distillation.kd_loss(s, np.zeros((2, 4), np.float32), y)
  with pytest.raises(ValueError, match="labels must have shape \\(2,\\)"):
    distillation.kd_loss(s, s, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="labels must be integer"):
    distillation.kd_loss(s, s, np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="labels may be None only when alpha == 1"):
    distillation.kd_loss(s, s, None, alpha=0.5)
  with pytest.raises(ValueError, match="mask must broadcast"):
    distillation.kd_loss(s, s, y, mask=np.ones(3, bool))


def test_hint_loss_with_projection_matches_numpy():
  rng = np.random.default_rng(20)
  fs = rng.standard_normal((3, 5, 4)).astype(np.float32)
  ft = rng.standard_normal((3, 5, 6)).astype(np.float32)
  proj = distillation.init_projection(jax.random.key(0), 4, 6)
  chex.assert_shape(proj["kernel"], (4, 6))
  proj = {"kernel": proj["kernel"], "bias": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  w, b = np.asarray(proj["kernel"], np.float64), np.asarray(proj["bias"], np.float64)
  want = ((fs @ w + b - ft) ** 2).mean(-1)
  got = distillation.hint_loss(fs, ft, proj)
  chex.assert_shape(got, (3, 5))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Same width, no projection: plain per-token MSE.
  np.testing.assert_allclose(distillation.hint_loss(fs, fs[..., ::-1]),
                             ((fs - fs[..., ::-1]) ** 2).mean(-1), rtol=1e-6)


def test_hint_projection_is_trained_and_teacher_is_not():
  rng = np.random.default_rng(21)
  fs = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  ft = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  proj = distillation.init_projection(jax.random.key(1), 4, 6)
  g_proj, g_t = jax.grad(lambda p, t: jnp.mean(distillation.hint_loss(fs, t, p)),
                         argnums=(0, 1))(proj, ft)
  assert float(jnp.abs(g_proj["kernel"]).max()) > 0
  np.testing.assert_array_equal(g_t, 0.0)


def test_hint_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match="projection is required when widths differ"):
    distillation.hint_loss(np.zeros((2, 4)), np.zeros((2, 6)))
  with pytest.raises(ValueError, match="teacher_feat must have the student_feat leading shape"):
    distillation.hint_loss(np.zeros((2, 4)), np.zeros((3, 4)))
  proj = distillation.init_projection(jax.random.key(0), 5, 6)
  with pytest.raises(ValueError, match="projection kernel must have shape \\(4, 6\\)"):
    distillation.hint_loss(np.zeros((2, 4)), np.zeros((2, 6)), proj)
  with pytest.raises(ValueError, match="d_teacher must be a positive int"):
    distillation.init_projection(jax.random.key(0), 4, 0)


def _np_at(s, t):
  def norm(a):
    f = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)
  if s.shape[1] != t.shape[1]:
    s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
  return ((norm(s) - norm(t)) ** 2).sum(-1).mean(-1)


def _attn(seed, shape):
  z = np.random.default_rng(seed).standard_normal(shape)
  return np.asarray(jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1))


def test_attention_transfer_matches_numpy_equal_and_mismatched_heads():
  s4, t4, t2 = _attn(30, (3, 4, 5, 5)), _attn(31, (3, 4, 5, 5)), _attn(32, (3, 2, 5, 5))
  got = distillation.attention_transfer_loss(s4, t4)
  chex.assert_shape(got, (3,))
  np.testing.assert_allclose(got, _np_at(s4, t4), rtol=1e-5)
  np.testing.assert_allclose(distillation.attention_transfer_loss(s4, t2), _np_at(s4, t2),
                             rtol=1e-5)


def test_attention_transfer_is_scale_invariant_and_zero_at_equality():
  s, t = _attn(33, (2, 3, 4, 4)), _attn(34, (2, 3, 4, 4))
  np.testing.assert_allclose(distillation.attention_transfer_loss(s, s), 0.0, atol=1e-6)
  np.testing.assert_allclose(distillation.attention_transfer_loss(s, 3.0 * t),
                             distillation.attention_transfer_loss(s, t), rtol=1e-5)
  g = jax.grad(lambda x: jnp.sum(distillation.attention_transfer_loss(x, s)))(jnp.asarray(s))
  assert bool(jnp.all(jnp.isfinite(g)))


def test_attention_transfer_rejects_bad_shapes():
  with pytest.raises(ValueError, match="student_attn must have shape \\[B, H, N, N\\]"):
    distillation.attention_transfer_loss(np.zeros((2, 4, 4)), np.zeros((2, 1, 4, 4)))
  with pytest.raises(ValueError, match="teacher_attn must have shape \\[2, H, 4, 4\\]"):
    distillation.attention_transfer_loss(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 5, 5)))


@pytest.mark.slow
def test_distilled_student_beats_label_only_student_on_simulator_data():
  """KD vs labels alone for a small MLP student, same data, init, optimizer and steps.

  Setting (chosen so there is something to transfer: a small transfer set, where soft targets
  help, as in Hinton et al. 2015): modulation classification of 8 AWGN I/Q samples
  (bpsk/qpsk/psk8/qam16, Es/N0 15-25 dB). The teacher, an MLP (128, 128), is trained on 400
  fresh simulator batches of 256; each student, an MLP (32,), sees only a fixed set of 128
  examples (its own per seed) for 300 full-batch Adam steps. Both arms share everything but
  the loss: alpha = 0 (labels) or alpha = 0.9, T = 2. Accuracy is on 4096 held-out examples.
  Three seeds train together (stacked params, one compilation per arm). In exploratory runs
  KD won on every one of 5 seeds by 3-7 points; the test asserts a mean gain above 2 points
  and a win on at least 2 of the 3 seeds.
  """
  from compressjax import channels
  from compressjax.models.mlp import MLP

  cfg = channels.ChannelConfig(modulations=("bpsk", "qpsk", "psk8", "qam16"), profile="awgn",
                               seq_len=8, num_pilots=0, snr_db=(15.0, 25.0))
  teacher, student = MLP(hidden=(128, 128), num_outputs=4), MLP(hidden=(32,), num_outputs=4)
  x0 = jnp.zeros((1, 8, 2))
  t_params, _ = helpers.train_classifier(
      lambda p, x: teacher.apply({"params": p}, x),
      teacher.init(jax.random.key(0), x0)["params"], optax.adam(3e-3),
      helpers.modulation_data(cfg, 256), steps=400, key=jax.random.key(1))
  x_test, y_test = helpers.modulation_data(cfg, 4096)(jax.random.key(2))

  seeds = jax.random.split(jax.random.key(3), 3)
  s_init = jax.vmap(lambda k: student.init(k, x0)["params"])(seeds)
  x_train, y_train = jax.vmap(helpers.modulation_data(cfg, 128))(
      jax.vmap(lambda k: jax.random.fold_in(k, 1))(seeds))
  apply_s = jax.vmap(lambda p, x: student.apply({"params": p}, x))

  def train(alpha):
    def loss_fn(p, x, y):
      # The teacher's forward pass runs inside the same jitted step.
      t_logits = jax.vmap(lambda x: teacher.apply({"params": t_params}, x))(x)
      return jnp.sum(jnp.mean(distillation.kd_loss(apply_s(p, x), t_logits, y, 2.0, alpha), -1))
    params, _ = helpers.train_classifier(apply_s, s_init, optax.adam(3e-3),
                                         lambda key: (x_train, y_train), steps=300,
                                         key=jax.random.key(4), loss_fn=loss_fn)
    logits = jax.vmap(lambda p: student.apply({"params": p}, x_test))(params)
    return np.asarray(jnp.mean(jnp.argmax(logits, -1) == y_test, -1))

  labels_acc, kd_acc = train(0.0), train(0.9)
  teacher_acc = helpers.accuracy(lambda p, x: teacher.apply({"params": p}, x), t_params,
                                 x_test, y_test)
  print(f"teacher {teacher_acc:.3f}; student labels {labels_acc} (mean {labels_acc.mean():.3f})"
        f", kd {kd_acc} (mean {kd_acc.mean():.3f})")
  assert kd_acc.mean() > labels_acc.mean() + 0.02, (labels_acc, kd_acc)
  assert np.sum(kd_acc > labels_acc) >= 2, (labels_acc, kd_acc)
