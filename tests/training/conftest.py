"""Fixtures for the training tests: cheap on-device fake batches with the channel shapes."""


import jax
import jax.numpy as jnp
import pytest

from compressjax.channels.simulate import Batch
from compressjax.models import iq_transformer as iqt

SEQ_LEN, NUM_PILOTS, NUM_TAPS, M, CLASSES = 8, 2, 2, 4, 3
TINY = iqt.IQTransformerConfig(width=16, depth=1, num_heads=2, head_dim=4, mlp_dim=16, patch=2,
                               seq_len=SEQ_LEN, num_classes=CLASSES, num_symbols=M,
                               num_taps=NUM_TAPS)


def fake_batch(key, batch_size: int) -> Batch:
  """A Batch of the simulator's shapes and dtypes (QPSK, T=2), made from a few cheap ops."""
  k = jax.random.split(key, 6)
  symbols = jax.random.randint(k[0], (batch_size, SEQ_LEN), 0, M)
  taps = (jax.random.normal(k[1], (batch_size, NUM_TAPS))
          + 1j * jax.random.normal(k[2], (batch_size, NUM_TAPS))) / 2.0
  snr_db = jax.random.uniform(k[3], (batch_size,), minval=0.0, maxval=20.0)
  iq = jax.random.normal(k[4], (batch_size, SEQ_LEN, 2))
  return Batch(iq=iq, label=jax.random.randint(k[5], (batch_size,), 0, CLASSES),
               snr_db=snr_db, symbols=symbols,
               bits=(symbols[..., None] >> jnp.array([1, 0])) & 1,
               pilot_mask=jnp.arange(SEQ_LEN) < NUM_PILOTS, taps=taps.astype(jnp.complex64),
               noise_var=10.0 ** (-snr_db / 10.0))


def fake_data(key, batch_size: int = 8):
  keys = jax.random.split(key, 3)
  return {t: fake_batch(k, batch_size) for t, k in zip(iqt.TASKS, keys)}


@pytest.fixture(scope="session")
def tiny_model():
  """(model, params) of a one-block transformer matching the fake batches."""
  return iqt.IQTransformer(TINY), iqt.init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="session")
def fake_data_fn():
  return lambda key, step=None, data=None: fake_data(key, batch_size=8)
