"""`asyncgrpo build-tiny-model --out DIR [--preset tiny|small|base] [--arch qwen2|llama]`"""

from __future__ import annotations

import argparse

from asyncgrpo.tiny.model import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the HF checkpoint into")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"], help="architecture family")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--untied", action="store_true", help="separate lm_head instead of tied embeddings")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from asyncgrpo.tiny.model import build_tiny_model

    out = build_tiny_model(args.out, preset=args.preset, arch=args.arch, seed=args.seed,
                           tie_word_embeddings=not args.untied)
    print(out)
    return 0
