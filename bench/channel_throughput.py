"""Throughput of the jitted channel simulator vs a plain vectorized NumPy implementation.

Run: ``python bench/channel_throughput.py [--rounds 15]``. For a flat Rician channel and
for the multipath training channel (exponential TDL, 50 ns at 20 MHz -> 7 taps, K = 10 dB,
Clarke/Jakes Doppler, per-example SNR), it times one batch (B = 256, L = 128, "symbols"
task) of ``channels.simulate`` (jitted, compiled before timing) and of `numpy_batch`, the
same channel in NumPy (float32/complex64, PCG64, the same sum-of-sinusoids model and
factorization), interleaved round by round in rotating order, and prints the medians in
complex samples per second, the JAX/NumPy ratio and an A/A ratio (NumPy vs a second copy
of NumPy). It also prints the time to generate one default training batch. The last line
is ``ratio: X``, the multipath JAX/NumPy ratio. The machine may be loaded by other jobs, so
figures are indicative.
"""

import os

# NumPy's GEMMs here are tiny; OpenBLAS threads would only spin after each call and steal
# this 2-core machine from XLA. Set before NumPy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import math
import time

import jax
import numpy as np

from compressjax import channels

B, L = 256, 128


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
      z = rng.standard_normal((batch * 2 * n_t, basis_t.shape[0]), dtype=np.float32)
      g = (z @ basis_t).reshape(batch, 2 * n_t, seq)                        # one GEMM
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
  parser.add_argument("--rounds", type=int, default=21)
  args = parser.parse_args()
  flat = channels.ChannelConfig(profile="flat", k_factor_db=10.0)
  multipath = channels.ChannelConfig(profile="exponential", delay_spread_ns=50.0,
                                     k_factor_db=10.0, doppler_hz=1000.0, snr_db=(0.0, 20.0))
  sos = dataclasses.replace(multipath, doppler_model="sos")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; B={B}, L={L}, symbols task, "
        f"{args.rounds} interleaved rounds, medians; machine shared, so indicative")
  print(f"{'channel':<33}{'jax Msa/s':>10}{'numpy Msa/s':>12}{'jax/numpy':>10}{'A/A':>6}"
        f"{'cpu ms jax':>11}{'numpy':>7}{'ratio':>7}")
  ratios = {}
  for label, cfg in [("flat Rician K=10dB", flat),
                     (f"TDL T={multipath.tap_count} K=10dB fd=1kHz, kl", multipath),
                     (f"TDL T={sos.tap_count} K=10dB fd=1kHz, sos N=8", sos)]:
    med = compare(cfg, args.rounds)
    rate = {n: B * L / t[0] / 1e6 for n, t in med.items()}
    ratios[cfg] = med["numpy"][0] / med["jax"][0]
    print(f"{label:<33}{rate['jax']:>10.2f}{rate['numpy']:>12.2f}{ratios[cfg]:>10.2f}"
          f"{med['numpy'][0] / med['numpy_copy'][0]:>6.2f}{med['jax'][1] * 1e3:>11.2f}"
          f"{med['numpy'][1] * 1e3:>7.2f}{med['numpy'][1] / med['jax'][1]:>7.2f}")
  for label, cfg in [("default config (block fading)", channels.ChannelConfig()),
                     ("multipath + Doppler (kl)", multipath)]:
    keys = list(jax.random.split(jax.random.key(1), args.rounds + 1))
    jax.block_until_ready(channels.simulate(keys[-1], cfg, B, "symbols"))
    t = [_time(lambda: channels.simulate(k, cfg, B, "symbols"))[0] for k in keys[:-1]]
    print(f"one training batch (B={B}, L={cfg.seq_len}, symbols), {label}: "
          f"{np.median(t) * 1e3:.2f} ms")
  print(f"ratio: {ratios[multipath]:.2f}")


if __name__ == "__main__":
  main()
