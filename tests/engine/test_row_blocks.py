"""Large tensors merged in row blocks (``MergeOptions.chunk_bytes``, ``MethodSpec.row_separable``).

Every method that declares itself row-separable must write, in row blocks, the very bytes it
writes merging each tensor whole: with per-model weights, parameter filters and layer
gradients, dtype casts, vocabularies cut or padded from the reference, and non-finite
inputs. A tiny chunk budget (a row or two per block, 1-D tensors in blocks too) makes every
boundary case happen on tiny models.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith.api import plan_merge
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor
from mergesmith.engine import MergeOptions, row_spans
from mergesmith.errors import InputError
from tiny_models import make_model

TINY_CHUNK = 100  # bytes: one row of the 64 x 16 embedding per block, 1-D tensors in blocks of a few rows
WEIGHTS = (1.0, 0.8, 1.2)
EMBED = "model.embed_tokens.weight"


def recipe(method: str, base, fts, dtype="float32", out_dtype=None, **params) -> dict:
    """A recipe of ``method`` over the base and the fine-tunes, with per-model weights and a
    gradient over the layers, on every parameter the method has."""
    per_model = {"weight": [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]}
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(fts, WEIGHTS)]
    r = {"merge_method": method, "dtype": dtype, "models": models, "parameters": params}
    if out_dtype:
        r["out_dtype"] = out_dtype
    if method == "linear":
        models.insert(0, {"model": str(base), "parameters": {"weight": 0.5}})
        models[1]["parameters"] = per_model
    elif method == "passthrough":
        r["models"] = [{"model": str(fts[0]), "parameters": {"scale": 0.7}}]
    else:
        r["base_model"] = str(base)
        if method == "nearswap":
            r["models"] = [{"model": str(fts[0])}]
            r["parameters"] = {"t": 0.06}
        elif method == "ram":
            r["models"] = [{"model": m["model"]} for m in models]
            r["parameters"] = {"epsilon": 0.04}
        else:
            models[0]["parameters"] = per_model
            r["parameters"].setdefault("lambda", [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.7}])
    return r


def merged_bytes(r: dict, out, chunk_bytes: int, **options) -> dict[str, bytes]:
    mergesmith.merge(r, out, progress=False, chunk_bytes=chunk_bytes, **options)
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def assert_blocks_equal_whole(r: dict, tmp_path, **options) -> None:
    whole = merged_bytes(r, tmp_path / "whole", 0, **options)
    blocks = merged_bytes(r, tmp_path / "blocks", TINY_CHUNK, **options)
    assert whole.keys() == blocks.keys()
    for name in whole:
        assert blocks[name] == whole[name], f"{name}: the row-block merge differs from the whole one"


SEPARABLE = ["linear", "task_arithmetic", "consensus_ta", "nearswap", "passthrough", "ram",
             "tsv_m", "iso_c", "iso_cts", "star", "cart", "wudi"]


@pytest.mark.parametrize("method", SEPARABLE)
def test_row_blocks_write_the_bytes_of_the_whole_merge(method, model_family, tmp_path):
    base, fts = model_family("llama", 3)
    # WUDI's matrices are not what is compared here (they stay whole): a few steps suffice.
    r = recipe(method, base, fts, **({"iterations": 5} if method == "wudi" else {}))
    plan = plan_merge(r)
    try:
        blocked = {t.name for t in plan.tensors if row_spans(plan, t, TINY_CHUNK) != [None]}
    finally:
        for m in plan.models:
            m.checkpoint.close()
    assert EMBED in blocked  # the test exercises blocks, of 1-D tensors too (one input's are too small)
    assert ("model.norm.weight" in blocked) == (method != "passthrough")
    if method in ("tsv_m", "iso_c", "iso_cts", "star", "cart", "wudi"):  # decomposed matrices stay whole
        assert "model.layers.0.self_attn.q_proj.weight" not in blocked
    assert_blocks_equal_whole(r, tmp_path)


@pytest.mark.parametrize("method", ["task_arithmetic", "iso_c"])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_row_blocks_with_dtype_casts_and_half_precision_inputs(method, out_dtype, model_family, tmp_path):
    base, fts = model_family("llama", 3, dtype=torch.bfloat16)
    assert_blocks_equal_whole(recipe(method, base, fts, "float32", out_dtype), tmp_path)


def test_half_precision_math_is_merged_whole(model_family):
    """A bfloat16 op on the CPU rounds once in the kernels' vectorized body and after every
    step in their scalar tail, so a block boundary could change the last bit: no blocks."""
    base, fts = model_family("llama", 3)
    plan = plan_merge(recipe("task_arithmetic", base, fts, "bfloat16"))
    try:
        assert all(row_spans(plan, t, TINY_CHUNK) == [None] for t in plan.tensors)
    finally:
        for m in plan.models:
            m.checkpoint.close()


def test_row_blocks_cut_and_pad_vocabularies_as_the_whole_merge(model_family, tmp_path):
    """One model has 6 rows more (dropped), one 5 fewer (taken from the reference's rows)."""
    base, _ = model_family("llama", 3)
    longer = make_model(tmp_path / "longer", seed=7, vocab=70, base=base)
    shorter = make_model(tmp_path / "shorter", seed=8, vocab=59, base=base)
    plain = make_model(tmp_path / "plain", seed=9, base=base)
    for method in ("task_arithmetic", "linear", "tsv_m"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the vocabulary warnings, tested elsewhere
            assert_blocks_equal_whole(recipe(method, base, [longer, shorter, plain]), tmp_path / method)


def with_nonfinite(src, dst):
    """A copy of the model folder ``src`` with a NaN and an Inf in its token embedding."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[EMBED][5, 3] = float("nan")
    state[EMBED][40, 0] = float("inf")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_row_blocks_check_every_value_for_nonfinite(model_family, tmp_path):
    base, fts = model_family("llama", 3)
    damaged = with_nonfinite(fts[1], tmp_path / "damaged")
    r = recipe("task_arithmetic", base, [fts[0], damaged, fts[2]])
    whole = "damaged: tensor model.embed_tokens.weight holds 1 NaN and 1 infinite values; the checkpoint"
    with pytest.raises(InputError, match=whole):
        mergesmith.merge(r, tmp_path / "refused-whole", progress=False, chunk_bytes=0)
    # In blocks the first block holding one refuses the merge, naming its rows.
    block = "damaged: tensor model.embed_tokens.weight holds 1 NaN and 0 infinite values in rows 5..5; the"
    with pytest.raises(InputError, match=block):
        mergesmith.merge(r, tmp_path / "refused-blocks", progress=False, chunk_bytes=TINY_CHUNK)
    with pytest.warns(UserWarning) as caught:
        assert_blocks_equal_whole(r, tmp_path, allow_nonfinite=True)
    texts = [str(w.message) for w in caught]
    assert any("in rows 40..40; carried through" in t for t in texts)  # the Inf, in its own block
    assert any("values in rows 5..5 (e.g. a division" in t for t in texts)  # the output's NaN, too


def blocked_tensors(r: dict) -> dict[str, int]:
    """Each tensor of the plan that is merged in row blocks, and its number of dimensions."""
    plan = plan_merge(r)
    try:
        return {t.name: len(t.shape) for t in plan.tensors if row_spans(plan, t, TINY_CHUNK) != [None]}
    finally:
        for m in plan.models:
            m.checkpoint.close()


@pytest.mark.parametrize("method", ["ties", "dare_linear", "della", "breadcrumbs", "slerp", "model_stock",
                                    "pcb", "drm", "ramplus_tl"])
def test_methods_with_tensor_wide_statistics_are_merged_whole(method, model_family):
    """TIES ranks magnitudes over the whole tensor, DARE draws a random mask over it, slerp and
    Model Stock take norms and cosines, PCB quantiles, DRM a tie-break sign: none may be split."""
    base, fts = model_family("llama", 3)
    r = recipe("task_arithmetic", base, fts)
    r["merge_method"] = method
    r["parameters"] = {"t": 0.3} if method == "slerp" else {}
    if method == "slerp":
        r["models"] = r["models"][:1]
    for m in r["models"]:
        m["parameters"] = {} if method in ("slerp", "model_stock", "ramplus_tl") else {"weight": 1.0}
    assert blocked_tensors(r) == {}


def test_a_subspace_method_blocks_only_what_it_does_not_decompose(model_family):
    base, fts = model_family("llama", 3)
    default = blocked_tensors(recipe("tsv_m", base, fts))
    included = blocked_tensors(recipe("tsv_m", base, fts, include_embeddings=True))
    assert EMBED in default and "lm_head.weight" in default
    assert set(included) == {n for n, ndim in default.items() if ndim == 1} and set(included.values()) == {1}


def test_the_predicted_peak_counts_row_blocks(model_family):
    """With every tensor in blocks of at most C bytes of inputs, the peak is a few C, not the
    embedding's inputs; without blocks, the embedding's inputs dominate."""
    base, fts = model_family("llama", 3)
    plan = plan_merge(recipe("task_arithmetic", base, fts))
    try:
        n = 4
        chunk = 1024
        whole = plan.predicted_peak_bytes(MergeOptions(prefetch_bytes=0, chunk_bytes=0))
        blocks = plan.predicted_peak_bytes(MergeOptions(prefetch_bytes=0, chunk_bytes=chunk))
        embedding_inputs = n * 64 * 16 * 4
        # A block's inputs are at most C: (2n + 2) slots of C/n, the next block's C, 2 outputs of C/n.
        assert blocks <= (2 * n + 2) * chunk // n + chunk + 2 * chunk // n
        assert whole >= 2 * embedding_inputs > blocks
        text = plan.describe(MergeOptions(chunk_bytes=chunk), full=False)
        assert f"tensors merged in blocks of rows of about 1.0 KiB of inputs (e.g. {EMBED})" in text
        assert "row blocks" not in plan.describe(MergeOptions(chunk_bytes=0), full=False)
    finally:
        for m in plan.models:
            m.checkpoint.close()


def test_the_writer_takes_row_blocks_in_any_order_and_counts_them(tmp_path):
    spec = OutputTensor("w", torch.float32, (5, 3))
    data = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    with CheckpointWriter(tmp_path / "out", [spec], 10 ** 9) as writer:
        writer.write("w", data[3:], row=3)
        writer.write("w", data[:1], row=0)
        with pytest.raises(RuntimeError, match="never written"):
            writer.commit()
        with pytest.raises(RuntimeError, match=r"at row 4"):
            writer.write("w", data[:2], row=4)  # past the last row
        writer.write("w", data[1:3], row=1)
        writer.commit()
    assert torch.equal(load_file(tmp_path / "out" / "model-00001-of-00001.safetensors")["w"], data)


def test_row_blocks_from_bin_checkpoints_and_lora_refs(model_family, tmp_path):
    """``.bin`` inputs are read in blocks too; a tensor a LoRA adapter changes is computed whole
    (a block of B A need not round as the whole product does), so it is merged whole."""
    from tests.engine.test_lora_refs import make_adapter

    base, fts = model_family("llama", 3)
    as_bin = make_model(tmp_path / "bin", seed=5, base=base, safe_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about embedding adapters
        adapter = make_adapter(fts[0], tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"])
        r = recipe("task_arithmetic", base, [f"{fts[0]}+{adapter}", as_bin, fts[2]])
        blocked = blocked_tensors(r)
        assert EMBED not in blocked and "lm_head.weight" in blocked
        assert_blocks_equal_whole(r, tmp_path)


def test_the_cli_sets_the_chunk_budget_and_refuses_a_negative_one(model_family, tmp_path, capsys):
    import yaml

    from mergesmith.cli import main

    base, fts = model_family("llama", 3)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe("task_arithmetic", base, fts)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "--chunk", "100"]) == 0
    assert "row blocks:" in capsys.readouterr().out
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0  # 64 MiB: tiny tensors stay whole
    assert "row blocks:" not in capsys.readouterr().out
    with pytest.raises(InputError, match="--chunk -1 must not be negative"):
        plan_merge(recipe("task_arithmetic", base, fts), MergeOptions(chunk_bytes=-1))


@pytest.mark.parametrize("text,size", [("100", 100), ("100B", 100), ("1000000", 10 ** 6), ("2k", 2000),
                                       ("1KiB", 1024), ("64MiB", 64 * 2 ** 20), ("5GB", 5 * 10 ** 9)])
def test_sizes_without_a_unit_are_bytes(text, size):
    from mergesmith.units import parse_size

    assert parse_size(text) == size
