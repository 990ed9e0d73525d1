"""Command line: ``python -m tpaware_compile demo`` and ``python -m tpaware_compile run CHECKPOINT ...``."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tpaware_compile")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="eager vs backend='tpaware' on a small act-order GPTQ Llama")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (CPU gloo ranks without GPUs)")
    demo.add_argument("--form", default="N", choices=["N", "L", "U"], help="deployment form of the MLPs")
    demo.add_argument("--new-tokens", type=int, default=16)
    run = sub.add_parser("run", help="logits of a GPTQ checkpoint for given token ids, over --tp ranks")
    run.add_argument("checkpoint", help="a Hugging Face-format GPTQ checkpoint directory (Llama or GPTBigCode)")
    run.add_argument("--tp", type=int, default=1)
    run.add_argument("--tokens", required=True, help="token ids, comma separated")
    run.add_argument("--out", required=True, help="safetensors file for the logits")
    run.add_argument("--form", default="N", choices=["N", "L", "U"])
    run.add_argument("--backend", default="tpaware", help="a torch.compile backend, or 'eager'")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    args = parser.parse_args()
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(world=args.tp, new_tokens=args.new_tokens, form=args.form)
    else:
        from .run_checkpoint import main as run_main

        tokens = [int(t) for t in args.tokens.split(",")]
        run_main(args.checkpoint, args.tp, tokens, args.out, args.form, args.backend, args.dtype)


if __name__ == "__main__":
    main()
