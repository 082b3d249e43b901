"""Knowledge-distillation losses: logits (Hinton), features (FitNets hints), attention maps.

All losses are pure functions of plain arrays, usable inside any jitted train step, and return
unreduced per-example values (the caller averages, with its own mask). The teacher's inputs go
through ``lax.stop_gradient``, so running the teacher inside the same jitted step never trains it.

Models expose features and attention maps with Flax ``sow`` (for example
``intermediates/.../attention`` of shape [B, H, N, N] and ``features`` [B, N, d]); pass the
arrays from the returned ``intermediates`` collection here.

Argument checks use only static facts (shapes, and hyperparameters when they are Python
numbers), so they run once at trace time and cost nothing inside ``jit``. A traced ``alpha`` or
``temperature`` (for example under ``jax.vmap`` over a sweep) is accepted unchecked.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax


def _concrete(x: Any) -> float | None:
  """Returns ``x`` as a Python float when it is concrete, else ``None`` (a tracer)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _check_hyper(temperature: Any, alpha: Any) -> None:
  t = _concrete(temperature)
  if t is not None and not t > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  a = _concrete(alpha)
  if a is not None and not 0.0 <= a <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def soft_kl(student_logits: chex.Array, teacher_logits: chex.Array,
            temperature: float = 1.0) -> chex.Array:
  """KL(softmax(t / T) || softmax(s / T)) over the last axis, without the T^2 factor.

  Classes where the teacher's probability is exactly zero (for example logits of ``-inf``)
  contribute zero, as in the limit ``p log p -> 0``.

  Args:
    student_logits: [..., C].
    teacher_logits: [..., C], same shape (not stop-gradiented here).
    temperature: softening temperature T > 0.

  Returns:
    The per-position divergence, shape [...].
  """
  log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  pt = jnp.exp(log_pt)
  terms = jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0)
  return jnp.sum(terms, axis=-1)


def kd_loss(student_logits: chex.Array, teacher_logits: chex.Array,
            labels: chex.Array | None, temperature: float = 4.0, alpha: float = 0.3,
            mask: chex.Array | None = None) -> chex.Array:
  """Hinton distillation loss, unreduced: one value per example (or per position).

  ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``,
  from Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". The T^2
  factor keeps the soft term's gradient, ``T * (softmax(s/T) - softmax(t/T))``, of the same
  order as T grows (it tends to ``(s - t - mean) / C``). The teacher logits are wrapped in
  ``stop_gradient``.

  Args:
    student_logits: [..., C] float logits, for example [B, C] (classification) or [B, L, C]
      (per-symbol detection).
    teacher_logits: [..., C], the same shape.
    labels: integer class indices of shape [...]; may be ``None`` only when ``alpha == 1``
      (pure distillation).
    temperature: softening temperature T > 0.
    alpha: weight of the distillation term, in [0, 1]; 0 is plain cross-entropy.
    mask: optional bool of shape [...] (or broadcastable to it); masked-out positions give 0.
      The caller averages with the same mask (e.g. ``sum(loss) / sum(mask)``).

  Returns:
    Loss of shape [...] (the leading axes of the logits), float32 or the logits' dtype.

  Raises:
    ValueError: on temperature <= 0, alpha outside [0, 1], mismatched shapes, non-integer
      labels, or ``labels=None`` with alpha < 1.
  """
  _check_hyper(temperature, alpha)
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s_shape) < 1:
    raise ValueError(f"student_logits must have a class axis, got shape {s_shape}")
  if s_shape != t_shape:
    raise ValueError(f"teacher_logits must have the student_logits shape {s_shape}, "
                     f"got {t_shape}")
  lead = s_shape[:-1]
  if labels is None:
    a = _concrete(alpha)
    if a is None or a != 1.0:
      raise ValueError(f"labels may be None only when alpha == 1, got alpha={alpha}")
  else:
    if jnp.shape(labels) != lead:
      raise ValueError(f"labels must have shape {lead} (the logits without the class axis), "
                       f"got {jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      raise ValueError(f"labels must be integer class indices, got dtype "
                       f"{jnp.result_type(labels)}")
  if mask is not None:
    try:
      jnp.broadcast_shapes(jnp.shape(mask), lead)
    except ValueError:
      raise ValueError(f"mask must broadcast to {lead}, got shape {jnp.shape(mask)}") from None

  teacher_logits = lax.stop_gradient(teacher_logits)
  soft = temperature**2 * soft_kl(student_logits, teacher_logits, temperature)
  if labels is None:
    loss = soft
  else:
    hard = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
    loss = (1.0 - alpha) * hard + alpha * soft
  if mask is not None:
    loss = jnp.where(mask, loss, 0.0)
  return loss


def init_projection(key: chex.PRNGKey, d_student: int, d_teacher: int) -> dict[str, chex.Array]:
  """Parameters of the linear hint regressor, student width -> teacher width (FitNets).

  The projection is trained together with the student: keep it in the student's trainable tree
  (for example ``{"model": params, "proj": proj}``) and drop it after distillation.

  Args:
    key: PRNG key.
    d_student: student feature width.
    d_teacher: teacher feature width.

  Returns:
    ``{"kernel": [d_student, d_teacher]`` (LeCun normal), ``"bias": [d_teacher]`` (zeros)}.
  """
  for name, d in (("d_student", d_student), ("d_teacher", d_teacher)):
    if not isinstance(d, int) or d < 1:
      raise ValueError(f"{name} must be a positive int, got {d!r}")
  kernel = jax.nn.initializers.lecun_normal()(key, (d_student, d_teacher), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((d_teacher,), jnp.float32)}


def apply_projection(projection: dict[str, chex.Array], feat: chex.Array) -> chex.Array:
  """Maps student features [..., d_student] to [..., d_teacher] with the hint regressor."""
  return feat @ projection["kernel"] + projection["bias"]


def hint_loss(student_feat: chex.Array, teacher_feat: chex.Array,
              projection: dict[str, chex.Array] | None = None) -> chex.Array:
  """FitNets hint loss: mean squared error over the feature axis, unreduced.

  Romero et al. (2015), "FitNets: Hints for Thin Deep Nets": the student's (guided) feature is
  mapped by a learned regressor to the teacher's (hint) width and matched in L2. Here the
  regressor is linear (`init_projection`); it is needed only when the widths differ.

  Args:
    student_feat: [..., d_student], e.g. [B, d] or [B, N, d].
    teacher_feat: [..., d_teacher] with the same leading shape (stop-gradiented).
    projection: parameters from `init_projection`, or ``None`` when the widths are equal.

  Returns:
    Mean over the last axis of the squared difference, shape [...] (per example, or per token
    for [B, N, d]; the caller averages).

  Raises:
    ValueError: on mismatched leading shapes, or widths that differ with no projection, or a
      projection of the wrong shape.
  """
  s_shape, t_shape = jnp.shape(student_feat), jnp.shape(teacher_feat)
  if len(s_shape) < 1 or s_shape[:-1] != t_shape[:-1]:
    raise ValueError(f"teacher_feat must have the student_feat leading shape {s_shape[:-1]}, "
                     f"got teacher_feat shape {t_shape}")
  if projection is None:
    if s_shape[-1] != t_shape[-1]:
      raise ValueError(f"projection is required when widths differ: student {s_shape[-1]}, "
                       f"teacher {t_shape[-1]} (see init_projection)")
  else:
    want = (s_shape[-1], t_shape[-1])
    if jnp.shape(projection["kernel"]) != want:
      raise ValueError(f"projection kernel must have shape {want}, "
                       f"got {jnp.shape(projection['kernel'])}")
    student_feat = apply_projection(projection, student_feat)
  teacher_feat = lax.stop_gradient(teacher_feat)
  return jnp.mean(jnp.square(student_feat - teacher_feat), axis=-1)


def _normalized_maps(attn: chex.Array, eps: float) -> chex.Array:
  flat = attn.reshape(attn.shape[:2] + (-1,))
  norm = jnp.linalg.norm(flat, axis=-1, keepdims=True)
  return flat / jnp.maximum(norm, eps)


def attention_transfer_loss(student_attn: chex.Array, teacher_attn: chex.Array,
                            eps: float = 1e-12) -> chex.Array:
  """Attention transfer between attention maps, per example.

  Zagoruyko & Komodakis (2017), "Paying More Attention to Attention": each map is flattened and
  divided by its L2 norm, and the loss is the squared L2 distance between the normalized
  student and teacher maps (squared, as in the authors' code, so the gradient exists at zero).
  Here the maps are transformer attention weights rather than activation-based spatial maps.
  When the head counts differ, both sides are averaged over heads to one map per example;
  otherwise heads are matched one to one and the distance is averaged over heads.

  Args:
    student_attn: [B, Hs, N, N] attention weights.
    teacher_attn: [B, Ht, N, N] (stop-gradiented).
    eps: floor on the norm, so an all-zero map normalizes to zero rather than NaN.

  Returns:
    Loss of shape [B].

  Raises:
    ValueError: when the inputs are not 4-D or their batch or map shapes differ.
  """
  s_shape, t_shape = jnp.shape(student_attn), jnp.shape(teacher_attn)
  if len(s_shape) != 4:
    raise ValueError(f"student_attn must have shape [B, H, N, N], got {s_shape}")
  if len(t_shape) != 4 or t_shape[0] != s_shape[0] or t_shape[2:] != s_shape[2:]:
    raise ValueError(f"teacher_attn must have shape [{s_shape[0]}, H, {s_shape[2]}, "
                     f"{s_shape[3]}] to match student_attn, got {t_shape}")
  teacher_attn = lax.stop_gradient(teacher_attn)
  if s_shape[1] != t_shape[1]:
    student_attn = jnp.mean(student_attn, axis=1, keepdims=True)
    teacher_attn = jnp.mean(teacher_attn, axis=1, keepdims=True)
  diff = _normalized_maps(student_attn, eps) - _normalized_maps(teacher_attn, eps)
  return jnp.mean(jnp.sum(jnp.square(diff), axis=-1), axis=-1)
