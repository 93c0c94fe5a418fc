"""Multiple-choice scoring throughput: mergesmith vs lm-evaluation-harness, same model, task and CPU.

Builds everything locally (no hub): a byte-level BPE tokenizer trained on synthetic
text, a random-init Llama of about 27M parameters (big enough that the forward pass
dominates), and a task of N items whose 4 choices share a long prompt (a passage
and a question, about 150 tokens). Then it times

- mergesmith: ``evaluate(model, [task])`` end to end (tokenization, scoring, metrics);
- lm-eval: ``HFLM.loglikelihood`` on the task's (context, continuation) requests,
  i.e. lm-eval's scoring alone, without its task building and metric overhead
  (the fairest figure for lm-eval), and, with ``--lm-eval-end-to-end``, also its
  ``simple_evaluate`` on the same task exported by our adapter;

each ``--repeats`` times, alternating, keeping the best time of each. It checks that
the predictions (argmax under acc and under acc_norm) are identical and prints
items/s for both and the ratio.

    nice -n 10 .venv/bin/python benchmarks/bench_eval_throughput.py
    .venv/bin/python benchmarks/bench_eval_throughput.py --items 40 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch


def synthetic_corpus(rng: random.Random, n_words: int = 8000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ter", "son", "ra", "vel", "dun", "pi", "sha", "gor", "ne", "tu", "bal", "fi",
                 "wen", "dro", "ly", "quo", "zen", "mar", "ith", "ob", "cre", "pla", "nus", "es", "ant"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n_words)})
    return words


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def build_tokenizer(words: list[str], rng: random.Random, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [sentence(rng, words, rng.randint(5, 20)) for _ in range(20000)]
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_task(rng: random.Random, words: list[str], n_items: int, passage_sentences: int):
    from mergesmith.evaluate.tasks import Item, Task, TaskSettings

    items = []
    for n in range(n_items):
        passage = " ".join(sentence(rng, words, rng.randint(8, 14)) for _ in range(passage_sentences))
        question = f"Question: which {rng.choice(words)} did the {rng.choice(words)} {rng.choice(words)}?"
        choices = tuple(" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(4))
        items.append(Item(id=str(n), type="multiple_choice", prompt=f"{passage}\n{question}\nAnswer:",
                          choices=choices, answer=rng.randrange(4), position=n))
    return Task("bench_mc", "multiple_choice", items, TaskSettings(target_delimiter=" "), source="synthetic")


def run_ours(model, tokenizer, task, batch_size: int):
    from mergesmith.evaluate import evaluate

    start = time.perf_counter()
    result = evaluate(model, [task], tokenizer=tokenizer, batch_size=batch_size, progress=False, bootstrap=0)
    return time.perf_counter() - start, result


def lm_eval_requests(task):
    from lm_eval.api.instance import Instance

    from mergesmith.evaluate.prompts import plain_context

    reqs = []
    for item in task.items:
        ctx = plain_context(task, item)
        for j, choice in enumerate(item.choices):
            reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, " " + choice), idx=j))
    return reqs


def run_lm_eval_scoring(hflm, requests):
    start = time.perf_counter()
    out = hflm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [ll for ll, _ in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=160)
    p.add_argument("--passage-sentences", type=int, default=10, help="sentences per shared prompt (~13 tokens each)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8, help="items per batch for mergesmith")
    p.add_argument("--lm-eval-batch-size", type=int, default=32,
                   help="requests (one per choice) per batch for lm-eval (default 32: the same 8 items)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm-eval-end-to-end", action="store_true", help="also time lm-eval's simple_evaluate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print("lm-eval is not installed: pip install lm-eval", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    words = synthetic_corpus(rng)
    tokenizer = build_tokenizer(words, rng, args.vocab)
    model = build_model(tokenizer, args.hidden, args.layers, args.seed).to(args.device)
    task = build_task(rng, words, args.items, args.passage_sentences)
    n_params = sum(p.numel() for p in model.parameters())
    prompt_tokens = np.mean([len(tokenizer(i.prompt)["input_ids"]) for i in task.items])
    choice_tokens = np.mean([len(tokenizer(" " + c, add_special_tokens=False)["input_ids"])
                             for i in task.items for c in i.choices])
    print(f"model: Llama, {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {len(tokenizer)}), {args.device}, torch threads {torch.get_num_threads()}")
    print(f"task: {args.items} items x 4 choices, prompt {prompt_tokens:.0f} tokens, choice {choice_tokens:.1f} "
          f"tokens on average")

    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch_size, max_length=1024)
    requests = lm_eval_requests(task)
    warm = build_task(random.Random(1), words, 8, args.passage_sentences)
    run_ours(model, tokenizer, warm, args.batch_size)
    run_lm_eval_scoring(hflm, lm_eval_requests(warm))

    ours_times, theirs_times = [], []
    for r in range(args.repeats):
        t, ours = run_ours(model, tokenizer, task, args.batch_size)
        ours_times.append(t)
        t, lls = run_lm_eval_scoring(hflm, requests)
        theirs_times.append(t)
        print(f"  repeat {r + 1}: mergesmith {ours_times[-1]:.1f}s, lm-eval scoring {theirs_times[-1]:.1f}s",
              flush=True)

    # identical predictions?
    theirs_ll = np.array(lls).reshape(len(task.items), 4)
    ours_ll = np.array([p.loglikelihoods for p in ours.predictions])
    lengths = np.array([[len(c) for c in i.choices] for i in task.items], dtype=np.float64)
    same_acc = (ours_ll.argmax(1) == theirs_ll.argmax(1)).all()
    same_norm = ((ours_ll / lengths).argmax(1) == (theirs_ll / lengths).argmax(1)).all()
    ours_acc = [p.chosen["acc"] for p in ours.predictions]
    assert ours_acc == list(ours_ll.argmax(1))
    top2 = np.sort(theirs_ll, 1)[:, -2:]
    print(f"max |loglikelihood difference| {np.abs(ours_ll - theirs_ll).max():.2e}; "
          f"smallest margin between the top two choices {np.min(top2[:, 1] - top2[:, 0]):.2e}")
    print(f"identical predictions: acc {'yes' if same_acc else 'NO'}, acc_norm {'yes' if same_norm else 'NO'}")

    ours_ips = args.items / min(ours_times)
    theirs_ips = args.items / min(theirs_times)
    print(f"mergesmith evaluate():     {ours_ips:8.2f} items/s  (best of {args.repeats}: {min(ours_times):.1f}s)")
    print(f"lm-eval HFLM.loglikelihood: {theirs_ips:8.2f} items/s  (best of {args.repeats}: {min(theirs_times):.1f}s)")
    print(f"ratio: {ours_ips / theirs_ips:.2f}x")

    if args.lm_eval_end_to_end:
        from mergesmith.evaluate.lm_eval_adapter import run_lm_eval

        start = time.perf_counter()
        run_lm_eval(model, [task], tokenizer=tokenizer, hflm=hflm)
        e2e = time.perf_counter() - start
        print(f"lm-eval simple_evaluate:    {args.items / e2e:8.2f} items/s  ({e2e:.1f}s, one run); "
              f"ratio {ours_ips / (args.items / e2e):.2f}x")
    return 0 if same_acc and same_norm else 1


if __name__ == "__main__":
    sys.exit(main())
