"""Checkpoint files without pickled code (weights-only loads) and manifests whose checksums
scale: CRC-32 on parallel threads, each process verifying its own share of the files."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from distributed_util import run_gloo

from npr.fsio import crc32_file, manifest_problems, sha256_file, write_manifest
from npr.train.checkpoint import CheckpointError, load_pt, rng_state, set_rng_state, verify_checkpoint


class Payload:
    """A class a weights-only load must refuse (unpickling it could run code)."""


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_pt(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_pickled_object_is_refused_naming_the_file(tmp_path):
    torch.save({"step": 1, "evil": Payload()}, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state.pt holds an object a checkpoint may not .*Payload"):
        load_pt(tmp_path / "trainer_state.pt")


def _directory(root, sizes=(3000, 70000, 10, 5000)):
    gen = random.Random(0)
    (root / "sub").mkdir(parents=True)
    for i, size in enumerate(sizes):
        (root / ("sub" if i % 2 else ".") / f"f{i}.bin").write_bytes(bytes(gen.randrange(256) for _ in range(size)))
    return write_manifest(root, {"format": "test"})


def test_manifest_lists_crc32_and_verifies_per_part(tmp_path):
    import zlib

    manifest = _directory(tmp_path)
    names = list(manifest["files"])
    assert names == sorted(names) and len(names) == 4
    for name, entry in manifest["files"].items():
        assert entry["crc32"] == f"{zlib.crc32((tmp_path / name).read_bytes()):08x}" == crc32_file(tmp_path / name)
    assert manifest_problems(tmp_path) == []
    victim = tmp_path / names[1]
    data = bytearray(victim.read_bytes())
    data[7] ^= 1
    victim.write_bytes(bytes(data))
    assert manifest_problems(tmp_path, part=(0, 2)) == []  # files 0 and 2: not this process's victim
    (problem,) = manifest_problems(tmp_path, part=(1, 2))
    assert problem == f"{victim} does not match its checksum in the manifest (corrupted)"
    assert manifest_problems(tmp_path, hashes=False) == []


def test_an_older_sha256_manifest_is_still_verified(tmp_path):
    manifest = _directory(tmp_path)
    files = {name: {"size": e["size"], "sha256": sha256_file(tmp_path / name)} for name, e in manifest["files"].items()}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    assert manifest_problems(tmp_path) == []
    victim = tmp_path / next(iter(files))
    victim.write_bytes(bytes(b ^ 1 for b in victim.read_bytes()))
    assert "does not match its checksum" in manifest_problems(tmp_path)[0]


def _verify_on_two_processes(rank, world, checkpoint, victim):
    accelerator = SimpleNamespace(num_processes=world, process_index=rank)
    with pytest.raises(CheckpointError, match=f"{victim} does not match its checksum"):
        verify_checkpoint(checkpoint, accelerator)  # only rank 1 reads the victim; both raise


@pytest.mark.slow
def test_two_processes_share_the_verification_and_agree(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-1"
    manifest = _directory(checkpoint)
    victim = checkpoint / list(manifest["files"])[1]
    victim.write_bytes(bytes(b ^ 1 for b in victim.read_bytes()))
    run_gloo(_verify_on_two_processes, 2, checkpoint, victim)
