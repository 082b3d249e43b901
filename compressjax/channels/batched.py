"""Classical receivers over a whole `Batch`, and the I/Q <-> complex conversion.

`receivers` works on one frame; `run_batch` takes a `Batch` from `simulate` as it comes
(``iq`` [B, L, 2], per-frame ``noise_var`` and ``taps``) and its `ChannelConfig`, and runs
the chosen receiver on every frame under one ``jax.jit(jax.vmap(...))``:

- ``"ls"``: least-squares taps from the preamble (`receivers.ls_receiver`, ``T =
  cfg.tap_count`` taps, needs ``P >= T`` pilots);
- ``"lmmse"``: LMMSE taps with the prior ``cfg.tap_powers`` (`receivers.lmmse_receiver`);
- ``"perfect_csi"``: the true taps of each frame (`receivers.equalize_and_detect`).

All three detect ``cfg.modulation``, so they are meant for frames of the "symbols" and
"channel" tasks.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from compressjax.channels import receivers
from compressjax.channels.config import ChannelConfig
from compressjax.channels.simulate import Batch
from compressjax.channels.simulate import pilot_symbols

RECEIVERS = ("ls", "lmmse", "perfect_csi")


def iq_to_complex(iq: chex.Array) -> jnp.ndarray:
  """Complex samples from (real, imaginary) pairs: ``[..., 2]`` float -> ``[...]`` complex64.

  Args:
    iq: float array whose last axis has size 2 (as ``Batch.iq``).

  Returns:
    complex64 ``iq[..., 0] + 1j * iq[..., 1]``.

  Raises:
    ValueError: if the last axis does not have size 2.
  """
  iq = jnp.asarray(iq)
  if iq.ndim < 1 or iq.shape[-1] != 2:
    raise ValueError(f"iq must have a last axis of size 2 (real, imaginary), got shape "
                     f"{iq.shape}")
  iq = iq.astype(jnp.float32)
  return jax.lax.complex(iq[..., 0], iq[..., 1])


def complex_to_iq(z: chex.Array) -> jnp.ndarray:
  """(real, imaginary) pairs from complex samples: ``[...]`` -> ``[..., 2]`` float32.

  The inverse of `iq_to_complex` (the layout of ``Batch.iq`` and of model inputs).
  """
  z = jnp.asarray(z)
  return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(jnp.float32)


def _num_pilots(batch: Batch, seq_len: int) -> int | None:
  """Pilot positions per frame, or None when the mask is traced (inside a caller's jit)."""
  if isinstance(batch.pilot_mask, jax.core.Tracer):
    return None
  return int(np.asarray(batch.pilot_mask).reshape(-1, seq_len)[0].sum())


def _check(batch: Batch, cfg: ChannelConfig, receiver: str, tap_powers) -> None:
  if receiver not in RECEIVERS:
    raise ValueError(f"receiver must be one of {RECEIVERS}, got {receiver!r}")
  if not isinstance(cfg, ChannelConfig):
    raise ValueError(f"cfg must be a ChannelConfig, got {type(cfg).__name__}")
  shape = tuple(np.shape(batch.iq))
  if len(shape) != 3 or shape[1:] != (cfg.seq_len, 2):
    raise ValueError(f"batch.iq must have shape [B, {cfg.seq_len}, 2] (cfg.seq_len = "
                     f"{cfg.seq_len}), got {list(shape)}")
  if receiver == "perfect_csi":
    return
  need = cfg.tap_count if receiver == "ls" else 1
  if cfg.num_pilots < need:
    raise ValueError(f"receiver {receiver!r} needs cfg.num_pilots >= {need}"
                     f"{' (cfg.tap_count)' if receiver == 'ls' else ''}, got {cfg.num_pilots}")
  have = _num_pilots(batch, cfg.seq_len)
  if have is not None and have != cfg.num_pilots:
    raise ValueError(f"batch.pilot_mask must mark cfg.num_pilots = {cfg.num_pilots} preamble "
                     f"positions, got {have} (a 'modulation' task batch without pilots?)")
  if receiver == "lmmse" and tap_powers is not None \
      and np.shape(tap_powers) != (cfg.tap_count,):
    raise ValueError(f"tap_powers must have shape ({cfg.tap_count},), got "
                     f"{np.shape(tap_powers)}")


@functools.partial(jax.jit, static_argnames=("cfg", "receiver"))
def _run(iq, taps, noise_var, tap_powers, cfg: ChannelConfig, receiver: str):
  y = iq_to_complex(iq)
  name = cfg.modulation
  if receiver == "perfect_csi":
    fn = lambda y, h, n: receivers.equalize_and_detect(y, h, n, name)
    return jax.vmap(fn)(y, taps.astype(jnp.complex64), noise_var)
  x_pilot = pilot_symbols(cfg.num_pilots)
  if receiver == "ls":
    fn = lambda y, n: receivers.ls_receiver(y, x_pilot, cfg.tap_count, n, name)
  else:
    fn = lambda y, n: receivers.lmmse_receiver(y, x_pilot, tap_powers, n, name)
  return jax.vmap(fn)(y, noise_var)


def run_batch(batch: Batch, cfg: ChannelConfig, receiver: str = "lmmse",
              tap_powers: chex.Array | None = None) -> receivers.ReceiverOutput:
  """Runs a classical receiver on every frame of a batch (jitted, vmapped).

  Args:
    batch: from ``simulate(key, cfg, B, task="symbols")`` (or ``"channel"``).
    cfg: the config the batch was drawn with (modulation, pilots, tap count).
    receiver: one of `RECEIVERS` (see the module docstring).
    tap_powers: float [T] prior E|h_t|^2 for ``"lmmse"``; default ``cfg.tap_powers``, the
      true mean tap powers of the channel.

  Returns:
    A `receivers.ReceiverOutput` with a leading batch axis: symbols [B, L], llr [B, L, k],
    x_hat [B, L], sinr [B, L], taps [B, T] (estimated, or the true block taps).

  Raises:
    ValueError: for an unknown receiver, a batch whose shape does not match ``cfg``, too few
      pilots for the receiver, or ``tap_powers`` of the wrong shape.
  """
  _check(batch, cfg, receiver, tap_powers)
  if tap_powers is None:
    tap_powers = cfg.tap_powers
  return _run(batch.iq, batch.taps, jnp.asarray(batch.noise_var, jnp.float32),
              jnp.asarray(tap_powers, jnp.float32), cfg, receiver)
