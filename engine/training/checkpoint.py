"""Training checkpoints: torch.distributed.checkpoint (DCP) shards + a completion record written last.

    SAVE/
      latest                     "iter_0000200\\n", replaced atomically after every rank finished iter_0000200
      iter_0000200/
        .metadata, __0_0.distcp, __1_0.distcp ...   DCP: model, optimizer, scheduler, trainer/loader state, RNG
        tokenizer/               copy of the shards' tokenizer (load with engine.tokenizer.load_saved_tokenizer)
        chrysalis_train.json     written last by rank 0: iteration, config, vocabulary, vision-encoder
                                 reference, and size + sha256 of every other file

A `kill -9` during a save leaves a directory without `chrysalis_train.json` (or with files that no longer match
it); `find_resumable` skips such checkpoints, falls back to the newest complete one and says which and why.
DCP reshards on load, so a run saved with N processes (DDP or FSDP2) resumes with M.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from engine.checkpoint_io import atomic_write_text, sha256_file
from engine.training.parallel import ParallelInfo

FORMAT = "chrysalis-training-checkpoint"
FORMAT_VERSION = 1
RECORD = "chrysalis_train.json"
LATEST = "latest"
# Test-only: "SECONDS" or "ITERATION:SECONDS" to sleep after the DCP files are written and before the completion
# record (of every save, or of the save of ITERATION), so a test can SIGKILL the trainer in the middle of a save.
_TEST_SLEEP_ENV = "CHRYSALIS_TEST_SLEEP_IN_SAVE"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _iteration_of(path: Path) -> int | None:
    if path.name.startswith("iter_") and path.name[5:].isdigit():
        return int(path.name[5:])
    return None


def _barrier(info: ParallelInfo) -> None:
    if info.mesh is not None:
        dist.barrier(group=info.world_group)


def _broadcast(obj: Any, info: ParallelInfo) -> Any:
    if info.mesh is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.world_group)
    return box[0]


def _all_gather(obj: Any, info: ParallelInfo) -> list[Any]:
    if info.mesh is None:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.world_group)
    return out


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------- state dicts
# Optimizer state is saved flattened ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): keys depend only on
# parameter names, so a checkpoint reshards across data, tensor and pipeline layouts (and model parts).
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _parts(model) -> list[nn.Module] | None:
    """The local model parts of a tensor/pipeline-parallel model (engine.parallel.ParallelVPiT), else None."""
    return getattr(model, "parts", None)


def _optimizers(optimizer, count: int) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer] * count))


def _fqn_of_optimizer_key(key: str) -> str:
    # "state.layers.0.attention.wq.weight.exp_avg" -> "layers.0.attention.wq.weight"
    return key.split(".", 1)[1].rsplit(".", 1)[0]


def _tied_head_alias(module) -> dict[str, str]:
    """{local name: checkpoint name}. A tied LM head is checkpointed once, under the embedding's name, as Megatron
    keys its last pipeline stage's copy: `output.weight` is the same tensor as `tok_embeddings.weight` on one
    process and a copy on the last pipeline stage, so one name lets a checkpoint reshard between those layouts."""
    inner = getattr(module, "module", module)  # DDP
    config = getattr(inner, "config", None)
    if getattr(config, "tie_embeddings", False) and getattr(inner, "output", None) is not None:
        return {"output.weight": "tok_embeddings.weight"}
    return {}


def _rename_optimizer_keys(optim_sd: dict, old: str, new: str) -> None:
    # "state.<fqn>.exp_avg", "param_groups.<fqn>.lr"
    for key in list(optim_sd):
        kind, rest = key.split(".", 1)
        if rest.startswith(old + "."):
            optim_sd[f"{kind}.{new}{rest[len(old):]}"] = optim_sd.pop(key)


def _to_checkpoint_names(module, model_sd: dict, optim_sd: dict | None) -> None:
    for local, saved in _tied_head_alias(module).items():
        if local in model_sd:
            model_sd.setdefault(saved, model_sd.pop(local))
        if optim_sd is not None:
            _rename_optimizer_keys(optim_sd, local, saved)


def _from_checkpoint_names(module, model_sd: dict, optim_sd: dict | None) -> tuple[dict, dict | None]:
    model_sd = dict(model_sd)
    optim_sd = dict(optim_sd) if optim_sd is not None else None
    inner = getattr(module, "module", module)
    for local, saved in _tied_head_alias(module).items():
        if saved in model_sd:
            model_sd[local] = model_sd[saved]
        if optim_sd is not None and getattr(inner, "tok_embeddings", None) is None:
            _rename_optimizer_keys(optim_sd, saved, local)  # the last stage's copy has its own optimizer state
    return model_sd, optim_sd


def model_and_optimizer_state(model, optimizer) -> tuple[dict, dict]:
    parts = _parts(model)
    if parts is None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_FLAT)
        _to_checkpoint_names(model, model_sd, optim_sd)
        return model_sd, optim_sd
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for part, opt in zip(parts, _optimizers(optimizer, len(parts))):
        if opt is None:  # a stage with nothing to train (stage 1, middle of the pipeline)
            m = get_model_state_dict(part)
            _to_checkpoint_names(part, m, None)
            model_sd.update(m)
            continue
        m, o = get_state_dict(part, opt, options=_FLAT)
        _to_checkpoint_names(part, m, o)
        model_sd.update(m)
        optim_sd.update(o)
    return model_sd, optim_sd


def set_model_and_optimizer_state(model, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    parts = _parts(model)
    if parts is None:
        model_sd, optim_sd = _from_checkpoint_names(model, model_sd, optim_sd)
        if optim_sd is None:
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_FLAT)
        return
    for part, opt in zip(parts, _optimizers(optimizer, len(parts)) if optimizer is not None else [None] * len(parts)):
        own = set(part.state_dict())
        part_model_sd, part_optim_sd = _from_checkpoint_names(part, model_sd, optim_sd)
        part_model = {k: v for k, v in part_model_sd.items() if k in own}
        if opt is None or optim_sd is None:
            set_state_dict(part, [], model_state_dict=part_model, optim_state_dict={})
            continue
        part_optim = {k: v for k, v in part_optim_sd.items() if _fqn_of_optimizer_key(k) in own}
        set_state_dict(part, opt, model_state_dict=part_model, optim_state_dict=part_optim, options=_FLAT)


def model_state(model) -> dict:
    parts = _parts(model)
    if parts is None:
        out = get_model_state_dict(model)
        _to_checkpoint_names(model, out, None)
        return out
    out: dict[str, Any] = {}
    for part in parts:
        m = get_model_state_dict(part)
        _to_checkpoint_names(part, m, None)
        out.update(m)
    return out


# ------------------------------------------------------------------------------------------------- saving
def save_checkpoint(save_dir: str | Path, iteration: int, *, model, optimizer,
                    trainer_state: dict[str, Any], record: dict[str, Any], info: ParallelInfo,
                    tokenizer_dir: Path | None = None, keep_last: int = 0,
                    log: Callable[[str], None] = print) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Args:
        trainer_state: JSON-able state (iteration, consumed samples, scheduler, skipped steps, ...).
        record: JSON-able facts for the completion record (config, vocabulary, data references).
    """
    save_dir = Path(save_dir)
    path = save_dir / checkpoint_name(iteration)
    if info.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a leftover from an interrupted save of this iteration
            shutil.rmtree(path)
        path.mkdir()
    _barrier(info)
    start = time.perf_counter()
    model_sd, optim_sd = model_and_optimizer_state(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "trainer": json.dumps(trainer_state, sort_keys=True),
             f"rng_rank{info.rank}": rng_state()}
    dcp.save(state, checkpoint_id=str(path), process_group=info.world_group)
    if info.is_main and tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, path / "tokenizer")
    _test_sleep(iteration)
    _barrier(info)
    # Each rank hashes a share of the files, so hashing time does not grow with the world size.
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    mine = {f: {"size": (path / f).stat().st_size, "sha256": sha256_file(path / f)}
            for i, f in enumerate(files) if i % info.world_size == info.rank}
    hashed: dict[str, Any] = {}
    for part in _all_gather(mine, info):
        hashed.update(part)
    if info.is_main:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
                "world_size": info.world_size, "saved_at": time.time(), **record, "files": hashed}
        atomic_write_text(path / RECORD, json.dumps(body, indent=1, sort_keys=True, default=str) + "\n")
        _fsync_dir(path)
        atomic_write_text(save_dir / LATEST, checkpoint_name(iteration) + "\n")
        _fsync_dir(save_dir)
        if keep_last > 0:
            prune(save_dir, keep_last, log)
        log(f"saved checkpoint {path} in {time.perf_counter() - start:.1f}s")
    _barrier(info)
    return path


def _test_sleep(iteration: int) -> None:
    value = os.environ.get(_TEST_SLEEP_ENV)
    if not value:
        return
    when, _, seconds = value.rpartition(":")
    if not when or int(when) == iteration:
        time.sleep(float(seconds))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(save_dir: Path, keep_last: int, log: Callable[[str], None] = print) -> None:
    """Deletes complete checkpoints beyond the newest `keep_last`, and interrupted ones older than those kept."""
    dirs = sorted((p for p in save_dir.iterdir() if p.is_dir() and _iteration_of(p) is not None), key=_iteration_of)
    complete = [p for p in dirs if (p / RECORD).is_file()]
    keep = set(complete[-keep_last:])
    oldest_kept = _iteration_of(min(keep, key=_iteration_of)) if keep else None
    for p in dirs:
        if p in keep:
            continue
        if p in complete or (oldest_kept is not None and _iteration_of(p) < oldest_kept):
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed old checkpoint {p}")


# ------------------------------------------------------------------------------------------------- finding
def check_checkpoint(path: Path, verify: bool, info: ParallelInfo | None = None) -> str | None:
    """None if `path` is a complete, intact checkpoint, else the reason it is not. With `info`, the sha256
    checks are shared among the ranks (collective)."""
    reason = None
    record_path = path / RECORD
    record: dict = {}
    if not record_path.is_file():
        reason = f"{RECORD} is missing (the save was interrupted)"
    else:
        try:
            record = json.loads(record_path.read_text())
            if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
                reason = f"{record_path} is not a version-{FORMAT_VERSION} {FORMAT}"
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = f"{record_path} is corrupt ({err})"
    files = sorted(record.get("files", {}).items()) if reason is None else []
    if reason is None:
        for name, meta in files:
            f = path / name
            if not f.is_file():
                reason = f"{name} is missing"
                break
            if f.stat().st_size != meta["size"]:
                reason = f"{name} is truncated ({f.stat().st_size} bytes, {meta['size']} recorded)"
                break
    if verify:
        rank, size = (info.rank, info.world_size) if info is not None else (0, 1)
        bad = None
        if reason is None:
            for i, (name, meta) in enumerate(files):
                if i % size == rank and sha256_file(path / name) != meta["sha256"]:
                    bad = f"{name} is corrupt (sha256 mismatch)"
                    break
        if info is not None:
            found = [b for b in _all_gather(bad, info) if b]
            bad = found[0] if found else None
        reason = reason or bad
    return reason


def find_resumable(load_dir: str | Path, *, verify: bool, info: ParallelInfo,
                   log: Callable[[str], None] = print) -> Path | None:
    """The newest complete, intact checkpoint under `load_dir` (or `load_dir` itself when it is one), logging
    every newer checkpoint it skips and why. None when there is nothing to resume from (collective)."""
    load_dir = Path(load_dir)
    if (load_dir / RECORD).exists() or _iteration_of(load_dir) is not None:
        candidates = [load_dir]
    elif load_dir.is_dir():
        candidates = sorted((p for p in load_dir.iterdir() if p.is_dir() and _iteration_of(p) is not None),
                            key=_iteration_of, reverse=True)
    else:
        candidates = []
    latest = None
    if (load_dir / LATEST).is_file():
        latest = (load_dir / LATEST).read_text().strip()
    skipped = []
    for path in candidates:
        reason = check_checkpoint(path, verify, info)
        if reason is None:
            for bad, why in skipped:
                log(f"WARNING: checkpoint {bad} is unusable: {why}; falling back to {path.name}")
            if latest and latest != path.name and not skipped:
                log(f"note: {LATEST} names {latest}, resuming from the newer complete {path.name}")
            return path
        skipped.append((path, reason))
    for bad, why in skipped:
        log(f"WARNING: checkpoint {bad} is unusable: {why}")
    if skipped:
        raise RuntimeError(f"no usable checkpoint in {load_dir}: every candidate is incomplete or corrupt")
    return None


def read_record(path: Path) -> dict[str, Any]:
    return json.loads((path / RECORD).read_text())


# ------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: ParallelInfo) -> dict[str, Any] | None:
    """Loads the model (and, with `optimizer`, the optimizer, trainer state and this rank's RNG) in place.
    Returns the trainer state, or None for a model-only load."""
    if optimizer is None:
        state = {"model": model_state(model)}
        dcp.load(state, checkpoint_id=str(path), process_group=info.world_group)
        set_model_and_optimizer_state(model, None, state["model"], None)
        return None
    model_sd, optim_sd = model_and_optimizer_state(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd, "trainer": ""}
    rng_key = f"rng_rank{info.rank}"
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    has_rng = rng_key in metadata.state_dict_metadata
    if has_rng:
        state[rng_key] = rng_state()
    dcp.load(state, checkpoint_id=str(path), process_group=info.world_group)
    set_model_and_optimizer_state(model, optimizer, state["model"], state["optimizer"])
    if has_rng:
        set_rng_state(state[rng_key])
    return json.loads(state["trainer"])


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Single process, no process group: the model weights of a training checkpoint into `model` (for export,
    generation and evaluation)."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    _to_checkpoint_names(model, state["model"], None)  # a tied LM head is stored as the embedding
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(_from_checkpoint_names(model, state["model"], None)[0])
