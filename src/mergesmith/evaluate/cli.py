"""``mergesmith evaluate``, ``mergesmith compete`` and ``mergesmith score``.

Exit codes: 0 done; 2 bad input (an ``InputError``, raised by the library and
printed by the main CLI); 3 (compete only) the budget ran out before everything
was scored: the outputs are written and say what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

BUDGET_EXCEEDED = 3
SUBMISSION_FORMATS = ("kit", "plain")  # as mergesmith.evaluate.competition's (kept torch- and import-free here)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", required=True, metavar="FILE",
                   help="task files: .jsonl (mergesmith items), .csv (LLM Merging Competition format) "
                        "or .yaml (a task config)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the outputs")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU if there is one; default cpu)")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, the checkpoint's dtype on GPU), float32, bfloat16 or float16")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed task rows (and count them) instead of stopping")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% confidence intervals (0: none; default 1000)")
    p.add_argument("--mc-metric", choices=("acc", "acc_norm_chars", "acc_norm_tokens"), default=None,
                   help="headline metric of multiple-choice tasks that do not set one (default acc)")
    p.add_argument("--gen-metric", choices=("exact_match", "f1", "rougeL"), default=None,
                   help="headline metric of generation tasks that do not set one (default: rougeL for a "
                        "competition CSV, as the competition scores it; exact_match otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _metric_defaults(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    if args.mc_metric:
        out["multiple_choice"] = args.mc_metric
    if args.gen_metric:
        out["generation"] = args.gen_metric
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    from mergesmith.checks import prepare_output_dir, remove_if_empty
    from mergesmith.errors import InputError
    from mergesmith.evaluate.model import model_path_problems
    from mergesmith.evaluate.runner import evaluate, evaluate_output_problems, metric_problems, settings_problems
    from mergesmith.evaluate.tasks import load_tasks
    from mergesmith.paths import OutputLock
    from mergesmith.route.folder import is_routed_folder

    # every argument, the model folder, the output folder and the task files are checked before the model is loaded
    problems = settings_problems(batch_size=args.batch_size, bootstrap=args.bootstrap, max_length=args.max_length,
                                 device=args.device, dtype=args.dtype)
    if not is_routed_folder(args.model):  # a routed folder's experts are checked when evaluate reads it
        problems += model_path_problems(args.model)
    problems += evaluate_output_problems(args.out, args.model, args.tokenizer, args.tasks)
    tasks = []
    try:
        tasks = load_tasks(args.tasks, skip_bad_rows=args.skip_bad_rows, limit=args.limit,
                           metric=_metric_defaults(args))
    except InputError as err:
        problems += err.problems
    problems += metric_problems(tasks)
    if problems:
        raise InputError(problems)
    with OutputLock(args.out):  # one run per output folder: a second one stops here, at once
        created = prepare_output_dir(args.out)
        try:
            result = evaluate(args.model, tasks, tokenizer=args.tokenizer, batch_size=args.batch_size,
                              device=args.device, dtype=args.dtype, max_length=args.max_length,
                              bootstrap=args.bootstrap, progress=not args.no_progress, resident=args.resident)
        except BaseException:
            if created:  # stopped (Ctrl-C, a bad model) before any output: leave no empty folder behind
                remove_if_empty(args.out)
            raise
        results, predictions = result.save(args.out)
    print(result.table())
    print(f"wrote {results} and {predictions}")
    return 0


def run_compete(args: argparse.Namespace) -> int:
    from mergesmith.evaluate.compete import compete

    from mergesmith.errors import InputError

    learn_flags = {"--learn-share": (args.learn_share, 0.5), "--learn-steps": (args.learn_steps, 1000),
                   "--learn-batch-size": (args.learn_batch_size, 16),
                   "--learn-granularity": (args.learn_granularity, "layer"), "--learn-seed": (args.learn_seed, 0)}
    unused = [flag for flag, (value, default) in learn_flags.items() if value != default]
    if unused and not args.adamerge:
        raise InputError(f"{', '.join(unused)}: only used with --adamerge; add --adamerge or leave them out")
    search_flags = {"--workers": (args.workers, 1), "--ray-address": (args.ray_address, None),
                    "--optimizer": (args.optimizer, "cma"), "--search-seed": (args.search_seed, 0),
                    "--fitness": (args.fitness, "subsample"), "--per-task": (args.per_task, None),
                    "--population": (args.population, None), "--rerank": (args.rerank, 0)}
    search_options = None
    if any(value != default for value, default in search_flags.values()):
        from mergesmith.search.run import SearchOptions

        search_options = SearchOptions(workers=args.workers, ray_address=args.ray_address, optimizer=args.optimizer,
                                       seed=args.search_seed, fitness=args.fitness, per_task=args.per_task,
                                       population=args.population, rerank=args.rerank,
                                       progress=not args.no_progress)
    adamerge = None
    if args.adamerge:
        from mergesmith.learn.adamerging import AdaMergingSettings

        adamerge = AdaMergingSettings(granularity=args.learn_granularity, steps=args.learn_steps,
                                      batch_size=args.learn_batch_size, seed=args.learn_seed, device=args.device,
                                      progress=not args.no_progress)
    result = compete(args.recipe, args.tasks, args.out, budget=args.budget, validation=args.validation or (),
                     adamerge=adamerge, learn_share=args.learn_share, search_options=search_options,
                     search_share=args.search_share, device=args.device, dtype=args.dtype,
                     batch_size=args.batch_size, skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite,
                     isolate_merge=not args.inline_merge, submission_format=args.submission_format,
                     bootstrap=args.bootstrap,
                     metric=_metric_defaults(args), progress=not args.no_progress)
    print(result.evaluation.table())
    print(result.summary())
    if result.search is not None:
        s = result.search
        best = "no candidate scored" if s["best_fitness"] is None else \
            f"best fitness {s['best_fitness']:.4f} ({s['best_recipe']})"
        print(f"search: {s['candidates']} candidates in {s['seconds']:.1f} s of its {s['budget_s']:.0f} s; {best}")
    print("wrote " + ", ".join(str(p) for p in result.submissions) + f" and {args.out}/compete.json")
    if not result.complete:
        print("the budget ran out before everything was scored (see above)", file=sys.stderr)
        return BUDGET_EXCEEDED
    return 0


def run_score(args: argparse.Namespace) -> int:
    from mergesmith.evaluate.competition import score_submission

    report = score_submission(args.submission, args.key)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a model on tasks",
                              description="Score a model on multiple-choice and generation tasks; write "
                                          "DIR/results.json and DIR/predictions.jsonl.")
    p.add_argument("model", metavar="MODEL_DIR", help="a model folder (with its tokenizer), model+adapter, a routed model folder "
                                                    "(mergesmith route), or a hub id")
    _common(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, if not beside the model")
    p.add_argument("--resident", type=int, default=1, metavar="N",
                   help="a routed model folder (mergesmith route): keep at most N of its models loaded at once "
                        "(default 1)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context window in tokens (default: the model's); longer prompts lose their start")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each file (smoke tests)")
    p.set_defaults(func=run_evaluate)

    c = subparsers.add_parser("compete", help="merge and evaluate under a wall-clock budget",
                              description="Run a merge recipe and the evaluation as one job within a budget; "
                                          "write the scores and the competition's submission file. "
                                          f"Exit code {BUDGET_EXCEEDED}: the budget ran out before everything "
                                          "was scored.")
    c.add_argument("recipe", metavar="RECIPE.yml",
                   help="the merge recipe (mergekit YAML), or a search space (a recipe with range:/choice: "
                        "markers, or mergekit-evolve's genome:), searched on --validation first")
    _common(c)
    c.add_argument("--budget", required=True, help="wall-clock budget for the whole job: 1h, 45m, 90s, 1h30m")
    c.add_argument("--overwrite", action="store_true", help="replace DIR/model if it exists")
    c.add_argument("--inline-merge", action="store_true",
                   help="merge (and collect statistics, learn) in this process; such a merge CANNOT be stopped "
                        "at the budget: it runs to its end and an overrun is only found afterwards (default: a "
                        "child process, stopped at the budget, its partial output removed)")
    c.add_argument("--validation", nargs="+", metavar="FILE", default=None,
                   help="the competition's validation task files: the calibration data of a data-aware recipe "
                        "(regmean, regmean_plusplus, fisher) that has no calibration: block (prompts only)")
    c.add_argument("--adamerge", action="store_true",
                   help="learn the recipe's task-vector weights (task_arithmetic; ties: AdaMerging++) by "
                        "AdaMerging on the unlabeled prompts of --tasks, then merge the learned recipe "
                        "(DIR/learned.yml); the learning counts against the budget")
    c.add_argument("--learn-share", type=float, default=0.5, metavar="F",
                   help="fraction of the budget the learning may use; it then stops with the weights learned "
                        "so far (default 0.5)")
    c.add_argument("--learn-steps", type=int, default=1000, help="AdaMerging's Adam steps at most (default 1000)")
    c.add_argument("--learn-batch-size", type=int, default=16, help="prompts per task per step (default 16)")
    c.add_argument("--learn-granularity", choices=("layer", "task"), default="layer",
                   help="one weight per model and layer (default), or per model")
    c.add_argument("--learn-seed", type=int, default=0, help="seed of the prompt order (default 0)")
    g = c.add_argument_group("search (when RECIPE is a search space; see docs/search.md)")
    g.add_argument("--search-share", type=float, default=None, metavar="F",
                   help="fraction of the budget the search may use, its final steps included; the rest merges "
                        "the best recipe and predicts (default 0.5)")
    g.add_argument("--workers", type=int, default=1,
                   help="candidates scored at once: 1 in this process (default), N > 1 on a local Ray cluster")
    g.add_argument("--ray-address", default=None, help="attach the search to an existing Ray cluster")
    g.add_argument("--optimizer", choices=("cma", "random", "nsga2"), default="cma",
                   help="the search's optimizer (default cma)")
    g.add_argument("--search-seed", type=int, default=0, help="seeds the optimizer and the fitness subsample")
    g.add_argument("--fitness", choices=("subsample", "irt"), default="subsample",
                   help="subsample accuracy (default) or its IRT estimate of full-validation accuracy")
    g.add_argument("--per-task", type=int, default=None,
                   help="fitness items per validation task (default: the space's limit, else 40)")
    g.add_argument("--population", type=int, default=None, help="candidates per generation")
    g.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="the search's K candidates of highest fitness are evaluated on the full validation "
                        "tasks at its end, and the best there kept (default 0: off)")
    c.add_argument("--submission-format", choices=SUBMISSION_FORMATS, default="kit",
                   help="kit: id,prediction,dummy_field, as the starter kit writes it for Kaggle (default); "
                        "plain: id,prediction")
    # kept so that scripts written when the kit's column was opt-in still run; it is the default now
    c.add_argument("--dummy-field", dest="submission_format", action="store_const", const="kit",
                   help=argparse.SUPPRESS)
    c.set_defaults(func=run_compete)

    s = subparsers.add_parser("score", help="score a competition submission against its answer key",
                              description="Score a submission (id,prediction[,dummy_field]) against an answer key "
                                          "(id,eval_type,target[,answer_choices]; a labelled competition CSV works "
                                          "too): accuracy for multiple choice (the prediction is the choice's index, "
                                          "or its exact text), ROUGE-L for generation (exact match beside it), and "
                                          "overall the mean of the two.")
    s.add_argument("submission", metavar="SUBMISSION.csv", help="the submission, as compete writes it")
    s.add_argument("--key", required=True, metavar="KEY.csv",
                   help="the answers, e.g. test_key.csv from mergesmith zoo competition")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=run_score)
