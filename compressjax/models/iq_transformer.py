"""A small multi-task transformer over I/Q sequences: the wireless foundation model.

I/Q samples ``[B, L, 2]`` first pass the receiver's fixed (not learned) front end
(``frontend``: the raw samples, or `channels.frontend.pilot_features`: the channel and
noise estimates from the pilot preamble and the MMSE-equalized symbols, ``in_channels``
values per sample), are cut into patches of ``patch`` samples, embedded by one Dense
layer, given learned or sinusoidal positions, and passed through ``depth`` pre-norm blocks (multi-head self-attention, then a GELU MLP; Vaswani et al., 2017,
"Attention is all you need", with the pre-norm placement of Xiong et al., 2020). A
final LayerNorm feeds three task heads that share the backbone:

* ``modulation``: mean-pooled tokens -> Dense -> class logits ``[B, num_classes]``;
* ``symbols``: each token -> Dense ``patch * M`` -> symbol logits ``[B, L, M]`` (plus,
  with a front end, a per-sample Dense of its features: ``skip_symbols``);
* ``channel``: mean-pooled tokens -> Dense ``2 T`` -> block-fading taps ``[B, T, 2]``
  (real, imaginary).

The parameter layout is a contract with `compressjax.pruning` (see
``notes/model_contract.md``): attention kernels use the ``nn.DenseGeneral`` layout
``query|key|value/kernel [d, H_i, dh]`` and ``out/kernel [H_i, dh, d]``, and the head
count ``H_i`` and MLP width ``F_i`` may differ per block (a tuple in the config), so a
structurally pruned, materialized tree is again a valid model;
`config_from_params` reads the per-block sizes back from a tree. A block may hold
zero heads or zero MLP units (it then adds nothing to the residual stream).

Each block sows its attention weights ``[B, H_i, N, N]`` as
``intermediates/block_i/attn/attention`` and its output tokens ``[B, N, d]`` as
``intermediates/block_i/features`` (``apply(..., mutable=["intermediates"])``).
"""

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from compressjax.channels import frontend as frontend_lib

POSITIONS = ("learned", "sinusoidal")
DTYPES = ("float32", "bfloat16")
TASKS = ("modulation", "symbols", "channel")


def _per_block(value: int | tuple[int, ...], depth: int, field: str, minimum: int) -> None:
  if isinstance(value, bool):
    raise ValueError(f"{field} must be an int or a tuple of {depth} ints, got {value!r}")
  if isinstance(value, int):
    if value < max(minimum, 1):
      raise ValueError(f"{field} must be >= 1, got {value}")
    return
  if (not isinstance(value, tuple) or len(value) != depth
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                 for v in value)):
    raise ValueError(f"{field} must be an int >= 1 or a tuple of {depth} ints >= {minimum} "
                     f"(one per block), got {value!r}")


@dataclasses.dataclass(frozen=True)
class IQTransformerConfig:
  """Architecture of an `IQTransformer` (frozen and hashable: usable as a static arg).

  The defaults fit the default ``channels.ChannelConfig`` (L = 128, 5 modulation classes,
  16-QAM symbols, 7 taps); otherwise set ``seq_len``, ``num_classes``, ``num_symbols`` and
  ``num_taps`` from the channel config.

  Attributes:
    width: token width d.
    depth: number of blocks.
    num_heads: heads per block, an int or a per-block tuple (0 allowed in a tuple:
      a block whose heads were all pruned).
    head_dim: width dh of each head (fixed across blocks).
    mlp_dim: hidden MLP width per block, an int or a per-block tuple (0 allowed in a
      tuple).
    patch: I/Q samples per token; ``seq_len`` must be a multiple of it.
    seq_len: frame length L in samples.
    positions: "learned" (a ``pos_embed`` parameter) or "sinusoidal" (fixed).
    num_classes: classes of the modulation head.
    num_symbols: constellation order M of the symbol head.
    num_taps: channel taps T of the channel head.
    dropout: dropout rate after the embedding, attention and MLP (train only).
    frontend: the fixed input features, one of `channels.frontend.FRONTENDS`: "raw"
      (the I/Q samples) or "pilots" (model-based features from the pilot preamble).
    num_pilots: P, the preamble length the "pilots" front end reads (> ``num_taps``);
      unused by "raw".
    tap_powers: the channel's mean tap powers E|h_t|^2 (``num_taps`` floats), the prior
      of the "pilots" front end's LMMSE channel estimate; None estimates the taps by LS.
    dtype: the compute dtype, one of `DTYPES`: "float32", or "bfloat16" for the
      embedding, blocks and heads on accelerators (params stay float32, as in big_vision
      and the flax examples; the front end, LayerNorm statistics, the attention softmax
      and the outputs stay float32).
  """
  width: int = 64
  depth: int = 4
  num_heads: int | tuple[int, ...] = 4
  head_dim: int = 16
  mlp_dim: int | tuple[int, ...] = 128
  patch: int = 2
  seq_len: int = 128
  positions: str = "learned"
  num_classes: int = 5
  num_symbols: int = 16
  num_taps: int = 7
  dropout: float = 0.0
  frontend: str = "raw"
  num_pilots: int = 0
  tap_powers: tuple[float, ...] | None = None
  dtype: str = "float32"

  def __post_init__(self):
    for field in ("width", "depth", "head_dim", "patch", "seq_len", "num_classes",
                  "num_taps"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{field} must be an int >= 1, got {v!r}")
    for field in ("num_heads", "mlp_dim"):
      v = getattr(self, field)
      if isinstance(v, list):
        object.__setattr__(self, field, tuple(v))
      _per_block(getattr(self, field), self.depth, field, minimum=0)
    if not isinstance(self.num_symbols, int) or self.num_symbols < 2:
      raise ValueError(f"num_symbols must be an int >= 2, got {self.num_symbols!r}")
    if self.seq_len % self.patch:
      raise ValueError(f"seq_len must be a multiple of patch={self.patch}, got {self.seq_len}")
    if self.positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    frontend_lib.num_features(self.frontend, self.num_taps)
    if self.tap_powers is not None:
      object.__setattr__(self, "tap_powers", tuple(float(p) for p in self.tap_powers))
    frontend_lib.check_tap_powers(self.tap_powers, self.num_taps)
    if self.frontend == "pilots":
      frontend_lib.check_pilots(self.num_pilots, self.num_taps)
      if self.num_pilots >= self.seq_len:
        raise ValueError(f"num_pilots must be < seq_len={self.seq_len}, got {self.num_pilots}")

  @property
  def in_channels(self) -> int:
    """Input values per sample that the embedding reads (2 for raw I/Q)."""
    return frontend_lib.num_features(self.frontend, self.num_taps)

  @property
  def num_tokens(self) -> int:
    """Tokens per frame N = seq_len / patch."""
    return self.seq_len // self.patch

  def heads(self, block: int) -> int:
    """Head count H_i of block ``block``."""
    return self.num_heads if isinstance(self.num_heads, int) else self.num_heads[block]

  def mlp(self, block: int) -> int:
    """MLP width F_i of block ``block``."""
    return self.mlp_dim if isinstance(self.mlp_dim, int) else self.mlp_dim[block]


def teacher_config(**overrides: Any) -> IQTransformerConfig:
  """The CPU-sized teacher: d=64, 4 blocks of 4x16 heads, MLP 128, patch 2 (~0.14 M params).

  Patch 2 rather than 4: in a short probe (2 blocks, 400 adamw steps of 3 x 64 frames,
  L = 64, 16-QAM, exponential Rician channel) patch 4 / 2 / 1 gave SER 0.76 / 0.48 / 0.40,
  modulation accuracy 0.41 / 0.50 / 0.55 and channel NMSE -9.9 / -11.4 / -12.0 dB at
  about 1x / 2x / 5x the step time: symbol detection needs fine tokens most.

  A full-size teacher for a Colab GPU/TPU would be ``width=256, depth=8, num_heads=8,
  head_dim=32, mlp_dim=1024, patch=2, seq_len=256`` (~6.4 M params).

  Args:
    **overrides: fields to change (``seq_len``, ``num_classes``, ``num_symbols``,
      ``num_taps`` must match the channel config).

  Returns:
    The config.
  """
  return dataclasses.replace(IQTransformerConfig(), **overrides)


def student_config(**overrides: Any) -> IQTransformerConfig:
  """The CPU-sized student: d=32, 2 blocks of 2x16 heads, MLP 64, patch 2 (~21 k params).

  Same patch (token count) as the teacher, so attention maps can be distilled one to one.

  A full-size student beside the full-size teacher would be ``width=128, depth=4,
  num_heads=4, head_dim=32, mlp_dim=512, patch=2, seq_len=256`` (~0.8 M params).

  Args:
    **overrides: fields to change.

  Returns:
    The config.
  """
  base = IQTransformerConfig(width=32, depth=2, num_heads=2, head_dim=16, mlp_dim=64)
  return dataclasses.replace(base, **overrides)


def sinusoidal_positions(num_tokens: int, width: int) -> jnp.ndarray:
  """Fixed sine/cosine position codes ``[1, N, d]`` (Vaswani et al., 2017, Sec. 3.5)."""
  pos = jnp.arange(num_tokens, dtype=jnp.float32)[:, None]
  i = jnp.arange((width + 1) // 2, dtype=jnp.float32)[None, :]
  angle = pos / jnp.power(10000.0, 2.0 * i / width)
  codes = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(num_tokens, -1)
  return codes[None, :, :width]


def _kernel_init(key: chex.PRNGKey, shape: tuple[int, ...], dtype: Any = jnp.float32):
  # LeCun normal, as flax's default, but a pruned-away (zero-size) kernel is just empty:
  # the fan computation of the default initializer divides by zero there.
  if 0 in shape:
    return jnp.zeros(shape, dtype)
  return nn.initializers.lecun_normal()(key, shape, dtype)


class Attention(nn.Module):
  """Multi-head self-attention with ``nn.DenseGeneral`` query/key/value/out kernels."""
  num_heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> jnp.ndarray:
    features = (self.num_heads, self.head_dim)
    dense = lambda name: nn.DenseGeneral(features, kernel_init=_kernel_init,
                                         dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    self.sow("intermediates", "attention", weights)
    weights = nn.Dropout(self.dropout, deterministic=not train)(weights)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_init=_kernel_init,
                           dtype=self.dtype, name="out")(mixed)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array) -> jnp.ndarray:
    h = nn.gelu(nn.Dense(self.hidden, kernel_init=_kernel_init, dtype=self.dtype,
                         name="fc1")(x))
    return nn.Dense(x.shape[-1], kernel_init=_kernel_init, dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: chex.Array, train: bool = False) -> jnp.ndarray:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    h = Attention(self.num_heads, self.head_dim, self.dropout, self.dtype, name="attn")(
        norm("ln1")(x), train)
    x = x + drop(h)
    h = Mlp(self.mlp_dim, self.dtype, name="mlp")(norm("ln2")(x))
    x = x + drop(h)
    self.sow("intermediates", "features", x)
    return x


class IQTransformer(nn.Module):
  """Multi-task transformer encoder over I/Q frames (see the module docstring)."""
  config: IQTransformerConfig

  @nn.compact
  def __call__(self, iq: chex.Array, train: bool = False) -> dict[str, jnp.ndarray]:
    """Runs the backbone and all three heads.

    Args:
      iq: float I/Q samples ``[B, seq_len, 2]``.
      train: enables dropout (needs a ``"dropout"`` rng when ``config.dropout > 0``).

    Returns:
      ``{"modulation": [B, num_classes], "symbols": [B, seq_len, num_symbols],
      "channel": [B, num_taps, 2]}``.
    """
    cfg = self.config
    if iq.ndim != 3 or iq.shape[1:] != (cfg.seq_len, 2):
      raise ValueError(f"iq must have shape [B, {cfg.seq_len}, 2], got {iq.shape}")
    b = iq.shape[0]
    inputs = frontend_lib.features(iq, cfg.frontend, cfg.num_pilots, cfg.num_taps,
                                   cfg.tap_powers)
    dtype = jnp.dtype(cfg.dtype)
    dense = lambda features, name: nn.Dense(features, dtype=dtype, name=name)
    tokens = inputs.reshape(b, cfg.num_tokens, cfg.patch * cfg.in_channels)
    x = dense(cfg.width, "embed")(tokens)
    if cfg.positions == "learned":
      x = x + self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, cfg.num_tokens, cfg.width))
    else:
      x = x + sinusoidal_positions(cfg.num_tokens, cfg.width)
    x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
    for i in range(cfg.depth):
      x = Block(cfg.heads(i), cfg.head_dim, cfg.mlp(i), cfg.dropout, dtype,
                name=f"block_{i}")(x, train)
    x = nn.LayerNorm(dtype=dtype, name="ln_f")(x)
    pooled = x.mean(axis=1)
    symbols = dense(cfg.patch * cfg.num_symbols, "head_symbols")(x)
    symbols = symbols.reshape(b, cfg.seq_len, cfg.num_symbols)
    if cfg.frontend != "raw":
      # A per-sample linear path from the front end's features to the symbol logits: the
      # ML decision on an equalized sample is linear in it (argmax_m Re(x_hat s_m*) -
      # |s_m|^2 / 2), so this path learns the classical detector at once and the
      # transformer learns what it gets wrong.
      symbols = symbols + dense(cfg.num_symbols, "skip_symbols")(inputs)
    channel = dense(2 * cfg.num_taps, "head_channel")(pooled)
    out = {"modulation": dense(cfg.num_classes, "head_modulation")(pooled),
           "symbols": symbols, "channel": channel.reshape(b, cfg.num_taps, 2)}
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def init_params(config: IQTransformerConfig, key: chex.PRNGKey) -> dict[str, Any]:
  """Initial parameters of ``IQTransformer(config)`` (traced on a batch of one)."""
  dummy = jnp.zeros((1, config.seq_len, 2), jnp.float32)
  # Jitted: one compile beats dispatching every initializer op by op.
  return jax.jit(lambda k: IQTransformer(config).init(k, dummy)["params"])(key)


def config_from_params(config: IQTransformerConfig, params: Any) -> IQTransformerConfig:
  """The config whose structure matches ``params`` (e.g. after ``pruning.materialize``).

  Reads depth, width, per-block head counts and MLP widths, patch, positions and the
  head sizes from the kernel shapes; keeps ``seq_len``, ``dropout`` and the front end
  (``frontend``, ``num_pilots``, ``tap_powers``: they fix ``in_channels``) from ``config``.
  An int field of ``config`` stays an int when every block agrees.

  Args:
    config: the config the tree was (originally) built from.
    params: an ``IQTransformer`` parameter tree (the ``"params"`` collection).

  Returns:
    The matching config.

  Raises:
    ValueError: if the tree does not follow the contract layout.
  """
  try:
    depth = sum(1 for k in params if str(k).startswith("block_"))
    blocks = [params[f"block_{i}"] for i in range(depth)]
    heads = tuple(int(b["attn"]["query"]["kernel"].shape[1]) for b in blocks)
    mlps = tuple(int(b["mlp"]["fc1"]["kernel"].shape[1]) for b in blocks)
    head_dims = {int(b["attn"]["query"]["kernel"].shape[2]) for b in blocks}
    embed = params["embed"]["kernel"].shape
    sym = params["head_symbols"]["kernel"].shape[1]
    num_classes = int(params["head_modulation"]["kernel"].shape[1])
    num_taps = int(params["head_channel"]["kernel"].shape[1]) // 2
  except (KeyError, TypeError, IndexError, AttributeError) as e:
    raise ValueError(f"params must follow the IQTransformer layout, missing {e}") from e
  if depth < 1 or len(head_dims) != 1:
    raise ValueError(f"params must hold >= 1 block with one head_dim, got depth={depth}, "
                     f"head_dims={sorted(head_dims)}")
  if int(embed[0]) % config.in_channels:
    raise ValueError(f"params' embed kernel has {embed[0]} input rows, not a multiple of "
                     f"the config's in_channels={config.in_channels} "
                     f"(frontend={config.frontend!r})")
  patch = int(embed[0]) // config.in_channels

  def keep_form(field, values):
    if isinstance(getattr(config, field), int) and len(set(values)) == 1 and values[0] > 0:
      return values[0]
    return values

  return dataclasses.replace(
      config, width=int(embed[1]), depth=depth, num_heads=keep_form("num_heads", heads),
      head_dim=head_dims.pop(), mlp_dim=keep_form("mlp_dim", mlps), patch=patch,
      positions="learned" if "pos_embed" in params else "sinusoidal",
      num_classes=num_classes, num_symbols=int(sym) // patch, num_taps=num_taps)
