"""`python -m ntkcl_fast info`: what is built, for which device, and why a backend is missing."""
import argparse
import json

from ._backend import info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ntkcl_fast")
    parser.add_argument("command", choices=["info"], help="info: backends, versions, build facts")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args()
    facts = info()
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    for name, ok in facts["backends"].items():
        why = facts["why_missing"].get(name, "")
        print(f"backend {name:<7} {'yes' if ok else 'no':<4} {why}")
    for key in ("device", "torch", "torch_cuda", "triton", "extension", "extension_built_with_cuda",
                "extension_cuda_archs", "extension_torch"):
        print(f"{key:<26} {facts[key]}")


if __name__ == "__main__":
    main()
