"""Quantization: fake quantization with straight-through gradients, a QAT optax wrapper,
activation quantization, post-training quantization, a packed export with exact sizes and its
files (`save`, `load_file`), all on the grid that ``Spec.grid`` names (`GRIDS`,
`register_grid`). `wrap`, `quantize_tree` and `export` also take a per-path spec
(`PerPath`: ``path -> Spec | int | None``) for per-layer precision."""

from compressjax.quantization.activations import LAYER_TYPES
from compressjax.quantization.activations import layer_path
from compressjax.quantization.activations import per_token_grid
from compressjax.quantization.activations import quantize_activations
from compressjax.quantization.activations import record_inputs
from compressjax.quantization.calibration import RANGE_METHODS
from compressjax.quantization.calibration import calibrate
from compressjax.quantization.calibration import minmax
from compressjax.quantization.calibration import mse
from compressjax.quantization.calibration import percentile
from compressjax.quantization.calibration import pow2
from compressjax.quantization.calibration import ptq
from compressjax.quantization.calibration import with_method
from compressjax.quantization.entropy import decode
from compressjax.quantization.entropy import encode
from compressjax.quantization.entropy import encoded_nbytes
from compressjax.quantization.export import Packed
from compressjax.quantization.export import PackedTensor
from compressjax.quantization.export import SparseTensor
from compressjax.quantization.export import cast
from compressjax.quantization.export import detect_spec
from compressjax.quantization.export import export
from compressjax.quantization.export import header_bytes
from compressjax.quantization.export import load
from compressjax.quantization.export import nbytes
from compressjax.quantization.export import pack_bits
from compressjax.quantization.export import unpack_bits
from compressjax.quantization.files import load_file
from compressjax.quantization.files import save
from compressjax.quantization.grids import CLIPPING_GRIDS
from compressjax.quantization.grids import GRIDS
from compressjax.quantization.grids import get_grid
from compressjax.quantization.grids import register_grid
from compressjax.quantization.lsq import LSQ
from compressjax.quantization.lsq import lsq
from compressjax.quantization.lsq import lsq_init
from compressjax.quantization.quantizers import GRANULARITIES
from compressjax.quantization.quantizers import Grid
from compressjax.quantization.quantizers import PerPath
from compressjax.quantization.quantizers import Spec
from compressjax.quantization.quantizers import as_spec
from compressjax.quantization.quantizers import check_spec
from compressjax.quantization.quantizers import fake_quant
from compressjax.quantization.quantizers import from_codes
from compressjax.quantization.quantizers import grid_from_range
from compressjax.quantization.quantizers import grid_from_scale
from compressjax.quantization.quantizers import grid_of
from compressjax.quantization.quantizers import grid_range
from compressjax.quantization.quantizers import is_per_path
from compressjax.quantization.quantizers import minmax_range
from compressjax.quantization.quantizers import quantize
from compressjax.quantization.quantizers import reduce_axes
from compressjax.quantization.quantizers import spec_at
from compressjax.quantization.quantizers import spec_fields
from compressjax.quantization.quantizers import to_codes
from compressjax.quantization.wrapper import QuantizationState
from compressjax.quantization.wrapper import exact_delta
from compressjax.quantization.wrapper import grid_of_survivors
from compressjax.quantization.wrapper import leaf_specs
from compressjax.quantization.wrapper import quantize_tree
from compressjax.quantization.wrapper import select_leaves
from compressjax.quantization.wrapper import wrap
