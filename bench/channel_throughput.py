"""Throughput of the jitted channel simulator vs a plain vectorized NumPy implementation.

Run: ``python bench/channel_throughput.py [--rounds 41]``. For a flat Rician channel, for
the multipath channel the training uses (`TRAINING`, a copy of ``experiments/common.py``'s
``channel``: 3GPP InF LOS truncated to 4 taps, K = 7 dB, Clarke/Jakes Doppler at 200 Hz,
L = 64 at 20 MHz, per-example SNR), and for a harder TDL (exponential 50 ns -> 7 taps,
K = 10 dB, 1 kHz, L = 128), it times one batch (B = 256, "symbols" task) of
``channels.simulate`` (jitted, compiled before timing) and of `numpy_generator`, the same
channel in NumPy (float32/complex64, PCG64, the same Doppler model and factorization),
interleaved round by round in rotating order, and prints the medians in complex samples
per second, the JAX/NumPy ratio and an A/A ratio (NumPy vs a second copy of NumPy). It
also prints the time to generate one training batch of the default run (3 tasks) and of
that run's whole teacher train step, which draws the batch inside it, interleaved. The last line is ``ratio: X``, the
JAX/NumPy ratio on the training channel. The machine may be loaded by other jobs, so
figures are indicative.
"""

import os

# NumPy's GEMMs here are tiny; OpenBLAS threads would only spin after each call and steal
# this 2-core machine from XLA. Set before NumPy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import math
import sys
import time

import jax
import numpy as np
import optax

from compressjax import channels
from compressjax import training
from compressjax.models import iq_transformer
from compressjax.studies import wireless

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

B = 256
# The default run's config (experiments/common.py, "cpu" size): its channel and batch.
DEFAULT = common.base_config("cpu")
TRAINING = channels.ChannelConfig(**DEFAULT.channel)
TRAIN_BATCH = DEFAULT.train.batch_size  # frames per task


def _cis(phase: np.ndarray) -> np.ndarray:
  """exp(j phase) as complex64 from float32 cos/sin (np.exp(1j * x) goes via complex128)."""
  out = np.empty(phase.shape, np.complex64)
  out.real = np.cos(phase)
  out.imag = np.sin(phase)
  return out


def numpy_generator(cfg: channels.ChannelConfig):
  """A NumPy generator of "symbols" batches of ``cfg``'s channel (same model as JAX).

  Static tables (constellation, pilots, profile, Clarke basis) are built once here, as
  the jitted version builds them at trace time; each call draws with NumPy's PCG64.
  """
  seq, n_t, n_s = cfg.seq_len, cfg.tap_count, cfg.doppler_sinusoids
  lo, hi = cfg.snr_range
  pts = np.asarray(channels.constellation(cfg.modulation))
  pilots = np.asarray(channels.pilot_symbols(cfg.num_pilots))
  k = cfg.bits_per_symbol
  shifts = np.arange(k - 1, -1, -1, dtype=np.int32)
  kf = cfg.k_factor
  diffuse = np.sqrt(cfg.pdp / (kf + 1.0)).astype(np.float32)[:, None]       # [T, 1]
  los = np.float32(math.sqrt(kf / (kf + 1.0)))
  wd = np.float32(2 * np.pi * cfg.doppler_norm)
  ramp = np.arange(seq, dtype=np.float32)
  if cfg.time_varying and cfg.doppler_model == "kl":
    basis_t = (channels.fading.clarke_basis(cfg.doppler_norm, seq).T
               * np.float32(math.sqrt(0.5)))                                   # [r, L]
  l2 = min(16, seq)
  l1 = -(-seq // l2)

  def scattered(rng, batch):                                                   # [B, T, L]
    if cfg.doppler_model == "kl":
      rank = basis_t.shape[0]
      z = rng.standard_normal((batch * 2 * n_t, rank), dtype=np.float32)
      if rank <= channels.fading.KL_FUSED_RANK:     # as the JAX side (and 3x faster than a
        g = sum(z[:, j:j + 1] * basis_t[j] for j in range(rank))   # rank-1 GEMM here)
      else:
        g = z @ basis_t                                                    # one GEMM
      g = g.reshape(batch, 2 * n_t, seq)
      return g[:, :n_t] + np.complex64(1j) * g[:, n_t:]
    u = rng.random((batch, n_t, 1), dtype=np.float32)
    z = rng.standard_normal((2, batch, n_t, n_s, 1), dtype=np.float32)
    z = (z[0] + np.complex64(1j) * z[1]) * np.float32(math.sqrt(0.5 / n_s))
    w = wd * np.cos(np.float32(np.pi / n_s) * (np.arange(n_s, dtype=np.float32) + u))
    p = _cis((l2 * np.arange(l1, dtype=np.float32)) * w[..., None]) * z      # [B, T, N, L1]
    q = _cis(np.arange(l2, dtype=np.float32) * w[..., None])                 # [B, T, N, L2]
    g = np.swapaxes(p, -1, -2) @ q                                            # [B, T, L1, L2]
    return g.reshape(batch, n_t, l1 * l2)[..., :seq]

  def draw(rng: np.random.Generator, batch: int) -> dict:
    snr = rng.uniform(lo, hi, batch).astype(np.float32)
    noise_var = (10.0 ** (-snr / 10.0)).astype(np.float32)
    idx = rng.integers(0, 1 << k, (batch, seq), dtype=np.int32)
    idx[:, :cfg.num_pilots] = 0
    x = pts[idx]
    x[:, :cfg.num_pilots] = pilots
    bits = (idx[..., None] >> shifts) & 1
    if cfg.time_varying:
      h = scattered(rng, batch) * diffuse                                     # [B, T, L]
      theta0, phi0 = rng.uniform(0, 2 * np.pi, (2, batch, 1)).astype(np.float32)
      h[:, 0] += los * _cis(wd * np.cos(theta0) * ramp + phi0)
      taps = np.swapaxes(h, 1, 2)
    else:
      g = rng.standard_normal((2, batch, n_t), dtype=np.float32) * np.float32(math.sqrt(0.5))
      taps = (g[0] + np.complex64(1j) * g[1]) * diffuse[:, 0]
      taps[:, 0] += los * _cis(rng.uniform(0, 2 * np.pi, batch).astype(np.float32))
      h = taps[:, :, None]                                                    # [B, T, 1]
    xp = np.concatenate([np.zeros((batch, n_t - 1), np.complex64), x], axis=1)
    y = x * h[:, 0]
    for t in range(1, n_t):
      y += xp[:, n_t - 1 - t:n_t - 1 - t + seq] * h[:, t]
    w_n = rng.standard_normal((batch, seq, 2), dtype=np.float32)
    iq = np.stack([y.real, y.imag], -1) + w_n * np.sqrt(noise_var / 2)[:, None, None]
    return dict(iq=iq, snr_db=snr, symbols=idx, bits=bits, taps=taps, noise_var=noise_var)

  return draw


def _time(fn) -> tuple[float, float]:
  """(wall, process CPU) seconds of one call, waiting for JAX's result."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu


def compare(cfg: channels.ChannelConfig, rounds: int) -> dict:
  """Median (wall, cpu) seconds per batch of jax, numpy and numpy (A/A copy), interleaved."""
  rng = np.random.default_rng(0)
  keys = list(jax.random.split(jax.random.key(0), rounds + 2))
  draw = numpy_generator(cfg)
  variants = {
      "jax": lambda i: channels.simulate(keys[i], cfg, B, "symbols"),
      "numpy": lambda i: draw(rng, B),
      "numpy_copy": lambda i: draw(rng, B),
  }
  for fn in variants.values():      # compile / warm up
    jax.block_until_ready(fn(rounds))
    jax.block_until_ready(fn(rounds + 1))
  times = {name: [] for name in variants}
  names = list(variants)
  for r in range(rounds):
    for name in names[r % 3:] + names[:r % 3]:
      times[name].append(_time(lambda: variants[name](r)))
  return {name: np.median(np.array(t), axis=0) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=41)
  args = parser.parse_args()
  flat = channels.ChannelConfig(profile="flat", k_factor_db=10.0)
  harder = channels.ChannelConfig(profile="exponential", delay_spread_ns=50.0,
                                  k_factor_db=10.0, doppler_hz=1000.0, snr_db=(0.0, 20.0))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={B}, symbols task, "
        f"{args.rounds} interleaved rounds, medians; machine shared, so indicative")
  print(f"{'channel':<38}{'jax Msa/s':>10}{'numpy Msa/s':>12}{'jax/numpy':>10}{'A/A':>6}"
        f"{'cpu ms jax':>11}{'numpy':>7}{'ratio':>7}")
  ratios = {}
  rows = [("flat Rician K=10dB L=128", flat),
          ("training: InF T=4 fd=200Hz L=64, kl", TRAINING),
          ("training, sos N=8", dataclasses.replace(TRAINING, doppler_model="sos")),
          (f"TDL T={harder.tap_count} K=10dB fd=1kHz L=128, kl", harder)]
  for label, cfg in rows:
    med = compare(cfg, args.rounds)
    rate = {n: B * cfg.seq_len / t[0] / 1e6 for n, t in med.items()}
    ratios[cfg] = med["numpy"][0] / med["jax"][0]
    print(f"{label:<38}{rate['jax']:>10.2f}{rate['numpy']:>12.2f}{ratios[cfg]:>10.2f}"
          f"{med['numpy'][0] / med['numpy_copy'][0]:>6.2f}{med['jax'][1] * 1e3:>11.2f}"
          f"{med['numpy'][1] * 1e3:>7.2f}{med['numpy'][1] / med['jax'][1]:>7.2f}")
  batch_ms, step_ms = batch_vs_step(args.rounds)
  print(f"one training batch ({len(DEFAULT.train.tasks)} tasks x {TRAIN_BATCH} frames, "
        f"L={TRAINING.seq_len}): {batch_ms:.3f} ms; the default teacher train step that "
        f"draws it: {step_ms:.1f} ms; batch / step = {100 * batch_ms / step_ms:.2f}%")
  print(f"ratio: {ratios[TRAINING]:.2f}")


def batch_vs_step(rounds: int) -> tuple[float, float]:
  """Median ms of the default run's batch alone and of its whole train step, interleaved."""
  setup = wireless.validate(DEFAULT)
  data_fn = training.multitask_data_fn(TRAINING, TRAIN_BATCH, tuple(DEFAULT.train.tasks))
  draw = jax.jit(data_fn)
  model = iq_transformer.IQTransformer(setup.teacher)
  tx = optax.adamw(DEFAULT.train.learning_rate, weight_decay=DEFAULT.train.weight_decay)
  step = training.make_train_step(training.multitask_forward(model.apply), tx,
                                  training.task_losses, data_fn)
  box = [training.create_train_state(
      iq_transformer.init_params(setup.teacher, jax.random.key(0)), tx, jax.random.key(1))]

  def one_step():
    box[0], metrics = step(box[0])
    return metrics

  keys = list(jax.random.split(jax.random.key(2), rounds))
  _time(lambda: draw(keys[0]))
  _time(one_step)  # compile both first
  batch, whole = [], []
  for k in keys:
    batch.append(_time(lambda k=k: draw(k))[0])
    whole.append(_time(one_step)[0])
  return np.median(batch) * 1e3, np.median(whole) * 1e3


if __name__ == "__main__":
  main()
