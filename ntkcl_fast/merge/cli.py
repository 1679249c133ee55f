"""`python -m ntkcl_fast merge CONFIG OUT_DIR ...` and the `ntkcl-merge` console script."""
from __future__ import annotations

import argparse
import os
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="mergekit YAML config")
    parser.add_argument("out_dir", help="output directory (created when the merge is complete)")
    parser.add_argument("--device", default=None, help="where the merge math runs (default cpu), e.g. cuda")
    parser.add_argument("--seed", type=int, default=None, help="seed of the DARE masks (default 0)")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--backend", default="auto", help="merge_tensors backend (default auto)")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 bad input or a failed read/write (one line on stderr), 130 interrupted."""
    from .engine import merge_checkpoints

    # SIGTERM unwinds like Ctrl-C, so the partial output beside OUT_DIR is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shard_size = int(args.shard_size) if args.shard_size.isdigit() else args.shard_size
    joined = _join_torchrun()
    try:
        out = merge_checkpoints(args.config, args.out_dir, device=args.device, seed=args.seed,
                                shard_size=shard_size, progress=not args.no_progress, overwrite=args.overwrite,
                                backend=args.backend)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"ntkcl-merge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ntkcl-merge: interrupted, nothing written", file=sys.stderr)
        return 130
    finally:
        if joined:
            import torch.distributed as dist
            dist.destroy_process_group()
    print(out)
    return 0


def _join_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join its process group, so the ranks split the shards;
    gloo, since only a few small objects travel between ranks (the tensors go through files)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="ntkcl-merge", description="Merge checkpoints from a mergekit config.")
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))
