"""Command line: ``dsv2-kernels --info``."""

import argparse
import json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsv2-kernels")
    parser.add_argument("--info", action="store_true", help="print versions, GPU and which ops have CUDA kernels")
    args = parser.parse_args(argv)
    import dsv2_kernels

    if args.info:
        print(json.dumps(dsv2_kernels.info(), indent=2))
    return 0
