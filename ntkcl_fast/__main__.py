"""`python -m ntkcl_fast info`: what is built, for which device, and why a backend is missing.
`python -m ntkcl_fast merge CONFIG OUT_DIR`: merge checkpoints from a mergekit config."""
import argparse
import json
import sys


def info(args) -> int:
    from ._backend import info as facts_of

    facts = facts_of()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for name, ok in facts["backends"].items():
        why = facts["why_missing"].get(name, "")
        print(f"backend {name:<7} {'yes' if ok else 'no':<4} {why}")
    for key in ("device", "torch", "torch_cuda", "triton", "extension", "extension_built_with_cuda",
                "extension_cuda_archs", "extension_torch"):
        print(f"{key:<26} {facts[key]}")
    return 0


def main() -> None:
    from .merge import cli

    parser = argparse.ArgumentParser(prog="python -m ntkcl_fast")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="backends, versions, build facts")
    info_parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info_parser.set_defaults(handler=info)
    merge_parser = commands.add_parser("merge", help="merge checkpoints from a mergekit YAML config")
    cli.add_arguments(merge_parser)
    merge_parser.set_defaults(handler=cli.run)
    args = parser.parse_args()
    sys.exit(args.handler(args))


if __name__ == "__main__":
    main()
