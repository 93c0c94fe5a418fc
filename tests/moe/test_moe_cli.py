"""``mergesmith moe``: the options, exit codes and guarantees of ``mergesmith merge``."""

from __future__ import annotations

from moe_helpers import moe_config, write_yaml
from mergesmith.cli import main


def test_dry_run_then_build_then_overwrite(experts, tmp_path, capsys):
    base, fts = experts("llama", 2)
    cfg = write_yaml(tmp_path / "moe.yml", moe_config(base, fts, gate_mode="cheap_embed"))
    out = tmp_path / "moe"
    assert main(["moe", str(cfg), str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "block_sparse_moe.experts.1.w3.weight" in printed and "dry run: nothing written" in printed
    assert not out.exists()
    assert main(["moe", str(cfg), str(out), "--no-progress", "--out-shard-size", "10KB"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "config.json").is_file()
    assert (out / "mergesmith_moe.yml").read_text() == cfg.read_text()
    assert "MixtralForCausalLM of 2 experts, 2 per token" in (out / "README.md").read_text()
    assert main(["moe", str(cfg), str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["moe", str(cfg), str(out), "--no-progress", "--overwrite", "--device", "cpu"]) == 0


def test_bad_input_exits_2_with_every_problem(experts, tmp_path, capsys):
    base, fts = experts("llama", 2)
    cfg = write_yaml(tmp_path / "moe.yml", moe_config(base, fts, gate_mode="hiddn", experts_per_token=5))
    assert main(["moe", str(cfg), str(tmp_path / "out"), "--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "gate_mode = 'hiddn'" in err and "experts_per_token = 5" in err
    assert "--device 'nonsense'" in err
    assert main(["moe", str(tmp_path / "absent.yml"), str(tmp_path / "out")]) == 2
