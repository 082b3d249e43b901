"""Depthwise-conv forms on the default backend: a MobileNetV2 train step, and served layers.

Run: ``python bench/mobilenet_depthwise.py [--section train|forms|both]``.

train: the train-step time of MobileNetV2 x0.25 (batch 32, 16x16) with the grouped-conv vs
  the shifted-sum depthwise conv (``depthwise_impl`` "conv" and "shifted"; they share
  parameters and compute the same function, tests/models/test_mobilenet_v2.py), and a second
  copy of "shifted" (the A/A ratio shows the timing noise).
forms: one depthwise layer at the served student's shapes (the vision study's MobileNetV2
  x0.25 on 16x16 inputs: ``(size, channels, stride)`` of its depthwise layers), inference, at
  batch 1 and 256, in every form tried; each is first checked equal to the grouped
  ``lax.conv_general_dilated`` (``feature_group_count`` = channels, the model's padding
  k // 2), then timed in interleaved rounds; the ratio is to "shifted" (the per-round median),
  with "shifted (A/A copy)" for the noise. Only "conv" and "shifted" are model options; the
  others lost here and stay in this file.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from compressjax import training
from compressjax.models import MobileNetV2
from compressjax.models import mobilenet_v2

BATCH, SIZE, WIDTH, ROUNDS, REPS = 32, 16, 0.25, 5, 2
# (size, channels, stride) of the served student's depthwise layers (17 of them, 5 shapes).
LAYERS = ((16, 48, 1), (16, 48, 2), (8, 48, 1), (4, 144, 1), (2, 240, 1))
PAD = ((1, 1), (1, 1))  # the model's 3x3 padding (k // 2)
DN = ("NHWC", "HWIO", "NHWC")


def make_step(impl):
  model = MobileNetV2(num_classes=10, width_multiplier=WIDTH, depthwise_impl=impl)
  tx = optax.sgd(0.01)

  @jax.jit
  def step(variables, opt, x, y):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    u, opt = tx.update(g, opt)
    return {"params": optax.apply_updates(variables["params"], u), **upd}, opt

  return model, tx, step


def train_section():
  """Times the train step with each depthwise impl, interleaved."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, BATCH))
  variants = {"conv": make_step("conv"), "shifted": make_step("shifted"),
              "shifted (A/A copy)": make_step("shifted")}
  variables = variants["conv"][0].init(jax.random.key(0), x[:1])
  opt = variants["conv"][1].init(variables["params"])
  for _, _, step in variants.values():
    jax.block_until_ready(step(variables, opt, x, y))  # compile
  times = {name: [] for name in variants}
  for _ in range(ROUNDS):  # interleaved rounds
    for name, (_, _, step) in variants.items():
      t = time.perf_counter()
      for _ in range(REPS):
        jax.block_until_ready(step(variables, opt, x, y))
      times[name].append((time.perf_counter() - t) / REPS)
  med = {name: float(np.median(t)) for name, t in times.items()}
  print(f"train step: backend {jax.default_backend()}, batch {BATCH}, {SIZE}x{SIZE}, "
        f"width {WIDTH}")
  print(f"{'variant':<20} {'median ms/step':>15}")
  for name, m in med.items():
    print(f"{name:<20} {1e3 * m:>15.1f}")
  print(f"A/A ratio: {med['shifted (A/A copy)'] / med['shifted']:.2f}")
  print(f"ratio: {med['conv'] / med['shifted']:.2f}")


# ---------------------------------------------------------------- served depthwise forms
# Each takes x [n, h, w, c] (NCHW for "shifted NCHW"), kernel [3, 3, 1, c] and the stride.


def grouped_conv(x, kernel, s):
  """XLA's grouped convolution, one group per channel (the "conv" impl)."""
  return lax.conv_general_dilated(x, kernel, (s, s), PAD, dimension_numbers=DN,
                                  feature_group_count=x.shape[-1])


def shifted(x, kernel, s):
  """The library's shifted sum (the "shifted" impl)."""
  return mobilenet_v2.shifted_depthwise(x, kernel, (s, s), PAD)


def _windows(x, k, s):
  x = jnp.pad(x, ((0, 0), *PAD, (0, 0)))
  ho, wo = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
  return [x[:, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s, :]
          for dy in range(k) for dx in range(k)]


def taps_einsum(x, kernel, s):
  """The k*k shifted windows stacked, contracted with the kernel in one einsum."""
  k = kernel.shape[0]
  return jnp.einsum("nhwtc,tc->nhwc", jnp.stack(_windows(x, k, s), 3),
                    kernel.reshape(k * k, -1))


def patches_einsum(x, kernel, s):
  """im2col by ``lax.conv_general_dilated_patches``, then an einsum over the taps."""
  k, c = kernel.shape[0], x.shape[-1]
  p = lax.conv_general_dilated_patches(x, (k, k), (s, s), PAD, dimension_numbers=DN)
  p = p.reshape(*p.shape[:3], c, k * k)  # patches are channel-major
  return jnp.einsum("nhwct,tc->nhwc", p, kernel.reshape(k * k, c))


def channels_in_batch(x, kernel, s):
  """Channels moved into the batch dimension, one batch group per channel."""
  n, h, w, c = x.shape
  lhs = jnp.transpose(x, (3, 0, 1, 2)).reshape(c * n, h, w, 1)
  return lax.conv_general_dilated(lhs, kernel, (s, s), PAD, dimension_numbers=DN,
                                  batch_group_count=c)


def vmap_channels(x, kernel, s):
  """A single-channel convolution vmapped over the channels."""
  one = lambda a, b: lax.conv_general_dilated(a[..., None], b[..., None, None], (s, s), PAD,
                                              dimension_numbers=DN)[..., 0]
  return jax.vmap(one, in_axes=(3, 2), out_axes=3)(x, kernel[:, :, 0])


def shifted_nchw(x, kernel, s):
  """The shifted sum on NCHW data (as a model kept in NCHW would hold it)."""
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), (0, 0), *PAD))
  ho, wo = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
  out = None
  for dy in range(k):
    for dx in range(k):
      window = x[:, :, dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s]
      tap = window * kernel[dy, dx, 0][None, :, None, None]
      out = tap if out is None else out + tap
  return out


FORMS = {"conv": grouped_conv, "shifted": shifted, "shifted (A/A copy)": shifted,
         "shifted NCHW": shifted_nchw, "taps einsum": taps_einsum,
         "patches einsum": patches_einsum, "vmap channels": vmap_channels,
         "channels in batch": channels_in_batch}
# Seconds per call at batch 256 make these impractical there (about 30 s for one layer).
BATCH1_ONLY = ("channels in batch",)


def forms_section(rounds_small=50, rounds_large=5):
  """Checks every form against the grouped conv, then times them interleaved per layer."""
  rng = np.random.default_rng(0)
  print(f"served depthwise forms: backend {jax.default_backend()}; median us per call, and "
        f"[p10 p50 p90] of the per-round ratio to 'shifted'")
  for batch in (1, 256):
    names = [n for n in FORMS if batch == 1 or n not in BATCH1_ONLY]
    print(f"\nbatch {batch:<9}" + "".join(f"{n:>25}" for n in names))
    for size, c, s in LAYERS:
      x = jnp.asarray(rng.normal(size=(batch, size, size, c)), jnp.float32)
      kernel = jnp.asarray(rng.normal(size=(3, 3, 1, c)), jnp.float32)
      want = np.asarray(grouped_conv(x, kernel, s))
      calls = []
      for name in names:
        fn = jax.jit(FORMS[name], static_argnums=2)
        arg = jnp.transpose(x, (0, 3, 1, 2)) if name == "shifted NCHW" else x
        got = np.asarray(fn(arg, kernel, s))
        got = np.transpose(got, (0, 2, 3, 1)) if name == "shifted NCHW" else got
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
        calls.append((lambda a, b, fn=fn, s=s: fn(a, b, s), (arg, kernel)))
      times = training.interleaved_latency(calls, rounds=rounds_small if batch == 1
                                           else rounds_large)
      ref = times[:, names.index("shifted")]
      cells = []
      for k in range(len(names)):
        lo, mid, hi = np.percentile(times[:, k] / ref, [10, 50, 90])
        cells.append(f"{1e6 * np.median(times[:, k]):.0f} [{lo:.2f} {mid:.2f} {hi:.2f}]")
      print(f"{size:>2}x{size:<2} c{c:<3} s{s} " + "".join(f"{cell:>25}" for cell in cells))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--section", choices=("train", "forms", "both"), default="both")
  args = parser.parse_args()
  if args.section in ("train", "both"):
    train_section()
  if args.section in ("forms", "both"):
    forms_section()


if __name__ == "__main__":
  main()
