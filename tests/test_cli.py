import subprocess
import sys

from mergesmith.cli import main
from mergesmith.methods import all_methods


def test_methods_lists_every_method_with_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, spec in all_methods().items():
        assert out.count(f"\n{name}  (") + out.startswith(f"{name}  (") == 1, name
        for p in spec.params:
            assert f"    {p.name}: " in out
    assert "density: float, per model, default 1.0, range (0, 1]" in out


def test_methods_unknown_name_is_exit_2(capsys):
    assert main(["methods", "tie"]) == 2
    assert "ties" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mergesmith", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("merge", "methods", "evaluate", "compete", "score", "zoo"):
        assert command in out.stdout
