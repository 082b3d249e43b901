"""Train-step time of MobileNetV2 with the grouped-conv vs the shifted-sum depthwise conv.

Run: python bench/mobilenet_depthwise.py. Both variants share parameters and compute the same
function (tests/models/test_mobilenet_v2.py); this measures only speed, on the default backend.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compressjax.models import MobileNetV2

BATCH, SIZE, WIDTH, ROUNDS, REPS = 32, 16, 0.25, 5, 2


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


def main():
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
  print(f"backend {jax.default_backend()}, batch {BATCH}, {SIZE}x{SIZE}, width {WIDTH}")
  print(f"{'variant':<20} {'median ms/step':>15}")
  for name, m in med.items():
    print(f"{name:<20} {1e3 * m:>15.1f}")
  print(f"A/A ratio: {med['shifted (A/A copy)'] / med['shifted']:.2f}")
  print(f"ratio: {med['conv'] / med['shifted']:.2f}")


if __name__ == "__main__":
  main()
