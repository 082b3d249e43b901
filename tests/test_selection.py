import jax.numpy as jnp
import pytest

from compressjax import selection


def _params():
  return {
      "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
      "LayerNorm_0": {"scale": jnp.ones((4,))},
      "Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))},
      "embed": {"embedding": jnp.ones((10, 4))},
  }


def test_default_selects_kernels_only():
  assert selection.selected_paths(_params()) == ["Conv_0/kernel", "Dense_0/kernel"]


def test_custom_predicate_sees_full_path():
  got = selection.selected_paths(_params(), lambda p: p.startswith("Dense_0"))
  assert got == ["Dense_0/bias", "Dense_0/kernel"]


def test_selecting_nothing_is_an_error_naming_the_transform():
  with pytest.raises(ValueError, match="pruning.wrap: `where` selects no parameter"):
    selection.check_selects_something(_params(), lambda p: False, "pruning.wrap")


def test_check_floating_names_the_transform_the_leaf_and_its_dtype():
  params = {**_params(), "count": {"kernel": jnp.zeros((2, 2), jnp.int32)}}
  selection.check_floating(params, selection.select(params, lambda p: p != "count/kernel"), "t")
  for dtype in (jnp.int32, jnp.bool_, jnp.uint8):
    params["count"]["kernel"] = jnp.zeros((2, 2), dtype)
    with pytest.raises(ValueError, match=f"t: selected leaf count/kernel must be floating .* "
                                         f"got {jnp.dtype(dtype).name}"):
      selection.check_floating(params, selection.select(params), "t")
