"""compressjax.console: config field comments, the config summary, the console's filter."""

import logging
import os
import types

from absl import logging as absl_logging

from compressjax import console

_SOURCE = '''
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  # Seeds of a sweep,
  # one run each.
  c.seeds = (0,)
  c.seed = 0
  # The link.
  c.channel = ml_collections.ConfigDict(dict(
      seq_len=64,
      # Used by the "flat" profile
      # only.
      k_factor_db=10.0,
      num_taps=4,               # taps the head regresses
      # Loss weight per task.
      weights=dict(symbols=2.0),
      snr_db=(0.0,
              30.0),            # drawn per example
  ))
  # Crops.
  c.augment = ml_collections.ConfigDict(dict(padding=2,
                                             flip=False))
  c.pipelines = ml_collections.ConfigDict()
  c.pipelines["control"] = "finetune"  # no compression
'''


def test_field_comments_take_the_lines_above_and_the_end_of_line():
  got = console.field_comments(_SOURCE)
  assert got == {
      "seeds": "Seeds of a sweep, one run each.",
      "channel": "The link.",   # a group: only the lines above, none of its fields' comments
      "channel.k_factor_db": 'Used by the "flat" profile only.',
      "channel.num_taps": "taps the head regresses",
      "channel.weights": "Loss weight per task.",
      "channel.snr_db": "drawn per example",   # on the value's last line
      "augment": "Crops.",   # and not augment.padding, which shares the line
      "pipelines.control": "no compression",
  }


def test_describe_fields_lists_every_field_with_its_value_and_comment(tmp_path):
  common = tmp_path / "common.py"
  common.write_text(_SOURCE)
  study = tmp_path / "study.py"
  study.write_text("import common\n\ndef get_config():\n  c = common.get_config()\n"
                   "  c.seed = 3  # the study's own seed\n  return c\n")
  config = {"seeds": (0,), "seed": 3,
            "channel": {"seq_len": 64, "k_factor_db": 10.0, "num_taps": 4,
                        "weights": {"symbols": 2.0}},
            "pipelines": {"control": "finetune"}}
  lines = console.describe_fields(config, str(study)).splitlines()
  assert "seeds = (0,)  # Seeds of a sweep, one run each." in lines
  assert "seed = 3  # the study's own seed" in lines   # the study file's comment wins
  assert "# channel: The link." in lines
  assert "channel.seq_len = 64" in lines               # no comment: the value alone
  assert "channel.num_taps = 4  # taps the head regresses" in lines
  assert "pipelines.control = 'finetune'  # no compression" in lines
  i = lines.index("# channel.weights: Loss weight per task.")  # a commented mapping field
  assert lines[i + 1] == "channel.weights.symbols = 2.0"


def test_summary_names_the_sizes_and_devices_not_every_field():
  devices = [types.SimpleNamespace(platform="cpu", process_index=0)] * 2
  config = {"seeds": (0, 1), "channel": {"modulation": "qam16"},
            "train": {"steps": 4, "batch_size": 16, "learning_rate": 1e-3},
            "pipelines": {"P": "prune"}}
  text = console.summary(config, config_file="experiments/x.py:tiny", workdir="runs/x",
                         devices=devices, log_file="runs/x/log.txt")
  assert "study wireless: experiments/x.py:tiny -> runs/x" in text
  assert "2 x cpu" in text and "seeds=(0, 1)" in text and "train.steps=4" in text
  assert "train.batch_size=16" in text and "P=prune" in text and "runs/x/log.txt" in text
  assert "qam16" not in text and "learning_rate" not in text
  assert len(text.splitlines()) <= 6


def _record(path: str, level: int, msg: str = "message", **extra) -> logging.LogRecord:
  record = logging.LogRecord("absl", level, path, 1, msg, None, None)
  record.__dict__.update(extra)
  return record


def test_console_keeps_own_lines_and_warnings_and_the_file_takes_all(tmp_path):
  own = os.path.join(os.path.dirname(console.__file__), "training", "loop.py")
  other = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  handler = absl_logging.get_absl_handler()
  root = logging.getLogger()
  try:
    console.quiet_console()
    assert handler.filter(_record(own, logging.INFO))
    assert not handler.filter(_record(other, logging.INFO))
    assert handler.filter(_record(other, logging.WARNING))
    assert not handler.filter(_record(own, logging.INFO, console=False))
    root.handle(_record(other, logging.INFO, msg="before the file"))  # held until then
    path = console.log_to_workdir(str(tmp_path / "w"))
    assert path == str(tmp_path / "w" / "log.txt")
    root.handle(_record(other, logging.INFO, msg="after"))
    logged = open(path).read()
    assert "before the file" in logged and "after" in logged
    console.quiet_console(verbose=True)
    console.log_to_workdir(str(tmp_path / "w"))               # replaces, never stacks
    assert handler.filter(_record(other, logging.INFO))
    assert sum(isinstance(h, console._LogFile) for h in root.handlers) == 1
    assert not any(isinstance(h, console._Held) for h in root.handlers)
  finally:
    for h in [h for h in root.handlers if isinstance(h, (console._LogFile, console._Held))]:
      root.removeHandler(h)
      h.close()
    for f in [f for f in handler.filters if isinstance(f, console._OwnLines)]:
      handler.removeFilter(f)
