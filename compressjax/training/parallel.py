"""Data parallelism over every device JAX sees, on one host or many.

The train step generates its batch inside ``jit`` (`steps.make_train_step`), so data
parallelism needs no input pipeline: `shard_data_fn` puts a sharding constraint on the
batch (leading axis split over the mesh's ``"data"`` axis) and XLA's partitioner runs the
simulator's per-example work on the device that owns each example. The simulator draws
example ``i`` from the ``i``-th split of the step's key (threefry keys are partitionable),
so the same key gives the same batch on 1 device or 8, and no batch crosses the host.
Params and optimizer state are replicated (`replicate`); the gradient mean becomes an
all-reduce.

Several hosts (a TPU pod slice, GPU nodes) run the same program: `initialize` starts JAX's
distributed runtime when the launch environment asks for it, after which
``jax.devices()`` lists every host's devices and one global mesh spans them. Only
process 0 writes logs, JSON and reports (`is_main_process`); checkpoints are written by
orbax, which coordinates the processes itself.
"""

from collections.abc import Callable
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from compressjax import selection
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
# Our launcher's explicit form (JAX itself reads only the coordinator address): set all
# three on every host, the process id differing.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Clusters whose environment JAX's own detection reads (jax/_src/clusters): a SLURM job
# step, an Open MPI launch, a multi-host Cloud TPU slice.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
          "SLURM_LOCALID")
_OMPI = "OMPI_MCA_orte_hnp_uri"
_TPU_HOSTS = "TPU_WORKER_HOSTNAMES"


def cluster_environment(env: dict[str, str] | None = None) -> str | None:
  """Which multi-process launch the environment shows, or None for a single process.

  Returns ``"explicit"`` (``JAX_COORDINATOR_ADDRESS``), ``"slurm"``, ``"openmpi"`` or
  ``"tpu"`` (``TPU_WORKER_HOSTNAMES`` naming several hosts).
  """
  env = os.environ if env is None else env
  if env.get(ENV_COORDINATOR):
    return "explicit"
  if all(k in env for k in _SLURM) and env["SLURM_NTASKS"] != "1":
    return "slurm"
  if _OMPI in env:
    return "openmpi"
  if len([h for h in env.get(_TPU_HOSTS, "").split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def initialize(mode: str = "auto") -> bool:
  """Starts ``jax.distributed`` for a multi-host run; returns whether it is running.

  Call it before anything touches a device. With ``JAX_COORDINATOR_ADDRESS`` set, the
  process count and id come from ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; on a
  SLURM, Open MPI or Cloud TPU pod launch JAX finds all three itself.

  Args:
    mode: ``"auto"`` starts it when `cluster_environment` finds a multi-process launch,
      ``"on"`` always (for a cluster the check does not know), ``"off"`` never.

  Returns:
    True when the distributed runtime is running after the call.

  Raises:
    ValueError: for an unknown ``mode`` or a half-set explicit environment.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed must be one of ('auto', 'on', 'off'), got {mode!r}")
  if jax.distributed.is_initialized():
    return True
  found = cluster_environment()
  if mode == "off" or (mode == "auto" and found is None):
    return False
  kwargs = {}
  if found == "explicit":
    env = {k: os.environ.get(k) for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
    try:
      kwargs = dict(coordinator_address=os.environ[ENV_COORDINATOR],
                    num_processes=int(env[ENV_NUM_PROCESSES]),
                    process_id=int(env[ENV_PROCESS_ID]))
    except (TypeError, ValueError):
      raise ValueError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and "
                       f"{ENV_PROCESS_ID} must be integers, got {env}") from None
  jax.distributed.initialize(**kwargs)
  logging.info("distributed (%s): process %d of %d, %d local and %d global devices",
               found or "on", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """Whether this process writes logs, JSON files and reports (process 0)."""
  return jax.process_index() == 0


def check_num_devices(num_devices: int, field: str = "num_devices") -> int:
  """Resolves ``num_devices`` (0 = all of ``jax.devices()``) and checks it is available."""
  available = jax.device_count()
  if (not isinstance(num_devices, int) or isinstance(num_devices, bool)
      or not 0 <= num_devices <= available):
    raise ValueError(f"{field} must be an int in [0, {available}] (0 = every device), "
                     f"got {num_devices!r}")
  return num_devices or available


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``("data",)`` mesh over the first ``num_devices`` devices (0 = all of them).

  The axis type is ``Auto`` (XLA's partitioner propagates the shardings), the classic
  data-parallel setting.
  """
  n = check_num_devices(num_devices)
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array of ``tree`` to every device of ``mesh`` (params, opt state, keys).

  Every process must pass the same values (they do: each derives them from the seed).
  """
  sharding = replicated(mesh)

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def check_batch_size(batch_size: int, num_devices: int, field: str = "batch_size") -> None:
  """Raises unless ``batch_size`` splits evenly over ``num_devices``."""
  if batch_size % num_devices:
    raise ValueError(f"{field} must be a multiple of the {num_devices} devices in use, "
                     f"got {batch_size}")


def shared_leaf(path: str) -> bool:
  """The default of `shard_batch`: the simulator's ``Batch.pilot_mask`` [L] is shared."""
  return path.split("/")[-1] == "pilot_mask"


def shard_batch(batches: Any, mesh: Mesh, batch_size: int,
                shared: Callable[[str], bool] = shared_leaf) -> Any:
  """Constrains the batch leaves to be split over ``"data"`` along their leading axis.

  A leaf is split when its leading axis has ``batch_size`` entries and ``shared`` (a
  predicate on its '/'-joined path) is False; other leaves are replicated. (The path
  test matters when a shared leaf happens to be ``batch_size`` long: split, it would be
  all-gathered back in every step.) Only valid inside ``jit``; values are unchanged,
  only where they are computed.
  """
  data, rep = NamedSharding(mesh, P(DATA)), replicated(mesh)

  def constrain(path, x):
    split = x.ndim >= 1 and x.shape[0] == batch_size and not shared(selection.path_str(path))
    return jax.lax.with_sharding_constraint(x, data if split else rep)

  return jax.tree_util.tree_map_with_path(constrain, batches)


def shard_data_fn(data_fn: Callable[..., Any], mesh: Mesh, batch_size: int,
                  shared: Callable[[str], bool] = shared_leaf) -> Callable[..., Any]:
  """``data_fn`` whose batches are generated split over the mesh (see `shard_batch`).

  Args:
    data_fn: ``data_fn(key, step, data) -> batches`` (`steps.make_train_step`) whose
      batch leaves lead with ``batch_size``.
    mesh: the mesh from `make_mesh`.
    batch_size: the leading size of the batch leaves; a multiple of the mesh size.
    shared: which leaves (by '/'-joined path) are shared by the whole batch.

  Returns:
    The wrapped function, for `steps.make_train_step`.
  """
  check_batch_size(batch_size, mesh.size)
  return lambda key, step=None, data=None: shard_batch(data_fn(key, step, data), mesh,
                                                       batch_size, shared)


def safe_in_flight(mesh: Mesh) -> int:
  """Steps a loop may keep in flight on ``mesh`` (`loop.train`'s ``max_in_flight``).

  XLA:CPU runs the devices of a forced multi-device host on one thread pool: with steps
  of several queued, threads blocked in a later step's collective can starve the devices
  still in an earlier one, a deadlock (seen on a 2-core machine with 8 devices; the
  runtime aborts after 40 s). One step at a time avoids it there; elsewhere 2 keep the
  dispatch overlapped.
  """
  cpu_multi = mesh.size > 1 and all(d.platform == "cpu" for d in mesh.devices.flat)
  return 1 if cpu_multi else 2
