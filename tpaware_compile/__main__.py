"""Command line: ``python -m tpaware_compile demo [--tp N]``."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tpaware_compile")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="eager vs backend='tpaware' on a small act-order GPTQ Llama")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (CPU gloo ranks without GPUs)")
    demo.add_argument("--form", default="N", choices=["N", "L", "U"], help="deployment form of the MLPs")
    demo.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(world=args.tp, new_tokens=args.new_tokens, form=args.form)


if __name__ == "__main__":
    main()
