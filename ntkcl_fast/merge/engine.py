"""`merge_checkpoints`: a mergekit config merged tensor by tensor into an HF checkpoint (API.md,
"Model merging").

Three stages run at once, joined by bounded queues so memory holds only a few tensors: a reader
thread maps the next tensors of every model and faults their pages in, the calling thread
merges, a writer thread streams results into the shard files planned up front. Everything is
checked from the headers before the first byte of tensor data is read, and the output is built
in a hidden directory beside OUT_DIR that is renamed into place only when complete.

Under torch.distributed (e.g. torchrun; the CLI joins its group) the ranks split the planned
shards (shard k to rank k mod world size), each writes its own into the shared build directory,
and rank 0 writes the index and side files and renames it into place, so the files are the
single-process ones. Every rank reads the same headers and so raises the same input errors;
a rank that fails later makes every rank raise, and nothing is left behind.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _validate
from ..random import as_u64, tensor_key
from ._tensors import merge_tensors
from .config import MergeConfig, TensorParams, layer_fraction, layer_index, load_config, tensor_params
from .io import (SINGLE, OutEntry, ShardWriter, TensorEntry, parse_size, plan_shards, read_model, read_tensor,
                 shard_names, write_index)

# mergekit's list (mergekit/merge.py `_copy_tokenizer`): tokenizer files and their companions
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
QUEUE_DEPTH = 2  # tensors in flight between two stages
_DONE = object()


@dataclass(frozen=True)
class Job:
    out: OutEntry
    base: TensorEntry | None  # None: linear without a base
    models: tuple[TensorEntry, ...]
    params: TensorParams | None  # None: a non-floating tensor, copied from the base
    key: int
    compute: torch.dtype  # what the inputs are cast to before merging: mergekit's `dtype`, else the base's


def _num_layers(reference: Path, names) -> int:
    """The layer count mergekit interpolates over: config.json's num_hidden_layers, else the names'."""
    try:
        n = json.loads((reference / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
        if isinstance(n, int) and n > 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    indices = {i for i in map(layer_index, names) if i is not None}
    return max(indices) + 1 if indices else 0


def plan(cfg: MergeConfig) -> tuple[list[Job], Path]:
    """Every output tensor with its inputs and merge arguments, from the headers only."""
    reference = cfg.base or cfg.models[0].path
    base_label = "base_model" if cfg.base else f"model {str(reference)!r}"
    base_table = read_model(reference, base_label)
    tables = [read_model(m.path, f"model {str(m.path)!r}") for m in cfg.models]
    num_layers = _num_layers(reference, base_table)
    jobs = []
    for name, b in base_table.items():
        floating = b.dtype in _validate.FLOATING
        if not floating and b.dtype.is_floating_point:
            raise ValueError(f"{base_label}: tensor {name!r} is {b.dtype}, which cannot be merged")
        sources = []
        for spec, table in zip(cfg.models, tables):
            label = f"model {str(spec.path)!r}"
            entry = table.get(name)
            if entry is None:
                raise ValueError(f"{label}: tensor {name!r} of {base_label} is missing")
            if entry.shape != b.shape:
                raise ValueError(f"{label}: tensor {name!r} has shape {list(entry.shape)}, "
                                 f"{base_label} has {list(b.shape)}")
            if floating and entry.dtype not in _validate.FLOATING:
                raise ValueError(f"{label}: tensor {name!r} is {entry.dtype}, {base_label}'s is {b.dtype}")
            sources.append(entry)
        out_dtype = (cfg.out_dtype or cfg.dtype or b.dtype) if floating else b.dtype
        params = tensor_params(cfg, name, layer_fraction(name, num_layers)) if floating else None
        jobs.append(Job(OutEntry(name, out_dtype, b.shape), b if cfg.base or not floating else None,
                        tuple(sources), params, tensor_key(name), cfg.dtype or b.dtype))
    return jobs, reference


class OutputBuffers:
    """Byte buffers for merged tensors, handed back by the writer once written, so a merge writes
    into pages already faulted in: a new tensor of a few hundred MB costs more in page faults
    than the merge kernel itself (bench/NOTES.md). It holds no more buffers than were ever in
    flight at once: when none fits, the smaller free ones are dropped before one is made."""

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, entry: OutEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer, a view of it with entry's dtype and shape)."""
        with self._lock:
            fits = [b for b in self._free if b.numel() >= entry.nbytes]
            if fits:
                buf = min(fits, key=torch.Tensor.numel)
                self._free = [b for b in self._free if b is not buf]
            else:  # every free one is too small
                buf, self._free = None, []
        if buf is None:
            buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        return buf, buf[:entry.nbytes].view(entry.dtype).view(entry.shape)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


def _merge(job: Job, base, models, cfg: MergeConfig, seed: int, device, backend: str,
           buffers: OutputBuffers) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One output tensor (on the CPU, in its output dtype) and the buffer of `buffers` it lies in,
    if any."""
    if job.params is None:
        return base, None
    base = None if job.base is None else base.to(device, job.compute, non_blocking=True)
    models = [m.to(device, job.compute, non_blocking=True) for m in models]
    buf, out = None, None
    if device.type == "cpu" and job.compute == job.out.dtype:
        buf, out = buffers.take(job.out)
    p = job.params
    merged = merge_tensors(base, models, method=cfg.method, weight=list(p.weight), density=list(p.density),
                           lam=p.lam, normalize=p.normalize, rescale=p.rescale, seed=seed, key=job.key,
                           backend=backend, out=out)
    return merged.to(job.out.dtype).cpu(), buf


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return _DONE


def _run(jobs: list[Job], shards, directory: Path, cfg: MergeConfig, seed: int, device, backend: str,
         bar) -> None:
    stop, errors = threading.Event(), []
    loaded, merged = queue.Queue(QUEUE_DEPTH), queue.Queue(QUEUE_DEPTH)
    writer, buffers = ShardWriter(directory, shards), OutputBuffers()
    pin = device.type == "cuda"

    def read_all():
        try:
            for job in jobs:
                base = read_tensor(job.base, pin=pin) if job.base is not None else None
                models = [] if job.params is None else [read_tensor(e, pin=pin) for e in job.models]
                if not pin and job.params is not None:  # the cast, if any, here rather than in the merge thread
                    base = None if base is None else base.to(job.compute)
                    models = [m.to(job.compute) for m in models]
                if not _put(loaded, (job, base, models), stop):
                    return
            _put(loaded, _DONE, stop)
        except BaseException as e:  # handed to the calling thread, which raises it
            errors.append(e)
            stop.set()

    def write_all():
        try:
            while (item := _get(merged, stop)) is not _DONE:
                entry, tensor, buf = item
                writer.write(entry, tensor)
                if buf is not None:
                    buffers.give(buf)
            if not stop.is_set():
                writer.finish()
        except BaseException as e:
            errors.append(e)
            stop.set()
        finally:
            writer.abort()

    threads = [threading.Thread(target=read_all, daemon=True), threading.Thread(target=write_all, daemon=True)]
    for t in threads:
        t.start()
    done = 0
    try:
        while (item := _get(loaded, stop)) is not _DONE:
            job, base, models = item
            out, buf = _merge(job, base, models, cfg, seed, device, backend, buffers)
            del base, models  # unmaps the inputs' pages (their views were the last references)
            if not _put(merged, (job.out, out, buf), stop):
                break
            if bar is not None:
                bar.update(sum(e.end - e.begin for e in (job.base, *job.models) if e is not None))
                done += 1
                bar.set_postfix_str(f"{done}/{len(jobs)} tensors", refresh=False)
        else:
            _put(merged, _DONE, stop)
    except BaseException:
        stop.set()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    if stop.is_set():
        raise RuntimeError("the merge stopped before it finished")


def _copy_side_files(cfg: MergeConfig, reference: Path, directory: Path) -> None:
    config = reference / "config.json"
    if config.is_file():
        out_dtype = cfg.out_dtype or cfg.dtype
        if out_dtype is None:
            shutil.copyfile(config, directory / "config.json")
        else:  # as mergekit does: the saved dtype in the model's config
            content = json.loads(config.read_text(encoding="utf-8"))
            content["torch_dtype"] = str(out_dtype).removeprefix("torch.")
            (directory / "config.json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    donor = cfg.tokenizer_source or reference
    for name in TOKENIZER_FILES:
        if (donor / name).is_file():
            shutil.copyfile(donor / name, directory / name)
    (directory / "merge_config.yml").write_text(cfg.text, encoding="utf-8")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {str(out)!r} exists and is not empty (pass overwrite=True / --overwrite)")


def _install(built: Path, out: Path) -> None:
    """Rename the finished build into place; an old OUT_DIR is moved aside first, then removed."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "out")
        else:
            out.rmdir()
    os.rename(built, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_device(device: torch.device, world: int) -> torch.device:
    """Under torchrun, a bare `cuda` means this rank's GPU (LOCAL_RANK), as torchrun's own scripts
    pick it; one rank per GPU, so the ranks do not share one device's memory and copy engines."""
    if device.type != "cuda" or device.index is not None or world == 1:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _sync(error: Exception | None, world: int) -> None:
    """Every rank learns whether any failed: raise this rank's error, else name the rank that failed."""
    failed = []
    if world > 1:
        status = [None] * world
        torch.distributed.all_gather_object(status, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, s) for r, s in enumerate(status) if s is not None]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")


def _build_dir(out: Path, rank: int, world: int) -> Path:
    """The hidden directory beside OUT_DIR, made by rank 0 and shared with the others."""
    made, error = None, None
    if rank == 0:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            made = tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent)
        except OSError as e:
            error = e
    if world > 1:
        box = [made]
        torch.distributed.broadcast_object_list(box, src=0)
        made = box[0]
    _sync(error, world)
    return Path(made)


def _run_rank_shards(shards, mine, by_name: dict, built: Path, run) -> None:
    """This rank's shards, each built as a one-shard output in its own folder, then moved to its
    name in the whole plan (a one-shard file is the same bytes: its header lists only itself)."""
    names = shard_names(len(shards))
    for k in mine:
        part = built / f".shard-{k}"
        part.mkdir()
        run([by_name[e.name] for e in shards[k]], [shards[k]], part)
        os.rename(part / SINGLE, built / names[k])
        part.rmdir()


def merge_checkpoints(config, out_dir, *, device=None, seed=None, shard_size="5GB", progress: bool = True,
                      overwrite: bool = False, backend: str = "auto") -> Path:
    """Merge the checkpoints of a mergekit `config` (YAML path or dict) into `out_dir` (API.md).

    Bad config, a missing model or tensor, or a shape mismatch raises ValueError naming the model
    and tensor before any tensor data is read; nothing is created then. Returns `out_dir`.
    Under an initialized torch.distributed group every rank calls it with the same arguments.
    """
    cfg = load_config(config)
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise TypeError(f"out_dir must be a path, got {out_dir!r}")
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out, overwrite)
    shard_bytes = parse_size(shard_size)
    seed = 0 if seed is None else as_u64(seed, "seed")
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch finds no CUDA device")
    jobs, reference = plan(cfg)
    shards = plan_shards([j.out for j in jobs], shard_bytes)
    by_name = {j.out.name: j for j in jobs}
    rank, world = _world()
    device = _rank_device(device, world)
    mine = range(rank, len(shards), world)
    jobs = [by_name[e.name] for k in mine for e in shards[k]]  # the order the files hold them
    built = _build_dir(out, rank, world)
    try:
        error, bar = None, None
        try:
            if progress and rank == 0:
                from tqdm.auto import tqdm
                total = sum(e.end - e.begin for j in jobs for e in (j.base, *j.models) if e is not None)
                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merge",
                           dynamic_ncols=True)
            run = functools.partial(_run, cfg=cfg, seed=seed, device=device, backend=backend, bar=bar)
            if world == 1:
                run(jobs, shards, built)
            else:
                _run_rank_shards(shards, mine, by_name, built, run)
        except Exception as e:
            error = e
        finally:
            if bar is not None:
                bar.close()
        _sync(error, world)
        if rank == 0:
            try:
                if world > 1 and len(shards) > 1:
                    write_index(built, shards)
                _copy_side_files(cfg, reference, built)
                _install(built, out)
            except Exception as e:
                error = e
        _sync(error, world)  # the others return once OUT_DIR is in place
    except BaseException:
        if rank == 0:
            shutil.rmtree(built, ignore_errors=True)
        raise
    return out
