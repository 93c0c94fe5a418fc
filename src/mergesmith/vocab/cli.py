"""``mergesmith tokensurgeon MODEL DONOR OUT``: give a model another model's tokenizer."""

from __future__ import annotations

import argparse

from mergesmith.units import human_bytes, parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser("tokensurgeon", help="give a model another model's tokenizer",
                              description="Write MODEL with DONOR's tokenizer to OUT: tokens both know keep the "
                                          "model's rows, the others are approximated (orthogonal matching pursuit "
                                          "over shared tokens, as mergekit-tokensurgeon). See docs/vocab.md.")
    p.add_argument("model", metavar="MODEL", help="the model folder whose weights are kept")
    p.add_argument("donor", metavar="DONOR", help="the model folder whose tokenizer the output takes")
    p.add_argument("out_dir", metavar="OUT", help="where to write the new model")
    p.add_argument("--approximation", choices=("omp", "mean", "zero"), default="omp",
                   help="rows of tokens the model lacks: omp (default), or the baselines mean (of all the "
                        "model's rows) and zero")
    p.add_argument("-k", "--k", type=int, default=64, help="shared tokens per OMP approximation (default: 64)")
    p.add_argument("--byte-match", choices=("yes", "no", "embed", "lm_head"), default="yes",
                   help="let a byte-fallback token <0xNN> take the row of the one-byte token, and back "
                        "(default: yes; embed or lm_head: that matrix only)")
    p.add_argument("--prefix-match", choices=("yes", "no", "embed", "lm_head"), default="no",
                   help="let a token the model lacks take the row of its longest prefix the model has "
                        "(default: no, as mergekit)")
    p.add_argument("--batch-size", type=int, default=512, help="tokens per OMP batch (default: 512)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto, for the OMP math (default: cpu)")
    p.add_argument("--out-shard-size", type=parse_size, default="5GB", help="max bytes per output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print where each vocabulary row would come from and the predicted "
                        "peak memory; read no weight, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tokensurgeon)


def run_tokensurgeon(args: argparse.Namespace) -> int:
    from mergesmith.vocab.transplant import SurgeonOptions, tokensurgeon

    options = SurgeonOptions(approximation=args.approximation, k=args.k, byte_match=args.byte_match,
                             prefix_match=args.prefix_match, batch_size=args.batch_size, device=args.device,
                             out_shard_size=args.out_shard_size, overwrite=args.overwrite,
                             progress=not args.no_progress, dry_run=args.dry_run)
    result = tokensurgeon(args.model, args.donor, args.out_dir, options)
    report = result.report
    for name, counts in report["tensors"].items():
        print(f"{name}: {counts['exact']} exact, {counts['byte']} byte, {counts['prefix']} prefix matches; "
              f"{counts['approximated']} approximated ({report['approximation']})"
              + (f", {counts['zero_no_donor_row']} zero (no donor row)" if counts["zero_no_donor_row"] else ""))
    if args.dry_run:
        print(f"dry run: would write {result.out_dir} (vocabulary {report['vocab_size']}, {report['shared_tokens']} "
              f"shared tokens); predicted peak memory {human_bytes(report['predicted_peak_bytes'])}; nothing read "
              "or written")
        return 0
    print(f"wrote {result.out_dir} (vocabulary {report['vocab_size']}, {report['shared_tokens']} shared tokens) "
          f"in {result.seconds:.1f} s")
    return 0
