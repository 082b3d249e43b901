r"""Runs a compressjax study: ``python launch.py [--config=experiments/<study>.py] [--workdir=DIR]``.

With no flags it runs the embedded default, ``experiments/sweep.py`` at CPU size, in
``runs/default``. Override any config field on the command line, for example
``--config.prune.sparsity=0.8`` or ``--config=experiments/prune.py:full``.

It uses every device JAX finds (``--config.train.num_devices`` to limit it), starts
JAX's distributed runtime on a multi-host launch (``--distributed``), and resumes an
interrupted run from its checkpoints when given the same ``--workdir``.

The console shows a short summary, the progress lines, one line per finished stage and
the results table; the full log (the whole config, orbax's and absl's messages) goes to
``WORKDIR/log.txt``, and to the console too with ``--verbose`` (or ``--verbosity=1``).
``--config_help`` lists every field of the config with its value and comment, and exits.
"""

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # so config files can `from experiments import common`

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "experiments", "sweep.py"),
    "Study config file (a path, optionally with ':size', e.g. ':full').", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("runs", "default"),
                               "Directory for checkpoints, metrics.json, results.md and plots.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host runs: 'auto' starts jax.distributed when a SLURM, Open MPI, Cloud TPU pod "
    "or JAX_COORDINATOR_ADDRESS launch is found; 'on' always; 'off' never.")
_CONFIG_HELP = flags.DEFINE_bool(
    "config_help", False,
    "Print every field of --config with its value and comment, then exit (runs nothing).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the full log on the console too (it always goes to WORKDIR/log.txt)")


def _check_workdir(path: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise app.UsageError(f"--workdir must be a directory, got the file {path!r}")
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.access(parent, os.W_OK):
    raise app.UsageError(f"--workdir parent {parent!r} is not writable")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  from compressjax import console  # pylint: disable=g-import-not-at-top
  if _CONFIG_HELP.value:
    print(f"{config_file}: every field, its value and comment (override one with "
          f"--config.<field>=<value>)\n")
    print(console.describe_fields(config.to_dict(), config_file.split(":", 1)[0]))
    return
  # Before JAX logs anything: its messages, orbax's and absl's go to WORKDIR/log.txt only.
  console.quiet_console(verbose=_VERBOSE.value or logging.get_verbosity() >= logging.DEBUG,
                        sources=[__file__])
  from compressjax.studies import STUDIES  # pylint: disable=g-import-not-at-top
  study = config.get("study")
  if study not in STUDIES:
    raise app.UsageError(f"bad config: study must be one of {tuple(STUDIES)}, got {study!r}")
  _check_workdir(_WORKDIR.value)
  # Before anything touches a device: every host then sees every device.
  from compressjax.training import parallel  # pylint: disable=g-import-not-at-top
  try:
    parallel.initialize(_DISTRIBUTED.value)
  except ValueError as e:
    raise app.UsageError(f"bad launch environment: {e}") from None
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)  # one log, from process 0
  pipeline = importlib.import_module(STUDIES[study])
  try:
    pipeline.validate(config)  # every field, before any device work or file is written
  except ValueError as e:
    raise app.UsageError(f"bad config: {e}") from None
  if parallel.is_main_process():
    import jax  # pylint: disable=g-import-not-at-top
    log_file = console.log_to_workdir(_WORKDIR.value)
    logging.info("%s", console.summary(config.to_dict(), config_file=config_file,
                                       workdir=_WORKDIR.value, devices=jax.devices(),
                                       log_file=log_file))
    logging.info("config:\n%s", config, extra={"console": False})  # log.txt only
  pipeline.run(config, _WORKDIR.value)
  if parallel.is_main_process():
    print(open(os.path.join(_WORKDIR.value, "results.md")).read())


if __name__ == "__main__":
  app.run(main)
