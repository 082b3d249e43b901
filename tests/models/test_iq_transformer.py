"""Tests of the I/Q transformer: shapes, the contract layout, per-block sizes, sown maps."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax.models import iq_transformer as iqt
from compressjax.selection import path_str

CFG = iqt.IQTransformerConfig(width=16, depth=2, num_heads=2, head_dim=4, mlp_dim=8, patch=2,
                              seq_len=8, num_classes=3, num_symbols=4, num_taps=3)
B = 3


def _iq(key=0, b=B, seq_len=8):
  return jax.random.normal(jax.random.key(key), (b, seq_len, 2))


# init_params compiles on every call (its jit wraps a fresh lambda); jitted here (the inner
# jit inlined), it compiles once per config.
_init_params = jax.jit(iqt.init_params, static_argnums=0)


@functools.lru_cache
def _apply_fn(cfg):
  return jax.jit(iqt.IQTransformer(cfg).apply, static_argnames="mutable")


def _apply(cfg, params, iq, mutable=False):
  # Jitted (one compile per config and shape): faster than op-by-op dispatch of a whole
  # transformer.
  return _apply_fn(cfg)({"params": params}, iq, mutable=mutable)


@pytest.fixture(scope="module")
def params():
  return _init_params(CFG, jax.random.key(0))


def test_heads_have_documented_shapes(params):
  out = _apply(CFG, params, _iq())
  chex.assert_shape(out["modulation"], (B, 3))
  chex.assert_shape(out["symbols"], (B, 8, 4))
  chex.assert_shape(out["channel"], (B, 3, 2))


def test_params_follow_the_contract_layout(params):
  d, h, dh, f, p = 16, 2, 4, 8, 2
  expected = {"embed/kernel": (2 * p, d), "embed/bias": (d,), "pos_embed": (1, 4, d),
              "ln_f/scale": (d,), "ln_f/bias": (d,),
              "head_modulation/kernel": (d, 3), "head_modulation/bias": (3,),
              "head_symbols/kernel": (d, p * 4), "head_symbols/bias": (p * 4,),
              "head_channel/kernel": (d, 6), "head_channel/bias": (6,)}
  for i in range(2):
    b = f"block_{i}"
    for ln in ("ln1", "ln2"):
      expected |= {f"{b}/{ln}/scale": (d,), f"{b}/{ln}/bias": (d,)}
    for name in ("query", "key", "value"):
      expected |= {f"{b}/attn/{name}/kernel": (d, h, dh), f"{b}/attn/{name}/bias": (h, dh)}
    expected |= {f"{b}/attn/out/kernel": (h, dh, d), f"{b}/attn/out/bias": (d,),
                 f"{b}/mlp/fc1/kernel": (d, f), f"{b}/mlp/fc1/bias": (f,),
                 f"{b}/mlp/fc2/kernel": (f, d), f"{b}/mlp/fc2/bias": (d,)}
  got = {path_str(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert got == expected


def test_attention_matches_flax_multihead_attention():
  # Same DenseGeneral layout as nn.MultiHeadDotProductAttention, so its params fit it.
  x = _iq(1, 2, 5)[..., :1] * jnp.ones((1, 1, 16))
  x = x + jax.random.normal(jax.random.key(2), x.shape)
  ours = iqt.Attention(num_heads=2, head_dim=4)
  p = jax.jit(ours.init)(jax.random.key(3), x)["params"]
  ref = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=16)
  np.testing.assert_allclose(jax.jit(ours.apply)({"params": p}, x),
                             jax.jit(ref.apply)({"params": p}, x, x), rtol=1e-5, atol=1e-5)


def test_sown_attention_rows_sum_to_one_and_features_have_token_shape(params):
  _, state = _apply(CFG, params, _iq(), mutable="intermediates")
  inter = state["intermediates"]
  for i in range(2):
    (attn,) = inter[f"block_{i}"]["attn"]["attention"]
    (feat,) = inter[f"block_{i}"]["features"]
    chex.assert_shape(attn, (B, 2, 4, 4))
    chex.assert_shape(feat, (B, 4, 16))
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(attn) >= 0)


def test_materialized_heads_equal_zeroed_heads(params):
  # Dropping head 1 of block 0 (slicing its kernels, as pruning.materialize does) must give
  # the same outputs as zeroing that head's output projection in the full model.
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed["block_0"]["attn"]["out"]["kernel"] = params["block_0"]["attn"]["out"]["kernel"].at[
      1].set(0.0)
  small = jax.tree.map(lambda x: x, params)
  attn = dict(params["block_0"]["attn"])
  for name in ("query", "key", "value"):
    attn[name] = {"kernel": attn[name]["kernel"][:, :1], "bias": attn[name]["bias"][:1]}
  attn["out"] = {"kernel": attn["out"]["kernel"][:1], "bias": attn["out"]["bias"]}
  small["block_0"] = {**params["block_0"], "attn": attn}
  # Also drop MLP units 3..7 of block 1 after zeroing them in the full model.
  zeroed["block_1"]["mlp"]["fc2"]["kernel"] = params["block_1"]["mlp"]["fc2"]["kernel"].at[
      3:].set(0.0)
  mlp = params["block_1"]["mlp"]
  small["block_1"] = {**params["block_1"], "mlp": {
      "fc1": {"kernel": mlp["fc1"]["kernel"][:, :3], "bias": mlp["fc1"]["bias"][:3]},
      "fc2": {"kernel": mlp["fc2"]["kernel"][:3], "bias": mlp["fc2"]["bias"]}}}
  small_cfg = iqt.config_from_params(CFG, small)
  assert small_cfg.num_heads == (1, 2) and small_cfg.mlp_dim == (8, 3)
  iq = _iq(4)
  full, sliced = _apply(CFG, zeroed, iq), _apply(small_cfg, small, iq)
  for task in iqt.TASKS:
    np.testing.assert_allclose(sliced[task], full[task], rtol=1e-5, atol=1e-5)


def test_empty_block_is_identity_on_the_residual_stream():
  cfg = dataclasses.replace(CFG, num_heads=(0, 2), mlp_dim=(0, 8), positions="sinusoidal")
  p = _init_params(cfg, jax.random.key(5))
  assert p["block_0"]["attn"]["query"]["kernel"].shape == (16, 0, 4)
  iq = _iq(6)
  out, state = _apply(cfg, p, iq, mutable="intermediates")
  (feat0,) = state["intermediates"]["block_0"]["features"]
  tokens = np.asarray(iq).reshape(B, 4, 4)
  embedded = tokens @ np.asarray(p["embed"]["kernel"]) + np.asarray(p["embed"]["bias"])
  embedded = embedded + np.asarray(iqt.sinusoidal_positions(4, 16))
  np.testing.assert_allclose(feat0, embedded, rtol=1e-5, atol=1e-5)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_sinusoidal_positions_match_the_formula():
  pe = np.asarray(iqt.sinusoidal_positions(6, 8))[0]
  pos, i = np.arange(6)[:, None], np.arange(4)[None, :]
  angle = pos / 10000.0 ** (2 * i / 8)
  np.testing.assert_allclose(pe[:, 0::2], np.sin(angle), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pe[:, 1::2], np.cos(angle), rtol=1e-5, atol=1e-6)


def test_config_from_params_round_trips(params):
  assert iqt.config_from_params(CFG, params) == CFG
  cfg = dataclasses.replace(CFG, num_heads=(2, 1), mlp_dim=(4, 8), positions="sinusoidal")
  p = jax.eval_shape(lambda: iqt.init_params(cfg, jax.random.key(0)))
  assert iqt.config_from_params(CFG, p) == cfg
  with pytest.raises(ValueError, match="params must follow"):
    iqt.config_from_params(CFG, {"embed": {}})


PILOTS = dataclasses.replace(CFG, seq_len=16, num_taps=2, num_pilots=4, frontend="pilots")


def test_pilots_frontend_reads_its_feature_count_per_sample(params):
  assert CFG.in_channels == 2 and PILOTS.in_channels == 12 + 2 * 2
  p = _init_params(PILOTS, jax.random.key(0))
  assert p["embed"]["kernel"].shape == (PILOTS.patch * PILOTS.in_channels, 16)
  # The per-sample skip path to the symbol logits exists only beside a front end.
  assert p["skip_symbols"]["kernel"].shape == (PILOTS.in_channels, 4)
  assert "skip_symbols" not in params   # the fixture: init_params(CFG, key(0))
  out = _apply(PILOTS, p, _iq(seq_len=16))
  chex.assert_shape(out["symbols"], (B, 16, 4))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())
  # The input-channel count is the config's, not a guess from the kernel: patch 2 of
  # 16-wide features (32 rows) is not mistaken for patch 16 of raw I/Q.
  assert iqt.config_from_params(PILOTS, p) == PILOTS
  wide = dataclasses.replace(PILOTS, patch=4)
  assert iqt.config_from_params(PILOTS, jax.eval_shape(
      lambda: iqt.init_params(wide, jax.random.key(0)))) == wide
  with pytest.raises(ValueError, match="in_channels=16"):
    iqt.config_from_params(PILOTS, params)


@pytest.mark.parametrize("overrides, field", [
    ({"frontend": "fft"}, "frontend"), ({"frontend": "pilots", "num_pilots": 3}, "num_pilots"),
    ({"seq_len": 9}, "seq_len"), ({"num_heads": (2,)}, "num_heads"),
    ({"mlp_dim": 0}, "mlp_dim"), ({"positions": "rotary"}, "positions"),
    ({"dropout": 1.0}, "dropout"), ({"num_symbols": 1}, "num_symbols")])
def test_config_rejects_bad_fields(overrides, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(CFG, **overrides)


def test_apply_rejects_wrong_frame_length(params):
  with pytest.raises(ValueError, match="iq must have shape"):
    _apply(CFG, params, _iq(seq_len=10))


def test_presets_are_valid_and_student_is_smaller():
  t = jax.eval_shape(lambda: iqt.init_params(iqt.teacher_config(), jax.random.key(0)))
  s = jax.eval_shape(lambda: iqt.init_params(iqt.student_config(), jax.random.key(0)))
  size = lambda tree: sum(np.prod(x.shape) for x in jax.tree.leaves(tree))
  assert size(s) < size(t) / 4
