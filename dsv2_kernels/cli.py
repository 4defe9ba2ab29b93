"""Command line: ``dsv2-kernels --info``, ``dsv2-kernels generate [MODEL_DIR] ...``, ``dsv2-kernels bench ...``."""

import argparse
import json


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", default="all", help="op families that run CUDA kernels: all, none, or e.g. mla,moe "
                   "(the rest run the PyTorch reference)")
    p.add_argument("--fp8-experts", action="store_true", help="quantize routed experts to FP8 128x128 blocks at load")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="activations and weights; fp32 runs "
                   "the ops' PyTorch references directly (the ops take bf16)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per paged-cache block")
    p.add_argument("--kv-fp8", action="store_true", help="FP8 e4m3 latent cache (per-token scales) instead of bf16")
    p.add_argument("--eager", action="store_true", help="no CUDA-graph capture of the decode step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2-kernels")
    parser.add_argument("--info", action="store_true", help="print versions, GPU and which ops have CUDA kernels")
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="generate from a DeepSeek-V2 checkpoint (or a random-weight default model)")
    g.add_argument("model", nargs="?", help="Hugging Face model directory (config.json + safetensors); without it, "
                   "a random-weight model sized to the machine (tiny on CPU, V2-Lite shape on GPU)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable; needs tokenizer.json)")
    g.add_argument("--ids", action="append", help="prompt as token ids, e.g. '1,2,3' (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--check", action="store_true", help="run the reference beside the kernels, op by op, and print "
                   "the largest relative error per op")
    _common(g)

    b = sub.add_parser("bench", help="prefill/decode throughput of a named config with random weights")
    b.add_argument("--config", default="tiny", choices=["tiny", "v2-lite", "v2"])
    b.add_argument("--layers", type=int, help="number of layers (default: all; 8 for v2)")
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--input-len", type=int, default=256)
    b.add_argument("--output-len", type=int, default=64)
    _common(b)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import dsv2_kernels

    if args.info:
        print(json.dumps(dsv2_kernels.info(), indent=2))
    if args.command is None:
        if not args.info:
            parser.print_help()
        return 0
    from dsv2_kernels.runner import commands

    return getattr(commands, args.command)(args)
