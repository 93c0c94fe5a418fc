"""``mergesmith bench --calibration-answers``: the data-aware rows' calibration data, on a zoo's files only
(no zoo is built: the train files are written here as ``zoo build`` writes them)."""

from pathlib import Path

import yaml

from mergesmith.cli import main
from mergesmith.evaluate.tasks import load_tasks
from mergesmith.zoo import bench as BN
from mergesmith.zoo import bench_learned as BL
from mergesmith.zoo import build as B
from mergesmith.zoo import skills as S
from mergesmith.zoo.model import SIZES

DATA_AWARE_MERGES = ("regmean", "regmean_plusplus", "fisher")


def fake_zoo(root: Path) -> tuple[B.Zoo, dict[str, list[S.Example]]]:
    """A zoo whose train files are real (20 examples per trained skill) and whose models are names."""
    size = SIZES["test"]
    world = S.make_world(0, size.n_countries, size.n_cities, size.n_people)
    examples, files = {}, {}
    for skill in S.TRAINED:
        examples[skill] = S.make_split(skill, world, "train", 20, 0)
        files[skill] = root / "data" / "tasks" / "train" / "gen" / f"{skill}.jsonl"
        B._write_jsonl(files[skill], B._task_rows(skill, examples[skill], "train", "gen", 0))
    zoo = B.Zoo(root=root / "run", size="test", seed=0, finetune_seed=0, base=root / "base",
                experts={s: root / "experts" / s for s in S.TRAINED}, lora={}, multitask=root / "multitask",
                trained=S.TRAINED, heldout=(), tasks={"train": {"gen": files}})
    return zoo, examples


def test_off_by_default_and_the_block_is_unchanged(tmp_path):
    zoo, _ = fake_zoo(tmp_path)
    assert BN.BenchConfig(out=tmp_path).calibration_answers is False
    for method in DATA_AWARE_MERGES:
        recipe = BN.recipe_for(zoo, method, {}, seed=0)
        assert [e["calibration"]["files"] for e in recipe["models"]] == [[str(BL.train_file(zoo, s))]
                                                                          for s in zoo.trained]
        assert "include_answers" not in recipe["calibration"]  # prompt-only recipes keep their cache keys
    assert not (Path(zoo.root) / "calibration").exists()


def test_with_the_switch_each_expert_calibrates_on_its_own_fine_tuning_text(tmp_path):
    zoo, examples = fake_zoo(tmp_path)
    for method in DATA_AWARE_MERGES:
        recipe = BN.recipe_for(zoo, method, {}, seed=0, calibration_answers=True)
        assert recipe["calibration"]["include_answers"] is True
        assert "files" not in recipe["calibration"]  # no default that could reach another split
        for skill, entry in zip(zoo.trained, recipe["models"]):
            (config,) = entry["calibration"]["files"]
            assert yaml.safe_load(Path(config).read_text())["data"] == str(BL.train_file(zoo, skill).resolve())
            (task,) = load_tasks([config])
            # the harness's continuation (target_delimiter + gold) after the prompt is the text the expert
            # was fine-tuned on (zoo.train.encode_examples: prompt + answer), not "12 + 3 =15"
            shown = [item.prompt + task.settings.target_delimiter + item.gold_text for item in task.items]
            assert shown == [ex.prompt + ex.answer for ex in examples[skill]]
    assert BN.recipe_for(zoo, "regmean", {}, 0) != BN.recipe_for(zoo, "regmean", {}, 0, calibration_answers=True)


def test_dam_follows_the_switch_and_adamerging_stays_on_unlabeled_prompts(tmp_path, stub_learners):
    zoo, _ = fake_zoo(tmp_path)
    zoo.task_files = lambda split, form, skills: [tmp_path / "validation" / "mc" / f"{s}.jsonl" for s in skills]
    seen, learn = stub_learners
    for answers in (False, True):
        learn(zoo, "adamerging", include_answers=answers)
        learn(zoo, "dam", include_answers=answers)
    (plain, plain_knobs), (answered, answered_knobs) = seen["dam"]  # two entries: learned apart, cached apart
    assert plain == [str(BL.train_file(zoo, s)) for s in zoo.trained] and "include_answers" not in plain_knobs
    assert answered == [str(BL.answer_task_file(zoo, s)) for s in zoo.trained]
    assert answered_knobs["include_answers"] is True
    assert len(seen["adamerging"]) == 1  # the same unlabeled validation prompts: the cached entry is reused


def test_cli_flag_sets_the_switch(tmp_path, monkeypatch, capsys):
    configs = []
    monkeypatch.setattr(BN, "run_bench", lambda cfg: configs.append(cfg) or "")
    base = ["bench", "--size", "test", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    assert main(base) == 0 and main([*base, "--calibration-answers"]) == 0
    assert [c.calibration_answers for c in configs] == [False, True]
    assert main([*base, "--study", "scaling", "--calibration-answers"]) == 2
    assert "--calibration-answers: the scaling study does not take it" in capsys.readouterr().err
