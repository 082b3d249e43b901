"""On-device preprocessing: per-channel normalization, random crop with padding, random flip.

The standard CIFAR augmentation (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, Sec. 4.2): pad 4 pixels of zeros on each side, take a random crop of the original
size, flip left-right with probability 1/2. Each random op is a pure function of one key and
one image; `augment_batch` vmaps it over ``jax.random.split(key, batch)``, so the same key gives
the same batch, and everything jits. Augment raw uint8 pixels first, then `normalize`, so the
padding is black as in torchvision's ``RandomCrop(32, padding=4)``.
"""

import chex
import jax
import jax.numpy as jnp


def normalize(images: chex.Array, mean: chex.Array, std: chex.Array) -> chex.Array:
  """Maps uint8 pixels to ``(x / 255 - mean) / std`` per channel, in float32.

  Args:
    images: uint8 (or float on the 0..255 scale) ``[..., channels]``.
    mean: ``[channels]`` mean on the [0, 1] scale (`VisionData.mean`).
    std: ``[channels]`` standard deviation on the [0, 1] scale (`VisionData.std`).

  Returns:
    float32 array of the shape of ``images``.
  """
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def crop(image: chex.Array, dy: chex.Array, dx: chex.Array, padding: int) -> chex.Array:
  """Zero-pads an HWC image by ``padding`` and cuts the original size at offset (dy, dx).

  Args:
    image: ``[height, width, channels]``.
    dy: row offset in the padded image, in ``[0, 2 * padding]`` (may be traced).
    dx: column offset in the padded image, in ``[0, 2 * padding]`` (may be traced).
    padding: pixels of zeros added on each side (static).

  Returns:
    An image of the shape of ``image``; ``dy = dx = padding`` returns it unchanged.
  """
  h, w, c = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))


def flip_lr(image: chex.Array) -> chex.Array:
  """Mirrors an HWC image left-right."""
  return image[:, ::-1, :]


def random_crop(key: chex.PRNGKey, image: chex.Array, padding: int = 4) -> chex.Array:
  """`crop` at offsets drawn uniformly from ``[0, 2 * padding]`` in each direction."""
  dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return crop(image, dy, dx, padding)


def random_flip(key: chex.PRNGKey, image: chex.Array) -> chex.Array:
  """`flip_lr` with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), flip_lr(image), image)


def augment_image(key: chex.PRNGKey, image: chex.Array, padding: int = 4,
            flip: bool = True) -> chex.Array:
  """Random crop with zero padding, then (optionally) a random left-right flip, of one image.

  Args:
    key: PRNG key for this image.
    image: ``[height, width, channels]``.
    padding: crop padding in pixels (static); 0 disables the crop.
    flip: whether to flip at random (static).

  Returns:
    The augmented image, same shape and dtype.
  """
  k_crop, k_flip = jax.random.split(key)
  if padding:
    image = random_crop(k_crop, image, padding)
  if flip:
    image = random_flip(k_flip, image)
  return image


def augment_batch(key: chex.PRNGKey, images: chex.Array, padding: int = 4,
                  flip: bool = True) -> chex.Array:
  """`augment_image` vmapped over a batch, one key per image from ``jax.random.split(key, batch)``.

  Args:
    key: PRNG key for the batch.
    images: ``[batch, height, width, channels]``.
    padding: crop padding in pixels (static, >= 0).
    flip: whether to flip at random (static).

  Returns:
    The augmented batch, same shape and dtype.

  Raises:
    ValueError: if ``images`` is not 4-D or ``padding`` is negative (checked at trace time).
  """
  if images.ndim != 4:
    raise ValueError(f"images must be NHWC with 4 dimensions, got shape {images.shape}")
  if not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be an int >= 0, got {padding!r}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: augment_image(k, x, padding, flip))(keys, images)
