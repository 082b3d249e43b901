"""Every Python code block of README.md runs as written (in a temporary directory).

Blocks fenced as ```python are executed, each in a fresh namespace; other fences (```bash
for the set-up and launch commands) are left to the CI script that runs them.
"""

import os
import re
import warnings

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(text: str) -> list[tuple[str, str]]:
  """(language, code) of every fenced block, in order."""
  return [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def _python_blocks() -> list[tuple[int, str]]:
  with open(README) as f:
    text = f.read()
  out = []
  for lang, code in _blocks(text):
    if lang == "python":
      line = text[:text.index(code)].count("\n") + 1
      out.append((line, code))
  return out


def test_the_extractor_finds_python_blocks_and_skips_bash():
  text = "a\n```bash\npip install x\n```\nb\n```python\nx = 1\n```\n```\nplain\n```\n"
  assert _blocks(text) == [("bash", "pip install x\n"), ("python", "x = 1\n"), ("", "plain\n")]
  assert len(_python_blocks()) >= 2  # the library tour and "Bring your own Flax model"


@pytest.mark.slow  # seconds each: the simulator, receivers and a CNN compile
@pytest.mark.parametrize("line, code", _python_blocks(), ids=lambda v: f"line{v}"
                         if isinstance(v, int) else "")
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # e.g. a ChannelConfig field that is ignored
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # pylint: disable=exec-used
  assert len(namespace) > 2   # it ran to its end: every name the block binds is there
