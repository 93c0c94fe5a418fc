"""Calibration statistics against plain computations written here, and the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from mergesmith.calibrate import CalibrationSettings, StatsStore, calibrate_model
from mergesmith.calibrate.collect import chunks
from mergesmith.calibrate.data import encode_items, select_items
from mergesmith.evaluate.model import load_model
from calibration_data import write_calibration


def settings_for(data: Path, **kw) -> CalibrationSettings:
    base = dict(files=(str(data),), samples=6, max_length=6, seed=3, batch_size=3)
    base.update(kw)
    return CalibrationSettings(**base)


def sequences_of(model_dir: Path, settings: CalibrationSettings) -> list[list[int]]:
    lm = load_model(model_dir, dtype="float32")
    return [s.ids for s in encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)]


def run(model_dir: Path, settings: CalibrationSettings, kinds: list[str], root: Path) -> dict[str, StatsStore]:
    folders = {k: root / k for k in kinds}
    calibrate_model(model_dir, settings, kinds, folders, progress=False)
    return {k: StatsStore(f) for k, f in folders.items()}


def plain_grams(model_dir: Path, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Σ x xᵀ / n over every token's input to every linear layer, one unpadded sequence at a time."""
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook_for(name))
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]))
    return {f"{name}.weight": sums[name] / counts[name] for name in sums}


def test_grams_equal_a_plain_hook_computation(tmp_path, model_family):
    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    sequences = sequences_of(model_dir, settings)
    assert len({len(s) for s in sequences}) > 1  # batches are padded: the mask matters
    store = run(model_dir, settings, ["gram"], tmp_path / "cache")["gram"]
    expected = plain_grams(model_dir, sequences)
    assert set(store.index["tensors"]) == set(expected)  # every linear layer, lm_head (untied) too
    for name, gram in expected.items():
        got = StatsStore.read(store.refs(name)["gram"]).double()
        torch.testing.assert_close(got, gram, rtol=1e-5, atol=1e-5)
    assert store.index["counts"]["model.layers.0.self_attn.q_proj"] == sum(len(s) for s in sequences)


def test_sites_are_shared_and_stored_once(tmp_path, model_family):
    _, (model_dir, _, _) = model_family()
    store = run(model_dir, settings_for(write_calibration(tmp_path / "cal.jsonl")), ["gram"], tmp_path / "c")["gram"]
    where = store.index["tensors"]
    layer = "model.layers.1"
    assert {where[f"{layer}.self_attn.{p}_proj.weight"][1] for p in "qkv"} == {f"{layer}.self_attn.q_proj"}
    assert where[f"{layer}.mlp.up_proj.weight"][1] == where[f"{layer}.mlp.gate_proj.weight"][1]
    assert where[f"{layer}.mlp.down_proj.weight"][1] == f"{layer}.mlp.down_proj"
    stored = load_file(store.folder / "gram-00000.safetensors")
    assert len(stored) == 3 * 4 + 1  # per layer: attention input, o_proj, mlp input, down_proj; plus lm_head


def test_a_small_memory_budget_splits_passes_with_the_same_result(tmp_path, model_family):
    _, (model_dir, _, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    whole = run(model_dir, settings_for(data), ["gram", "fisher"], tmp_path / "one")
    split = run(model_dir, settings_for(data, memory=1), ["gram"], tmp_path / "many")
    # Fisher holds 4 bytes per parameter in a pass (its sum), plus its largest gradient; the model
    # has about 9k parameters.
    split.update(run(model_dir, settings_for(data, memory=15_000), ["fisher"], tmp_path / "many"))
    assert whole["gram"].index["passes"] == 1 and split["gram"].index["passes"] == 13  # one site per pass
    assert whole["fisher"].index["passes"] == 1 and split["fisher"].index["passes"] >= 3
    for kind in ("gram", "fisher"):
        for name in whole[kind].index["tensors"]:
            a = StatsStore.read(whole[kind].refs(name)[kind])
            b = StatsStore.read(split[kind].refs(name)[kind])
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_gram_pass_stops_the_forward_after_its_last_site(tmp_path, model_family):
    """One site per pass (three layers of four sites, then lm_head's): no pass computes the vocabulary
    projection (lm_head's site needs its input only), and no pass finishes a layer below its site."""
    from mergesmith.calibrate.collect import collect_grams

    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    lm = load_model(model_dir, dtype="float32")
    sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
    ran: list[str] = []
    watched = {"lm_head": lm.model.lm_head, "layer1": lm.model.model.layers[1]}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, a, o, name=name: ran.append(name))
    (tmp_path / "out").mkdir()
    written = collect_grams(lm, sequences, 3, 1, tmp_path / "out")
    batches = -(-len(sequences) // 3)
    assert written.passes == 13
    assert ran.count("lm_head") == 1  # the site probe's full forward; no pass
    # layer 1 finishes for the probe and in the passes whose site lies above it: layer 2's four, lm_head's
    assert ran.count("layer1") == 1 + 5 * batches
    expected = plain_grams(model_dir, [s.ids for s in sequences])
    for name, (file, key) in written.tensors.items():
        got = load_file(tmp_path / "out" / file)[key].double()
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)


def test_a_layer_run_twice_is_seen_every_time(tmp_path, model_family):
    """A decoder layer shared across depth (run twice per forward): the pass cannot stop at its first
    run, and its Grams sum over both runs, as a plain hook computation does."""
    from mergesmith.calibrate.collect import collect_grams, find_sites

    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    lm = load_model(model_dir, dtype="float32")
    inner = lm.model.model
    inner.layers = torch.nn.ModuleList([inner.layers[0], inner.layers[1], inner.layers[0]])
    lm.model.config.num_hidden_layers = 3
    sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
    assert find_sites(lm, sequences[0])[1] is False
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in lm.model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for s in sequences:
            ids = torch.tensor([s.ids])
            lm.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0))
    for h in handles:
        h.remove()
    (tmp_path / "out").mkdir()
    written = collect_grams(lm, sequences, 3, 1, tmp_path / "out")
    name = "model.layers.0.mlp.down_proj"
    assert written.counts[name] == 2 * sum(len(s.ids) for s in sequences)
    for name, (file, key) in written.tensors.items():
        module = name.removesuffix(".weight")
        got = load_file(tmp_path / "out" / file)[key].double()
        torch.testing.assert_close(got, sums[module] / counts[module], rtol=1e-5, atol=1e-5)


def test_fisher_frees_each_gradient_and_restores_the_model(tmp_path, model_family):
    from mergesmith.calibrate.collect import collect_fisher

    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    lm = load_model(model_dir, dtype="float32")
    sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
    params = dict(lm.model.named_parameters())
    params["model.norm.weight"].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in params.items()}
    held: list[int] = []  # gradients alive after each backward pass

    def backward(self, *args, **kwargs):
        real_backward(self, *args, **kwargs)
        held.append(sum(p.grad is not None for p in params.values()))

    real_backward = torch.Tensor.backward
    (tmp_path / "out").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "backward", backward)
        written = collect_fisher(lm, sequences, settings.seed, 15_000, tmp_path / "out")
    assert written.passes >= 3 and len(held) == written.passes * len(sequences)
    assert max(held) == 0  # every gradient was squared into its sum and freed during backward
    assert all(p.grad is None for p in params.values())
    assert {n: p.requires_grad for n, p in params.items()} == flags


def test_the_auto_accumulator_budget_is_a_quarter_of_the_model_within_bounds(tmp_path):
    auto = settings_for(tmp_path / "cal.jsonl")
    assert auto.memory is None
    assert auto.accumulator_bytes(900 * 2 ** 20) == 225 * 2 ** 20
    assert auto.accumulator_bytes(2 ** 20) == 64 * 2 ** 20
    assert auto.accumulator_bytes(28 * 2 ** 30) == 2 * 2 ** 30
    assert settings_for(tmp_path / "cal.jsonl", memory=5).accumulator_bytes(2 ** 30) == 5


def plain_fisher(model: torch.nn.Module, sequences: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (∇ log p(ŷ_n | x_n))², one autograd.grad per example over every parameter."""
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for index, ids in enumerate(sequences):  # selection order: example index seeds the draw
        logits = model(torch.tensor([ids])).logits[0]
        generator = torch.Generator().manual_seed(seed + index)
        targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(-1)
        log_likelihood = torch.log_softmax(logits, -1)[torch.arange(len(ids)), targets].sum()
        grads = torch.autograd.grad(log_likelihood, list(params.values()))
        for n, g in zip(params, grads):
            expected[n] += g.double() ** 2 / len(sequences)
    return expected


def assert_fisher_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for n, f in expected.items():
        torch.testing.assert_close(got[n].double(), f, rtol=1e-5, atol=1e-5 * float(f.abs().max()) + 1e-12)


def test_fisher_equals_a_per_example_autograd_loop(tmp_path, model_family):
    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    sequences = sequences_of(model_dir, settings)
    store = run(model_dir, settings, ["fisher"], tmp_path / "cache")["fisher"]
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = plain_fisher(model, sequences, settings.seed)
    assert_fisher_close({n: StatsStore.read(store.refs(n)["fisher"]) for n in store.index["tensors"]}, expected)
    norm = sum(float((f ** 2).sum()) for f in expected.values()) ** 0.5
    assert float(StatsStore.read(store.refs("lm_head.weight")["fisher_norm"])) == pytest.approx(norm, rel=1e-5)


@pytest.mark.parametrize("case", ["every parameter alone", "padding row", "tied (gemma)"])
def test_fisher_of_the_vocabulary_matrices_without_a_dense_gradient(tmp_path, model_family, case):
    """The untied embedding and head get their per-example gradients from their outputs' gradients
    (``vocabulary_modules``): alone in a pass (nothing below needs a gradient), beside the layers, with a
    padding row (no gradient, as nn.Embedding's backward), and tied (autograd's dense gradient)."""
    from mergesmith.calibrate.collect import collect_fisher, vocabulary_modules

    _, (model_dir, *_) = model_family("gemma", n=1, layers=2) if case.startswith("tied") else model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))
    lm = load_model(model_dir, dtype="float32")
    sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
    embed = lm.model.get_input_embeddings()
    if case == "padding row":
        embed.padding_idx = sequences[0].ids[1]  # a token the data holds
    special = vocabulary_modules(lm.model, dict(lm.model.named_parameters()))
    assert sorted(special) == ([] if case.startswith("tied") else ["lm_head.weight", "model.embed_tokens.weight"])
    (tmp_path / "out").mkdir()
    memory = 1 if case == "every parameter alone" else 10 ** 9
    written = collect_fisher(lm, sequences, settings.seed, memory, tmp_path / "out")
    got = {n: load_file(tmp_path / "out" / f)[k] for n, (f, k) in written.tensors.items()}
    expected = plain_fisher(lm.model, [q.ids for q in sequences], settings.seed)
    assert_fisher_close(got, expected)
    if case == "padding row":
        assert float(got["model.embed_tokens.weight"][embed.padding_idx].abs().max()) == 0.0
        assert float(got["model.embed_tokens.weight"].abs().sum()) > 0


def test_selection_is_seeded_and_capped(tmp_path):
    data = write_calibration(tmp_path / "cal.jsonl", n=20)
    a = [i.id for _, i in select_items(settings_for(data, samples=5, seed=1))]
    assert a == [i.id for _, i in select_items(settings_for(data, samples=5, seed=1))]
    assert a != [i.id for _, i in select_items(settings_for(data, samples=5, seed=2))]
    assert len(select_items(settings_for(data, samples=500))) == 21


def test_chunks_respect_the_budget():
    assert chunks([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
    assert chunks([10, 1], 4) == [[0], [1]]  # a lone item larger than the budget still gets a pass
    # with a transient beside the group: the group's largest one counts (a gradient beside the sums)
    assert chunks([3, 3, 3, 5, 1], 9, [3, 3, 3, 5, 1]) == [[0, 1], [2], [3], [4]]
    assert chunks([1, 1, 1, 1], 5, [1, 1, 1, 1]) == [[0, 1, 2, 3]]
    assert chunks([3, 3, 3], 6, [0, 0, 0]) == [[0, 1], [2]]


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_grams_on_other_architectures(tmp_path, model_family, arch):
    """Qwen2 has biased q/k/v (the bias is no input site); Gemma ties lm_head to the embeddings (left out)."""
    _, (model_dir,) = model_family(arch, n=1, layers=2)
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"), samples=4)
    store = run(model_dir, settings, ["gram"], tmp_path / "cache")["gram"]
    expected = plain_grams(model_dir, sequences_of(model_dir, settings))
    tied = arch == "gemma"
    assert set(store.index["tensors"]) == set(expected) - ({"lm_head.weight"} if tied else set())
    for name in store.index["tensors"]:
        got = StatsStore.read(store.refs(name)["gram"]).double()
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5)


def test_an_interrupted_calibration_leaves_no_entry(tmp_path, model_family, monkeypatch):
    import mergesmith.calibrate as calibrate

    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "collect_fisher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_model(model_dir, settings, ["gram", "fisher"], {"gram": tmp_path / "c" / "g",
                                                                  "fisher": tmp_path / "c" / "f"}, progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["g"]  # the finished kind stays, nothing else


# ----------------------------------------------------------------------------- calibration on answers


def write_labelled(folder: Path) -> Path:
    """A generation item whose prompt ends in a space, a multiple-choice item, under a YAML config whose
    target_delimiter is a space: the harness's split moves the prompt's space into the continuation."""
    import json

    rows = [{"id": "g0", "type": "generation", "prompt": "t4 t8 ", "references": ["t9 t10", "t11"]},
            {"id": "m0", "type": "multiple_choice", "prompt": "t4 t8 t15", "choices": ["t3", "t5 t6"], "answer": 1}]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yml").write_text("task: answers\ndata: items.jsonl\ntarget_delimiter: ' '\n")
    return folder / "task.yml"


def test_answer_sequences_are_the_context_and_continuation_the_harness_scores(tmp_path, model_family):
    from mergesmith.evaluate.prompts import render_context
    from mergesmith.evaluate.scoring import encode_mc

    _, (model_dir, _, _) = model_family()
    lm = load_model(model_dir, dtype="float32")
    selected = select_items(settings_for(write_labelled(tmp_path), samples=10, include_answers=True))
    ids = [item.id for _, item in selected]  # a mixed file is one task per type
    got = dict(zip(ids, (s.ids for s in encode_items(lm, selected, 100, include_answers=True))))
    # by hand: the word-level tokenizer maps tN to N; no BOS prefix; the gold choice is "t5 t6", the
    # generation answer the first reference
    assert got == {"g0": [4, 8, 9, 10], "m0": [4, 8, 15, 5, 6]}
    assert dict(zip(ids, (s.ids for s in encode_items(lm, selected, 100)))) == {"g0": [4, 8], "m0": [4, 8, 15]}
    task, item = selected[ids.index("m0")]
    (request,) = encode_mc(lm, task, [item], [render_context(task, item, lm.tokenizer)])
    assert got["m0"] == request.context + request.continuations[item.answer]  # what multiple choice scores
    short = dict(zip(ids, (s.ids for s in encode_items(lm, selected, 3, include_answers=True))))
    assert short == {"g0": [8, 9, 10], "m0": [15, 5, 6]}  # the last max_length tokens, as the harness cuts


def test_grams_on_answers_equal_a_plain_hook_computation(tmp_path, model_family):
    _, (model_dir, _, _) = model_family()
    settings = settings_for(write_calibration(tmp_path / "cal.jsonl"), max_length=8, include_answers=True)
    sequences = sequences_of(model_dir, settings)
    prompts = sequences_of(model_dir, settings_for(write_calibration(tmp_path / "cal.jsonl"), max_length=8))
    assert [s[:len(p)] for s, p in zip(sequences, prompts)] == prompts  # the answers follow the prompts
    assert sum(map(len, sequences)) > sum(map(len, prompts))
    store = run(model_dir, settings, ["gram"], tmp_path / "cache")["gram"]
    assert store.index["settings"]["include_answers"] is True
    assert store.index["tokens"] == sum(map(len, sequences))
    for name, gram in plain_grams(model_dir, sequences).items():
        got = StatsStore.read(store.refs(name)["gram"]).double()
        torch.testing.assert_close(got, gram, rtol=1e-5, atol=1e-5)


def test_answers_need_a_gold_answer_on_every_item(tmp_path, model_family):
    from mergesmith.errors import InputError

    data = write_calibration(tmp_path / "cal.jsonl")
    with data.open("a") as f:
        f.write('{"id": "u0", "type": "generation", "prompt": "t4 t5", "references": []}\n')
        f.write('{"id": "u1", "type": "generation", "prompt": "t6 t7", "references": []}\n')
    assert len(select_items(settings_for(data, samples=100))) == 10  # prompts only: unlabelled is fine
    with pytest.raises(InputError) as err:
        select_items(settings_for(data, samples=1, include_answers=True))  # whatever the draw
    text = str(err.value)
    assert f"{data}: 2 of 9 items have no gold answer (first: line 9, id u0)" in text
    assert "calibration.include_answers" in text and "needs references on every item" in text
