"""What ``launch.py`` shows a user: a quiet console, the full log in a file, the config fields.

`quiet_console` keeps the console to the run's own lines (its summary, the progress lines
of `training.train`, one line per finished stage, warnings) and `log_to_workdir` sends
everything, orbax's and absl's INFO lines included, to ``WORKDIR/log.txt``. `summary` is
the few lines that say how big a run is; `describe_fields` lists every field of a config
with its value and the comment that the config file writes beside or above it.
"""

import ast
import collections
import io
import logging
import os
import tokenize
from typing import Any, Iterable, Mapping, Sequence

from absl import logging as absl_logging

LOG_FILE = "log.txt"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Leaf names that say how long a run takes; `summary` shows these fields.
_SIZE_FIELDS = ("steps", "batch_size", "frames_per_point", "num_devices", "vmap_seeds")


class _OwnLines(logging.Filter):
  """Passes warnings and worse from anyone, lower levels only from ``sources``."""

  def __init__(self, sources: Sequence[str]):
    super().__init__()
    self._sources = tuple(sources)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    if not getattr(record, "console", True):  # logged with extra={"console": False}
      return False
    return os.path.abspath(record.pathname).startswith(self._sources)


class _LogFile(logging.FileHandler):
  """The handler of ``WORKDIR/log.txt`` (a type of its own, to find and replace it)."""


class _Held(logging.Handler):
  """Holds the records logged before the log file exists (the newest 10,000)."""

  def __init__(self):
    super().__init__()
    self.records = collections.deque(maxlen=10_000)

  def emit(self, record: logging.LogRecord) -> None:
    self.records.append(record)


def _remove_handlers(kind: type) -> None:
  root = logging.getLogger()
  for h in [h for h in root.handlers if isinstance(h, kind)]:
    root.removeHandler(h)
    h.close()


def quiet_console(*, verbose: bool = False, sources: Iterable[str] = ()) -> None:
  """Keeps the console to this package's lines; holds every record for `log_to_workdir`.

  Under ``absl.app.run`` Python's root logger carries absl's handler (the console), and
  orbax, absl and JAX all log through the root logger. A filter on absl's handler keeps,
  below WARNING, only the records logged from this package (and from ``sources``),
  unless ``verbose``; a record logged with ``extra={"console": False}`` stays off the
  console. Call it first: the records before the run's directory exists (JAX's backend
  messages) are held until `log_to_workdir` writes them to the file.

  Args:
    verbose: keep every record on the console too.
    sources: more files or directories whose INFO lines belong on the console (the
      launcher's own file).
  """
  own = [_PACKAGE] + [os.path.abspath(s) + ("" if os.path.isfile(s) else os.sep)
                      for s in sources]
  console = absl_logging.get_absl_handler()
  for f in [f for f in console.filters if isinstance(f, _OwnLines)]:
    console.removeFilter(f)  # a second call replaces the first one's, never stacks
  if not verbose:
    console.addFilter(_OwnLines(own))
  _remove_handlers(_Held)
  logging.getLogger().addHandler(_Held())


def log_to_workdir(workdir: str) -> str:
  """Writes the whole log, at the current verbosity, to ``workdir/log.txt``.

  The file also gets the records `quiet_console` held; it is appended to, so a resumed
  run keeps the log of the interrupted one above its own.

  Args:
    workdir: the run's directory (created if missing).

  Returns:
    The path of the log file.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOG_FILE)
  root = logging.getLogger()
  handler = _LogFile(path, encoding="utf-8")
  handler.setFormatter(absl_logging.PythonFormatter())
  for held in [h for h in root.handlers if isinstance(h, _Held)]:
    for record in held.records:
      handler.handle(record)
  _remove_handlers(_Held)
  _remove_handlers(_LogFile)  # a second call replaces the first one's file
  root.addHandler(handler)
  return path


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def summary(config: Mapping[str, Any], *, config_file: str, workdir: str,
            devices: Sequence[Any], log_file: str) -> str:
  """The few lines that say what a run is and how big: study, file, sizes, devices.

  Args:
    config: the config as plain dicts (``ConfigDict.to_dict()``).
    config_file: the ``--config`` argument (path and optional ``:size``).
    workdir: the run's directory.
    devices: ``jax.devices()``.
    log_file: where the full log goes.

  Returns:
    Lines joined with newlines, without a trailing one.
  """
  kinds = sorted({d.platform for d in devices})
  procs = len({d.process_index for d in devices})
  sizes = [f"{k}={v}" for k, v in _flatten(config)
           if k == "seeds" or k.rsplit(".", 1)[-1] in _SIZE_FIELDS]
  lines = [f"study {config.get('study', 'wireless')}: {config_file} -> {workdir}",
           f"devices: {len(devices)} x {'/'.join(kinds)} on {procs} process(es)",
           "sizes: " + "  ".join(sizes)]
  pipelines = config.get("pipelines")
  if pipelines:
    lines.append("pipelines: " + "  ".join(f"{k}={v}" for k, v in pipelines.items()))
  lines.append(f"full log (config, library messages): {log_file}; --verbose shows it here")
  return "\n".join(lines)


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """Comment text by line, and the lines that hold only a comment."""
  text, code_lines = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER, tokenize.ENCODING):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return text, set(text) - code_lines


def _path(target: ast.expr) -> str | None:
  """``c.train.steps`` -> "train.steps", ``c.pipelines["x"]`` -> "pipelines.x"; else None."""
  parts = []
  while True:
    if isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    elif (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
          and isinstance(target.slice.value, str)):
      parts.append(target.slice.value)
      target = target.value
    elif isinstance(target, ast.Name) and parts:
      return ".".join(reversed(parts))
    else:
      return None


def _fields(value: ast.expr) -> list[tuple[str, ast.AST]]:
  """The ``name=`` keywords (or string keys) of ``ConfigDict(dict(...))``/``dict(...)``."""
  if isinstance(value, ast.Call) and value.args and not value.keywords:
    return _fields(value.args[0])  # ConfigDict(dict(...)) or ConfigDict({...})
  if isinstance(value, ast.Call):
    return [(k.arg, k) for k in value.keywords if k.arg]
  if isinstance(value, ast.Dict):
    return [(k.value, k) for k in value.keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str)]
  return []


def field_comments(source: str) -> dict[str, str]:
  """Each config field's comment in a config file's source: ``{"train.steps": "..."}``.

  A field's comment is the run of comment-only lines right above its assignment (or its
  ``name=`` keyword inside ``ConfigDict(dict(...))``) when that starts its line, and the
  comment at the end of its last line; a group assigned as a whole
  (``c.train = ConfigDict(...)``) gets the lines above it. Parsing the source (``ast`` for the fields, ``tokenize`` for the comments)
  keeps the comments where their authors write them, beside the values.

  Args:
    source: Python source of a config file.

  Returns:
    Dotted field path -> comment text (fields without a comment are left out).
  """
  text, alone = _comments(source)
  lines = source.splitlines()

  def comment(node: ast.AST, trailing: bool) -> str:
    above, line = [], node.lineno - 1
    # The lines above belong to a node that starts its line (not to ``dict(a=1`` 's a).
    starts = not lines[node.lineno - 1][:node.col_offset].strip()
    while starts and line in alone:
      above.insert(0, text[line])
      line -= 1
    end = node.end_lineno if trailing else None
    if end in text and end not in alone:
      above.append(text[end])
    return " ".join(above)

  found = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
      continue
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    for path in filter(None, map(_path, targets)):
      inner = _fields(node.value) if node.value is not None else []
      found[path] = comment(node, trailing=not inner)
      for name, kw in inner:
        found[f"{path}.{name}"] = comment(kw, trailing=True)
  return {k: v for k, v in found.items() if v}


def _sources(config_file: str) -> list[str]:
  """The config file and the modules beside it that it imports (``from experiments import
  common``), the file itself last so that its comments win."""
  with open(config_file) as f:
    source = f.read()
  here, names = os.path.dirname(os.path.abspath(config_file)), []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom):
      names += [a.name for a in node.names] + (node.module or "").split(".")
    elif isinstance(node, ast.Import):
      names += [p for a in node.names for p in a.name.split(".")]
  found = [os.path.join(here, f"{n}.py") for n in dict.fromkeys(names)]
  return [p for p in found if os.path.isfile(p)
          and not os.path.samefile(p, config_file)] + [config_file]


def describe_fields(config: Mapping[str, Any], config_file: str) -> str:
  """Every field of ``config`` with its value and its comment from the config's source.

  Args:
    config: the config as plain dicts (``ConfigDict.to_dict()``), overrides applied.
    config_file: the config file's path, without the ``:size`` suffix.

  Returns:
    One line per field (``train.steps = 30  # ...``), a ``# group: ...`` line before
    the fields of each commented group, joined with newlines.
  """
  comments = {}
  for path in _sources(config_file):
    with open(path) as f:
      comments.update(field_comments(f.read()))
  lines, shown = [], set()
  for key, value in _flatten(config):
    parts = key.split(".")
    for i in range(1, len(parts)):  # a commented group's comment, before its first field
      group = ".".join(parts[:i])
      if group in comments and group not in shown:
        lines.append(("\n" if i == 1 else "") + f"# {group}: {comments[group]}")
        shown.add(group)
    note = comments.get(key)
    lines.append(f"{key} = {value!r}" + (f"  # {note}" if note else ""))
  return "\n".join(lines).strip("\n")
