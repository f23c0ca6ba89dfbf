"""Checkpoints: ``RUN/checkpoints/step-N/`` = HF model + tokenizer (tags included, loadable by
vanilla ``from_pretrained``) + ``trainer_state.pt`` (optimizer, scheduler, step) + one
``rng_state_rank{r}.pt`` per process. Written into a hidden sibling and renamed into place,
so an interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from npr.errors import NprError
from npr.models import save_model

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(NprError):
    """A checkpoint that is missing or does not fit the run; the message says what to do."""


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
    """Steps of the complete checkpoints under ``run_dir/checkpoints``, ascending."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(steps)


def latest_checkpoint(run_dir: Path) -> Path:
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise CheckpointError(f"--resume: {run_dir}/checkpoints holds no complete checkpoint (step-N/{STATE_FILE}); "
                              "run without --resume to start the run, or point --out at the run to continue")
    return run_dir / "checkpoints" / f"step-{steps[-1]}"


def save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, run_dir: Path, step: int,
                    keep: int) -> Path:
    """Write ``checkpoints/step-{step}`` from every process (call on all ranks); keep the newest ``keep``."""
    root = run_dir / "checkpoints"
    target, partial = root / f"step-{step}", root / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        save_model(accelerator.unwrap_model(model), tokenizer, partial)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   partial / STATE_FILE)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), partial / f"rng_state_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        if keep:
            for old in checkpoint_steps(run_dir)[:-keep]:
                shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_trainer_state(checkpoint: Path, optimizer, scheduler, process_index: int, num_processes: int) -> int:
    """Restore optimizer, scheduler and this process's RNG from ``checkpoint``; return its step."""
    rng_file = checkpoint / f"rng_state_rank{process_index}.pt"
    saved = len(list(checkpoint.glob("rng_state_rank*.pt")))
    if saved != num_processes or not rng_file.is_file():
        raise CheckpointError(f"{checkpoint} was written by {saved} process(es), this run has {num_processes}; "
                              "resume with the same number of processes")
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return int(state["step"])
