"""Building, caching and loading the zoo (the ``--size test`` zoo from conftest)."""

import json
import time
from dataclasses import replace

import pytest
import torch

from mergesmith.errors import InputError
from mergesmith.zoo import build as B
from mergesmith.zoo import skills as S
from mergesmith.zoo.model import get_size


def test_manifest_and_files(zoo):
    assert set(zoo.experts) == set(S.TRAINED) == set(zoo.trained)
    assert set(zoo.heldout) == set(S.HELDOUT) and len(zoo.heldout) >= 2
    assert len(zoo.trained) >= 6
    for path in zoo.models().values():
        assert (path / "model.safetensors").exists()
        assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    for split in ("validation", "test"):
        for form in ("mc", "gen"):
            assert [p.stem for p in zoo.task_files(split, form)] == list(zoo.skills)
            assert all(p.exists() for p in zoo.task_files(split, form))
    assert set(zoo.tasks["train"]["gen"]) == set(S.TRAINED)
    assert zoo.manifest["settings"]["hidden"] == get_size("test").hidden


def test_models_are_hugging_face_llamas(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo.experts["strings"])
    tok = AutoTokenizer.from_pretrained(zoo.experts["strings"])
    assert isinstance(model, LlamaForCausalLM)
    assert len(tok) == model.config.vocab_size
    ids = tok("reverse: a b c =", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_lora_adapter_loads_with_peft(zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert zoo.lora and all((p / "adapter_config.json").exists() for p in zoo.lora.values())
    skill, path = next(iter(zoo.lora.items()))
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in k for k in changed)


def test_materialized_lora_is_base_plus_scaled_low_rank_product(zoo, tmp_path):
    """W' = W + (alpha / r) B A for every adapted weight, everything else unchanged."""
    import json

    from safetensors.torch import load_file

    from mergesmith.zoo.lora import materialize_lora

    skill, adapter = next(iter(zoo.lora.items()))
    out = materialize_lora(adapter, zoo.base, tmp_path / "merged")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    base, merged = load_file(zoo.base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(merged) == set(base)
    adapted = 0
    for name, weight in base.items():
        a_key = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        if a_key in lora:
            b = lora[a_key.replace("lora_A", "lora_B")]
            assert b.abs().max() > 0, "training moved B away from its zero init"
            torch.testing.assert_close(merged[name], weight + scale * b @ lora[a_key],
                                       rtol=1e-5, atol=1e-6)
            adapted += 1
        else:
            assert torch.equal(merged[name], weight), name
    assert adapted == 7 * zoo.manifest["settings"]["layers"]
    assert (out / "tokenizer.json").exists()


def test_task_files_load_in_the_evaluation_harness(zoo):
    from mergesmith.evaluate import load_tasks

    mc = load_tasks(zoo.task_files("test", "mc"))
    gen = load_tasks(zoo.task_files("test", "gen"))
    assert [t.name for t in mc] == [t.name for t in gen] == list(zoo.skills)
    for task in mc:
        assert task.type == "multiple_choice" and len(task.items) > 0
        assert all(0 <= i.answer < len(i.choices) for i in task.items)
        answers = [i.answer for i in task.items]
        assert len(set(answers)) > 1  # the right answer is not always in one place
    assert all(t.type == "generation" for t in gen)


def _answer_nll(model, tok, path) -> float:
    """Mean negative log-likelihood of the reference answers of a task file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            full = tok(row["prompt"] + " " + row["references"][0])["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([full])).logits[0]
            logp = torch.log_softmax(logits[:-1], -1)
            targets = torch.tensor(full[1:])
            nll = -logp[torch.arange(len(targets)), targets][len(prompt) - 1:]
            total += nll.sum().item()
            count += len(nll)
    return total / count


def test_each_expert_learned_its_skill(zoo):
    """Even at test size, fine-tuning lowers the loss of the skill's validation answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    base = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    for skill in zoo.trained:
        path = zoo.tasks["validation"]["gen"][skill]
        expert = AutoModelForCausalLM.from_pretrained(zoo.experts[skill]).eval()
        assert _answer_nll(expert, tok, path) < _answer_nll(base, tok, path), skill


def test_a_merge_beats_every_expert_on_the_trained_average(zoo, tmp_path):
    """The proving ground's premise, at test size: a TIES merge of the eight experts predicts the
    trained skills' answers better on average than any single expert. Accuracy at this size is
    near chance for every model (docs/zoo.md), so the test measures answer log-likelihood; the
    accuracy tables come from the default size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesmith.zoo.bench import merge_into, recipe_for

    tok = AutoTokenizer.from_pretrained(zoo.base)

    def trained_average(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return sum(_answer_nll(model, tok, zoo.tasks["validation"]["gen"][s]) for s in zoo.trained) / len(zoo.trained)

    merge_into(recipe_for(zoo, "ties", {"density": 0.5, "lambda": 1.0}, seed=0), tmp_path / "ties", "cpu")
    merged = trained_average(tmp_path / "ties")
    experts = {s: trained_average(p) for s, p in zoo.experts.items()}
    assert merged < min(experts.values()), (merged, experts)
    assert merged < trained_average(zoo.base)


def test_second_build_reuses_the_cache(zoo, zoo_cache):
    stamp = (zoo.experts["rule"] / "model.safetensors").stat().st_mtime
    start = time.time()
    again = B.build_zoo("test", seed=0, cache_dir=zoo_cache, progress=False)
    assert time.time() - start < 2
    assert again.root == zoo.root
    assert (again.experts["rule"] / "model.safetensors").stat().st_mtime == stamp


def test_cache_keys(tmp_path):
    root = B.zoo_root("test", 0, tmp_path)
    assert B.zoo_root("test", 0, tmp_path) == root
    assert B.zoo_root("test", 1, tmp_path).parent != root.parent  # new world, new base
    other_ft = B.zoo_root("test", 0, tmp_path, finetune_seed=5)
    assert other_ft.parent == root.parent and other_ft != root  # same base, new fine-tunes
    assert B.zoo_root("default", 0, tmp_path).parent != root.parent


def test_bad_size_and_seed_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="size"):
        B.build_zoo("huge", cache_dir=tmp_path)
    with pytest.raises(InputError, match="seed"):
        B.build_zoo("test", seed=-1, cache_dir=tmp_path)


def test_interrupted_stage_leaves_nothing(tmp_path):
    target = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        with B.atomic_dir(target) as tmp:
            (tmp / "half-written").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with B.atomic_dir(target) as tmp:
        (tmp / "done").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["part"]


def test_training_is_deterministic(tmp_path):
    """Same seed, same weights: the data stage and a few pretraining steps, twice."""
    size = replace(get_size("test"), pretrain_steps=3, n_validation=5, n_test=5, train_examples=20)
    for run in ("a", "b"):
        B.build_data(tmp_path / run / "data", size, seed=4)
        B.build_tasks(tmp_path / run / "tasks", size, seed=4)
        B.build_base(tmp_path / run / "base", tmp_path / run / "data", size, seed=4, progress=False)
    for sub in ("tasks/test/mc/strings.jsonl", "tasks/validation/gen/facts.jsonl",
                "data/tasks/train/gen/rule.jsonl", "data/tokenizer/tokenizer.json", "base/model.safetensors"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes(), sub


def test_stale_temp_of_a_dead_build_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".part.tmp-{dead}-abcdef"
    stale.mkdir()
    mine = tmp_path / f".other.tmp-{dead}-abcdef"
    mine.mkdir()
    with B.atomic_dir(tmp_path / "part"):
        pass
    assert not stale.exists() and mine.exists()  # only temps of the folder being built


def test_cli_size_names_match_the_sizes():
    from mergesmith.zoo.cli import SIZE_NAMES
    from mergesmith.zoo.model import SIZES

    assert set(SIZE_NAMES) == set(SIZES)


def test_pool_lists_experts_lora_and_distractors(zoo):
    from mergesmith.zoo.pool import DISTRACTORS

    pool = {m.name: m for m in zoo.pool}
    assert {f"expert:{s}" for s in zoo.trained} <= set(pool)
    assert {f"lora:{s}" for s in zoo.lora} <= set(pool)
    assert len(DISTRACTORS) >= 2 and {d.name for d in DISTRACTORS} <= set(pool)
    assert [m.name for m in zoo.pool if not m.clean] == [d.name for d in DISTRACTORS]
    for member in pool.values():
        assert member.doc and member.skills and member.path.exists()
    for d in DISTRACTORS:  # ordinary checkpoints of the family, trained as described
        log = json.loads((zoo.distractors[d.name] / "zoo_train.json").read_text())
        assert log["distractor"]["name"] == d.name
        assert log["steps"] == round(get_size("test").ft_steps * d.steps_factor)


def test_corrupted_labels_are_all_wrong():
    from mergesmith.zoo.pool import corrupt

    world = S.make_world(0, 8, 40, 40)
    examples = S.make_split("compare", world, "train", 50, 0)
    bad = corrupt(examples, seed=1)
    assert [e.prompt for e in bad] == [e.prompt for e in examples]
    assert all(b.answer != e.answer and b.answer in e.choices for b, e in zip(bad, examples))
    assert corrupt(examples, seed=1) == bad


def test_a_zoo_of_an_earlier_layout_is_completed_not_retrained(zoo, zoo_cache):
    """A manifest written before the current tasks and distractors: the next build adds the
    missing parts and keeps every trained model (same files, same mtimes)."""
    import shutil

    manifest = json.loads((zoo.root / "zoo.json").read_text())
    models = [zoo.base, *zoo.experts.values(), zoo.multitask]
    stamps = [(p / "model.safetensors").stat().st_mtime_ns for p in models]
    name, folder = next(iter(zoo.distractors.items()))
    shutil.rmtree(folder)
    (zoo.root / "zoo.json").write_text(json.dumps({**manifest, "layout": "older"}))
    again = B.build_zoo("test", seed=0, cache_dir=zoo_cache, progress=False)
    assert again.manifest["layout"] == manifest["layout"]
    assert (again.distractors[name] / "model.safetensors").exists()
    assert [(p / "model.safetensors").stat().st_mtime_ns for p in models] == stamps
    assert again.manifest["build_seconds"]["base"] == manifest["build_seconds"]["base"]


def test_cli_zoo_pool_lists_every_member(zoo, zoo_cache, capsys):
    from mergesmith.cli import main

    assert main(["zoo", "pool", "--size", "test", "--cache", str(zoo_cache), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == [m.name for m in zoo.pool]
    assert {m["name"] for m in listed if not m["clean"]} == set(zoo.distractors)
    assert main(["zoo", "pool", "--size", "test", "--cache", str(zoo_cache)]) == 0
    text = capsys.readouterr().out
    assert "noisy:compare" in text and "a careful user would not merge it" in text
