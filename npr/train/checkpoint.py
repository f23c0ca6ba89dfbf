"""Resumable checkpoints: ``RUN/checkpoints/step-N/``, atomic and verifiable.

Layout (one process or DDP)::

    step-N/  HF model + tokenizer (vanilla ``from_pretrained`` loads it), trainer_state.pt
             (optimizer, scheduler, step, processes), rng_state_rank{r}.pt, manifest.json

Layout under FSDP (sharded: no process ever holds the whole optimizer state)::

    step-N/  sharded/ (torch.distributed.checkpoint: model + AdamW states, one file per
             process, re-shardable to another process count), tokenizer, config.json,
             trainer_state.pt (scheduler, step, processes), rng_state_rank{r}.pt, manifest.json

Every process writes into ``.step-N.partial``; the main process then fsyncs each file, writes
``manifest.json`` LAST (every file with its size and CRC-32, ``npr.fsio.crc32_file``: an
integrity check, not a security one, computed on parallel threads), renames the directory into
place and fsyncs its parent. So a checkpoint is "complete" only with a manifest whose files
are all there at their sizes (``checkpoint_steps``), a ``kill -9`` at any moment leaves at
worst a ``.partial`` directory (cleared by the next save), and loading verifies every checksum,
each process its own share of the files, and names the bad file (``verify_checkpoint``).

Loading never unpickles code: every ``.pt`` file is read with ``torch.load(weights_only=True)``,
with only numpy's RNG-state array types allowed beyond tensors and plain containers
(``ALLOWED_GLOBALS``).
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npr.errors import NprError
from npr.fsio import as_disk_full, fsync_dir, manifest_problems, read_manifest, write_manifest

STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "sharded"
FORMAT = "npr-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(NprError):
    """A checkpoint that is missing, damaged or does not fit the run; the message says what to do."""


# What a checkpoint's .pt files may hold beyond tensors and plain containers: numpy's RNG state (an
# MT19937 key array). torch.load(weights_only=True) refuses every other global, so loading runs no code.
ALLOWED_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_pt(path: Path) -> Any:
    """``torch.load`` of a checkpoint file without pickled code (``weights_only=True``, ``ALLOWED_GLOBALS``);
    ``CheckpointError`` naming the file when it holds anything else."""
    import pickle

    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), type(e).__name__)
        raise CheckpointError(
            f"{path} holds an object a checkpoint may not ({reason[:200]}); npr loads checkpoints "
            "weights-only and does not unpickle code from them"
        ) from None


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under ``run_dir/checkpoints``, ascending: a manifest,
    and every file it lists present at its size (hashes are checked on load)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [
        int(m.group(1))
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and not manifest_problems(p, hashes=False)
    ]
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    steps = checkpoint_steps(run_dir)
    return Path(run_dir) / "checkpoints" / f"step-{steps[-1]}" if steps else None


def resume_point(run_dir: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``--resume`` continues from and a note on newer incomplete ones skipped.

    None when the run has no checkpoint directory at all (it was stopped before its first
    checkpoint completed: it starts over). ``CheckpointError`` when checkpoint directories
    exist but none is complete, naming what is wrong with the newest.
    """
    root = Path(run_dir) / "checkpoints"
    dirs = sorted(
        (int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ()) if (m := _STEP_DIR.match(p.name))
    )
    complete = checkpoint_steps(run_dir)
    skipped = [(step, p) for step, p in dirs if not complete or step > complete[-1]]
    problems = [f"{p.name}: {manifest_problems(p, hashes=False)[0]}" for _, p in skipped]
    if not complete:
        if not dirs:
            return None, None
        raise CheckpointError(
            f"--resume: {root} holds no complete checkpoint ({problems[-1]}); delete the damaged "
            "checkpoint directories to start the run over, or restore them"
        )
    note = f"skipped incomplete checkpoint(s): {'; '.join(problems)}" if problems else None
    return root / f"step-{complete[-1]}", note


def verify_checkpoint(checkpoint: Path, accelerator=None) -> dict:
    """The manifest of ``checkpoint`` after checking every file's size and checksum;
    ``CheckpointError`` naming the first bad file otherwise. With an ``accelerator`` of N
    processes each checksums every N-th file and the verdicts are gathered, so every process
    raises the same error (one process's disk reads instead of N times all of them)."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    problems = manifest_problems(checkpoint, part=(rank, world))
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(gathered, problems)
        problems = [p for found in gathered for p in found]
    if problems:
        older = [s for s in checkpoint_steps(checkpoint.parent.parent) if f"step-{s}" != checkpoint.name]
        hint = (
            f"delete {checkpoint} to resume from step-{older[-1]}"
            if older
            else f"delete {checkpoint} and start the run again without --resume"
        )
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {problems[0]}; {hint}")
    return read_manifest(checkpoint)


def _save_model_files(accelerator, model, tokenizer, optimizer, partial: Path) -> None:
    """The model and optimizer files of a checkpoint: sharded under FSDP, else an HF directory
    (main process) with the optimizer state in trainer_state.pt."""
    from npr.train.fsdp import is_sharded

    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial / SHARDED_DIR))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(partial)
            model.config.save_pretrained(partial)
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    optimizer,
    scheduler,
    run_dir: Path,
    step: int,
    keep: int,
    progress: dict | None = None,
) -> Path:
    """Write ``checkpoints/step-{step}`` from every process (call on all); keep the newest ``keep``.
    ``progress``: the trainer's own position (e.g. generation batches drawn), read back by
    ``saved_progress``."""
    from npr.train.fsdp import is_sharded

    root = Path(run_dir) / "checkpoints"
    target, partial = root / f"step-{step}", root / f".step-{step}.partial"
    sharded = is_sharded(model)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _removed_on_failure(partial):
        _save_model_files(accelerator, model, tokenizer, optimizer, partial)
        if accelerator.is_main_process:
            state = {
                "step": step,
                "num_processes": accelerator.num_processes,
                "scheduler": scheduler.state_dict(),
                "progress": dict(progress or {}),
            }
            if not sharded:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, partial / STATE_FILE)
        torch.save(rng_state(), partial / rng_file(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(
                partial,
                {"format": FORMAT, "step": step, "num_processes": accelerator.num_processes, "sharded": sharded},
            )
            if target.exists():  # a checkpoint of this step from before a crash: replaced whole
                shutil.rmtree(target)
            partial.rename(target)
    if accelerator.is_main_process:
        fsync_dir(root)
        if keep:
            for old in checkpoint_steps(run_dir)[:-keep]:
                shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _restore_rng(
    checkpoint: Path, manifest: dict, process_index: int, num_processes: int, seed: int, step: int
) -> str | None:
    """Restore this process's RNG; a note when the process count changed (then re-seeded)."""
    saved = int(manifest.get("num_processes", 1))
    if saved == num_processes:
        path = checkpoint / rng_file(process_index)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {checkpoint} has no {path.name} (the RNG state of process "
                f"{process_index}); it is incomplete: delete it to resume from an earlier one"
            )
        set_rng_state(load_pt(path))
        return None
    from accelerate.utils import set_seed

    set_seed(seed * 1_000_003 + step * 1_009 + process_index)
    return (
        f"{checkpoint} was written by {saved} process(es), this run has {num_processes}: model and optimizer "
        "state re-shard; each process's RNG is re-seeded from (seed, step, process)"
    )


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler, seed: int) -> tuple[int, str | None]:
    """Verify ``checkpoint`` and restore the optimizer, the schedule, this process's RNG and,
    for a sharded checkpoint, the model; returns (step, note). Call on every process.

    A sharded checkpoint re-shards to any number of processes (torch.distributed.checkpoint);
    an unsharded one holds the whole optimizer state, which every process loads.
    """
    from npr.train.fsdp import is_sharded

    manifest = verify_checkpoint(checkpoint, accelerator)
    if bool(manifest.get("sharded")) != is_sharded(model):
        kind = "sharded (FSDP)" if manifest.get("sharded") else "unsharded"
        raise CheckpointError(
            f"checkpoint {checkpoint} is {kind} and this run is "
            f"{'sharded' if is_sharded(model) else 'not'}; resume with the fsdp setting it was "
            "written with"
        )
    state = load_pt(checkpoint / STATE_FILE)
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=str(checkpoint / SHARDED_DIR))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    note = _restore_rng(checkpoint, manifest, accelerator.process_index, accelerator.num_processes, seed, step)
    return step, note


def saved_progress(checkpoint: Path) -> dict:
    """The ``progress`` a checkpoint was saved with ({} for one written before npr saved it)."""
    return dict(load_pt(Path(checkpoint) / STATE_FILE).get("progress", {}))


@contextlib.contextmanager
def _removed_on_failure(partial: Path):
    """Delete the half-written ``partial`` directory when the block fails (a full disk, Ctrl-C): only complete
    checkpoints stay behind. A disk-full failure is re-raised as one ``OSError(ENOSPC)`` naming the directory,
    judged before the deletion frees the space (torch.save reports it as a RuntimeError about positions)."""
    try:
        yield
    except BaseException as e:
        full = as_disk_full(e, partial) if isinstance(e, Exception) else None
        shutil.rmtree(partial, ignore_errors=True)
        if full is not None:
            full.filename = str(partial.parent)
            raise full from e
        raise


def save_final(accelerator, model, tokenizer, out_dir: Path) -> Path:
    """``final/``: a plain ``save_pretrained`` directory (gathered from the shards under FSDP),
    written into a temporary sibling, fsynced and renamed into place. Call on every process."""
    from npr.train.fsdp import full_state_dict, is_sharded

    state = full_state_dict(model) if is_sharded(model) else None  # a collective: every process
    if accelerator.is_main_process:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        with _removed_on_failure(tmp):
            if state is not None:
                unwrapped.save_pretrained(tmp, state_dict=state)
            else:
                unwrapped.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp, {"format": "npr-model/1"})
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    accelerator.wait_for_everyone()
    return Path(out_dir)
