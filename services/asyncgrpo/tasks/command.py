"""`asyncgrpo make-task --out DIR [--n-train N] [--n-test N] [--seed S] [--answer-format gsm8k|boxed]`"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write train.jsonl, test.jsonl and task.json into")
    parser.add_argument("--n-train", type=int, default=10000, help="training problems")
    parser.add_argument("--n-test", type=int, default=500, help="test problems (no prompt shared with train)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same files)")
    parser.add_argument("--answer-format", default="gsm8k", choices=["gsm8k", "boxed"],
                        help="final line of the solution: '#### 42' (reward fn gsm8k) or '\\boxed{42}' (reward fn boxed)")
    parser.add_argument("--ops", default="+-", help="operators to draw from, any of '+-*'")
    parser.add_argument("--min-digits", type=int, default=1, help="fewest digits per operand")
    parser.add_argument("--max-digits", type=int, default=2, help="most digits per operand")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    import json
    import sys

    from asyncgrpo.tasks.arithmetic import ArithmeticSpec, write_task

    try:
        spec = ArithmeticSpec(ops=tuple(args.ops), min_digits=args.min_digits, max_digits=args.max_digits,
                              answer_format=args.answer_format)
        paths = write_task(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, spec=spec)
    except ValueError as e:
        print(f"asyncgrpo make-task: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
