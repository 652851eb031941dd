"""The README's Python example runs as written, on a small model the tests trained."""

import re

from conftest import ROOT


def readme_example():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- python-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its marked Python example"
    return m.group(1)


def test_the_readme_example_runs(cli_run, capsys):
    code = readme_example()
    assert '"runs/demo"' in code
    scope = {}
    exec(compile(code.replace('"runs/demo"', repr(str(cli_run))), "README.md", "exec"), scope)
    # Ten classes: a probe of even a barely trained model is far above chance.
    assert scope["accuracy"] > 0.3, scope["accuracy"]
    assert scope["x"].shape == (2000, scope["model"].width)
    assert "linear probe on layer" in capsys.readouterr().out
