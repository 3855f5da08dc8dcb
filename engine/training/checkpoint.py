"""Training checkpoints: pickle-free DCP shards (safetensors + JSON) and a completion record written last.

    SAVE/
      latest                     "iter_0000200\\n", replaced atomically once iter_0000200 is complete
      iter_0000200/
        owner.json               written first: {"run_id", "iteration"}; an interrupted save still has an owner
        shard-00001-model-00001-of-00001.safetensors ...
                                 torch.distributed.checkpoint through HuggingFaceStorageWriter: every rank writes
                                 its shards of the model and optimizer tensors; the sharding offsets are JSON in
                                 the safetensors header
        state.json               trainer state and the optimizer's non-tensor items (hyper-parameters per parameter)
        rng/rank_00000.json ...  each rank's Python, NumPy, torch (and CUDA) RNG state
        tokenizer/               copy of the shards' tokenizer (load with engine.tokenizer.load_saved_tokenizer)
        chrysalis_train.json     written last by rank 0: iteration, run id, config, model config, vocabulary,
                                 data references, and size + sha256 of every other file

Nothing read from a checkpoint can run code: tensors come from safetensors, everything else from JSON, and the DCP
metadata is rebuilt from the safetensors headers by `HuggingFaceStorageReader` (DCP's default `FileSystemReader`
unpickles `.metadata`; it is never used). A directory holding pickled DCP files (`.metadata`, `*.distcp`) or any
file its record does not list is refused before anything in it is read.

No finished work is lost: a run prunes (`--keep-last`) only checkpoints it wrote (the run id in `owner.json`);
a checkpoint name already taken by another run gets the run id as a suffix (`iter_0000200-1a2b3c4d`); a complete
checkpoint of this run is replaced only after its replacement is complete (written beside it, then renamed).
Resuming follows `latest` (validated), falling back to older checkpoints of the same run; without a usable `latest`
it takes the most recently saved complete checkpoint. DCP reshards on load, so a run saved with N processes in
one layout (DDP, FSDP2, TP, PP) resumes with M processes in another.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from engine.checkpoint_io import CheckpointError, atomic_write_text, json_refusal, read_json, sha256_file
from engine.training import vocab_padding
from engine.training.parallel import ParallelInfo

FORMAT = "chrysalis-training-checkpoint"
FORMAT_VERSION = 2
RECORD = "chrysalis_train.json"
LATEST = "latest"
OWNER = "owner.json"
STATE = "state.json"
RNG_DIR = "rng"
PICKLED_SUFFIXES = (".metadata", ".distcp", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_NAME = re.compile(r"^iter_(\d{7,})(?:-([0-9a-f]{8}))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Test-only: "SECONDS" or "ITERATION:SECONDS" to sleep after the DCP files are written and before the completion
# record (of every save, or of the save of ITERATION), so a test can SIGKILL the trainer in the middle of a save.
_TEST_SLEEP_ENV = "CHRYSALIS_TEST_SLEEP_IN_SAVE"

__all__ = ["FORMAT", "FORMAT_VERSION", "LATEST", "RECORD", "CheckpointError", "check_checkpoint", "checkpoint_name",
           "find_resumable", "load_checkpoint", "load_model_weights", "model_config_mismatches", "new_run_id",
           "prune", "read_record", "resume_run_id", "save_checkpoint"]


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def new_run_id() -> str:
    return uuid.uuid4().hex


def _iteration_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def holds_training_checkpoints(directory: str | Path) -> bool:
    """Whether `directory` holds training checkpoints (`latest` or an `iter_*`): a model-only checkpoint folder
    that a run also saves into (`--load M --save M`) is resumed from those on the next launch, not restarted."""
    directory = Path(directory)
    return (directory / LATEST).is_file() or bool(_checkpoint_dirs(directory))


def _checkpoint_dirs(save_dir: Path) -> list[Path]:
    if not save_dir.is_dir():
        return []
    return [p for p in save_dir.iterdir() if p.is_dir() and _iteration_of(p) is not None]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes a single process; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(info: ParallelInfo) -> None:
    if info.mesh is not None:
        dist.barrier(group=info.world_group)


def _broadcast(obj: Any, info: ParallelInfo) -> Any:
    if info.mesh is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.world_group)
    return box[0]


def _all_gather(obj: Any, info: ParallelInfo | None) -> list[Any]:
    """In-memory objects of this job's own processes (never anything read from a checkpoint file)."""
    if info is None or info.mesh is None:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.world_group)
    return out


def _raise_together(problem: str | None, info: ParallelInfo | None) -> None:
    """Every rank raises when any rank found a problem (instead of the others hanging in the next collective)."""
    found = [p for p in _all_gather(problem, info) if p]
    if found:
        raise CheckpointError(found[0])


# ------------------------------------------------------------------------------------------------- RNG as JSON
def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((str(n["kind"]), np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


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


def set_model_and_optimizer_state(model, optimizer, model_sd: dict, optim_sd: dict | None,
                                  strict: bool = True) -> None:
    parts = _parts(model)
    model_options = StateDictOptions(strict=strict)
    if parts is None:
        model_sd, optim_sd = _from_checkpoint_names(model, model_sd, optim_sd)
        if optim_sd is None:
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=model_options)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_FLAT)
        return
    for part, opt in zip(parts, _optimizers(optimizer, len(parts)) if optimizer is not None else [None] * len(parts)):
        own = set(part.state_dict())
        part_model_sd, part_optim_sd = _from_checkpoint_names(part, model_sd, optim_sd)
        part_model = {k: v for k, v in part_model_sd.items() if k in own}
        if opt is None or optim_sd is None:
            set_state_dict(part, [], model_state_dict=part_model, optim_state_dict={}, options=model_options)
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


def _split_tensors(optim_sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor items, JSON-able items) of a flattened optimizer state dict."""
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    other = {k: _jsonable(v, k) for k, v in optim_sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, other


def _jsonable(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    raise TypeError(f"optimizer item {key!r} of type {type(value).__name__} cannot be saved as JSON")


def _restore_like(value: Any, template: Any) -> Any:
    """A JSON value with the Python type of the optimizer's current value (tuples, non-finite floats)."""
    if isinstance(template, tuple) and isinstance(value, list) and len(value) == len(template):
        return tuple(_restore_like(v, t) for v, t in zip(value, template))
    if isinstance(template, float) and isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(template, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _same_kind(value: Any, template: Any) -> bool:
    """Whether a restored optimizer item has the shape and type of this run's (numbers count as one kind)."""
    if isinstance(template, (tuple, list)):
        return (type(value) is type(template) and len(value) == len(template)
                and all(map(_same_kind, value, template)))
    if template is None:
        return True
    if isinstance(template, (bool, str)):
        return type(value) is type(template)
    if isinstance(template, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


# ------------------------------------------------------------------------------------------------- saving
def _owner(path: Path) -> str | None:
    """The run id that wrote checkpoint directory `path` (owner.json, else its record), or None if unknown."""
    for name in (OWNER, RECORD):
        try:
            data = json.loads((path / name).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8 or not JSON (or nested too deeply)
            continue
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            return data["run_id"]
    return None


def _plan_save(save_dir: Path, iteration: int, run_id: str, log: Callable[[str], None]) -> tuple[str, Path,
                                                                                                   Path | None]:
    """Rank 0: (checkpoint name, directory to write into, complete checkpoint of this run it replaces or None).
    Another run's directory is never touched: its name gets this run's id as a suffix."""
    name = checkpoint_name(iteration)
    path = save_dir / name
    if path.exists() and _owner(path) != run_id:
        name = f"{name}-{run_id[:8]}"
        path = save_dir / name
        if path.exists() and _owner(path) != run_id:
            raise CheckpointError(f"cannot save iteration {iteration}: {save_dir / checkpoint_name(iteration)} and "
                                  f"{path} belong to other runs")
    if not path.exists():
        return name, path, None
    if (path / RECORD).is_file():  # complete: replaced only once the new one is complete
        staging = save_dir / f"{name}.saving"
        if staging.exists():
            shutil.rmtree(staging)
        return name, staging, path
    log(f"removing {path}: an interrupted save of this run")
    shutil.rmtree(path)
    return name, path, None


def save_checkpoint(save_dir: str | Path, iteration: int, *, model, optimizer,
                    trainer_state: dict[str, Any], record: dict[str, Any], info: ParallelInfo, run_id: str,
                    tokenizer_dir: Path | None = None, keep_last: int = 0,
                    log: Callable[[str], None] = print) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    Args:
        trainer_state: JSON-able state (iteration, consumed samples, scheduler, skipped steps, ...).
        record: JSON-able facts for the completion record (config, vocabulary, data references).
        run_id: this run's id (`new_run_id()`, or `resume_run_id()` of the checkpoint it resumed); pruning only
            touches checkpoints with this id.
    """
    save_dir = Path(save_dir)
    plan = None
    if info.is_main:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            name, target, replaces = _plan_save(save_dir, iteration, run_id, log)
            target.mkdir()
            (target / RNG_DIR).mkdir()
            atomic_write_text(target / OWNER, json.dumps({"run_id": run_id, "iteration": iteration,
                                                          "started_at": time.time()}) + "\n")
            plan = (name, str(target), str(replaces) if replaces else None)
        except (OSError, CheckpointError) as err:
            plan = f"cannot save a checkpoint in {save_dir}: {err}"
    plan = _broadcast(plan, info)
    if isinstance(plan, str):
        raise CheckpointError(plan)
    name, target, replaces = plan[0], Path(plan[1]), Path(plan[2]) if plan[2] else None
    start = time.perf_counter()
    model_sd, optim_sd = model_and_optimizer_state(model, optimizer)
    optim_tensors, optim_other = _split_tensors(optim_sd)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optimizer": optim_tensors},
                 storage_writer=HuggingFaceStorageWriter(str(target), save_distributed=True),
                 process_group=info.world_group, no_dist=info.mesh is None)
    atomic_write_text(target / RNG_DIR / f"rank_{info.rank:05d}.json", json.dumps(rng_state()) + "\n")
    merged: dict[str, Any] = {}
    for items in _all_gather(optim_other, info):
        merged.update(items)
    if info.is_main:
        state = {"trainer": trainer_state, "optimizer_items": merged}
        atomic_write_text(target / STATE, json.dumps(state, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, target / "tokenizer")
    _test_sleep(iteration)
    _barrier(info)
    # Each rank hashes a share of the files, so hashing time does not grow with the world size.
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    mine = {f: {"size": (target / f).stat().st_size, "sha256": sha256_file(target / f)}
            for i, f in enumerate(files) if i % info.world_size == info.rank}
    hashed: dict[str, Any] = {}
    for part in _all_gather(mine, info):
        hashed.update(part)
    if info.is_main:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration, "run_id": run_id,
                "name": name, "world_size": info.world_size, "saved_at": time.time(), **record, "files": hashed}
        atomic_write_text(target / RECORD, json.dumps(body, indent=1, sort_keys=True, default=str) + "\n")
        _fsync_dir(target)
        final = save_dir / name
        if replaces is not None:  # the new checkpoint is complete: only now does the old one go
            old = save_dir / f"{name}.replaced"
            if old.exists():
                shutil.rmtree(old)
            os.replace(replaces, old)
            os.replace(target, final)
            _fsync_dir(save_dir)
            shutil.rmtree(old, ignore_errors=True)
            log(f"replaced {final} (an earlier save of this iteration by this run)")
        atomic_write_text(save_dir / LATEST, name + "\n")
        _fsync_dir(save_dir)
        if keep_last > 0:
            prune(save_dir, keep_last, run_id, log, protect=final)
        log(f"saved checkpoint {final} in {time.perf_counter() - start:.1f}s")
    _barrier(info)
    return save_dir / name


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


def prune(save_dir: Path, keep_last: int, run_id: str, log: Callable[[str], None] = print,
          protect: Path | None = None) -> None:
    """Deletes this run's complete checkpoints beyond its newest `keep_last`, and its interrupted saves older than
    those kept. Checkpoints of other runs (other ids, or no owner) are never touched."""
    mine = sorted((p for p in _checkpoint_dirs(save_dir) if _owner(p) == run_id), key=_iteration_of)
    complete = [p for p in mine if (p / RECORD).is_file()]
    keep = set(complete[-keep_last:])
    if protect is not None:
        keep.add(protect)
    oldest_kept = min(_iteration_of(p) for p in keep) if keep else None
    for p in mine:
        if p in keep:
            continue
        if p in complete or (oldest_kept is not None and _iteration_of(p) < oldest_kept):
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed old checkpoint {p}")


# ------------------------------------------------------------------------------------------------- records
def _record_problem(record: Any, record_path: Path) -> str | None:
    """None if `record` is a well-formed completion record, else a one-line reason naming the field."""
    if not isinstance(record, dict):
        return f"{record_path} holds a JSON {type(record).__name__}, not an object"
    if record.get("format") != FORMAT:
        return f"{record_path}: format is {record.get('format')!r}, not {FORMAT!r}"
    version = record.get("format_version")
    if version == 1:
        return (f"{record_path}: format_version 1 (DCP with a pickled .metadata) is refused: Chrysalis never "
                "unpickles checkpoint files (export it to a model-only checkpoint with the Chrysalis version that "
                "wrote it, or retrain)")
    if version != FORMAT_VERSION:
        return f"{record_path}: format_version {version!r} is not supported (this Chrysalis reads {FORMAT_VERSION})"
    if not isinstance(record.get("iteration"), int) or record["iteration"] < 0:
        return f"{record_path}: 'iteration' is missing or not a non-negative integer"
    if not isinstance(record.get("model"), dict):
        return f"{record_path}: 'model' (the model config) is missing or not an object"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return f"{record_path}: 'files' is missing or not a non-empty object"
    for name, meta in files.items():
        where = f"{record_path}: files[{name!r}]"
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
            return f"{where}: not a relative path inside the checkpoint"
        if not isinstance(meta, dict):
            return f"{where} is a JSON {type(meta).__name__}, not an object"
        if not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool) or meta["size"] < 0:
            return f"{where} has no integer \"size\""
        if not isinstance(meta.get("sha256"), str) or not _SHA256.match(meta["sha256"]):
            return f"{where} has no valid \"sha256\""
    return None


def _load_record(path: Path) -> tuple[dict | None, str | None]:
    record_path = path / RECORD
    if not record_path.is_file():
        return None, f"{RECORD} is missing (the save was interrupted)"
    try:
        record = json.loads(record_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        return None, f"{record_path} is not valid UTF-8 (byte {err.start})"
    except json.JSONDecodeError as err:
        return None, f"{record_path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except (ValueError, RecursionError) as err:  # valid syntax json refuses: nesting, an integer of 5,000 digits
        return None, f"{record_path} is not usable JSON ({json_refusal(err)})"
    except OSError as err:
        return None, f"{record_path} cannot be read ({err.strerror})"
    problem = _record_problem(record, record_path)
    return (None, problem) if problem else (record, None)


def open_for_reading(load: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint path, completion record) of the checkpoint a single process reads under `load` (export,
    generation): the one `find_resumable` would resume from, sha256-verified. FileNotFoundError naming `load` when
    there is nothing there."""
    from engine.training.parallel import ParallelInfo

    if not Path(load).exists():
        raise FileNotFoundError(f"--load {load}: no such file or directory")
    path = find_resumable(load, verify=True, info=ParallelInfo(mesh=None, device=torch.device("cpu")),
                          log=lambda message: print(message, file=sys.stderr))
    if path is None:
        raise FileNotFoundError(f"--load {load}: no training checkpoint there")
    return path, read_record(path)


class MetaQueryCheckpointError(CheckpointError):
    """A MetaQuery checkpoint where a VPiT model is read (callers may name their own flag and command)."""


def refuse_metaquery_record(path: Path, record: dict[str, Any], what: str) -> None:
    """A MetaQuery checkpoint (queries + connector on a frozen LLM) given where a VPiT model is read: one line
    naming the commands that take it (it failed on the record's unknown model fields, one line each)."""
    if record.get("recipe") == "metaquery":
        raise MetaQueryCheckpointError(f"{path} is a MetaQuery checkpoint (learnable queries and a connector on a frozen LLM, "
                              f"not a VPiT model), so {what} cannot use it: resume it with `pretrain_gpt_vision.py "
                              "--recipe metaquery --load ...`, render with `python -m engine.generate --recipe "
                              "metaquery --load ...`")


def read_record(path: Path) -> dict[str, Any]:
    """The validated completion record of checkpoint `path`; CheckpointError (one line) if it is unusable."""
    record, problem = _load_record(Path(path))
    if problem:
        raise CheckpointError(f"{path}: {problem}" if RECORD not in problem else problem)
    return record


def check_checkpoint(path: Path, verify: bool, info: ParallelInfo | None = None) -> str | None:
    """None if `path` is a complete, intact checkpoint, else the reason it is not. With `info`, the sha256
    checks are shared among the ranks (collective)."""
    record, reason = _load_record(path)
    files = sorted(record["files"].items()) if record else []
    if reason is None:
        # Only regular files and directories: a symlink could lead the readers outside the checkpoint (rglob does
        # not even descend into a linked directory), a FIFO would block them forever.
        odd = next((p for p in sorted(path.rglob("*")) if p.is_symlink() or not (p.is_file() or p.is_dir())), None)
        present = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != RECORD)
        pickled = [f for f in present if f.endswith(PICKLED_SUFFIXES)]
        unlisted = sorted(set(present) - set(record["files"]))
        if odd is not None:
            kind = "a symbolic link" if odd.is_symlink() else "not a regular file or directory"
            reason = f"{odd} is {kind}: refused (a checkpoint holds only its own regular files)"
        elif pickled:
            reason = f"{path / pickled[0]} is a pickle-format file: refused (checkpoints are safetensors + JSON only)"
        elif unlisted:
            reason = f"{path / unlisted[0]} is not listed in {RECORD}: refused (added after the save?)"
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
        found = [b for b in _all_gather(bad, info) if b]
        reason = reason or (found[0] if found else None)
    return reason


# ------------------------------------------------------------------------------------------------- finding
def _read_latest(load_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The checkpoint `latest` names, or None (with a warning) when it is unreadable or names nothing."""
    latest = load_dir / LATEST
    if not latest.is_file():
        return None
    raw = latest.read_bytes()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        log(f"WARNING: {latest} is not valid UTF-8 (byte {err.start}); ignoring it and choosing by save time")
        return None
    if not _NAME.match(text):
        log(f"WARNING: {latest} holds {text[:80]!r}, not a checkpoint name; ignoring it and choosing by save time")
        return None
    if not (load_dir / text).is_dir():
        log(f"WARNING: {latest} names {text}, which does not exist; ignoring it and choosing by save time")
        return None
    return load_dir / text


def _saved_at(path: Path) -> float:
    record, _ = _load_record(path)
    if record and isinstance(record.get("saved_at"), (int, float)):
        return float(record["saved_at"])
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def find_resumable(load_dir: str | Path, *, verify: bool, info: ParallelInfo,
                   log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from under `load_dir` (or `load_dir` itself when it is one), logging every
    checkpoint it skips and why. None when there is nothing to resume from; CheckpointError when there are
    checkpoints and none is usable (collective).

    With a valid `latest`: the checkpoints of the run that wrote it, newest iteration first (a newer complete one
    is used: the save finished and only `latest` was not updated). Without one: every checkpoint, most recently
    saved first. Checkpoint numbers of different runs are never compared.
    """
    load_dir = Path(load_dir)
    others = 0
    if (load_dir / RECORD).exists() or _iteration_of(load_dir) is not None:
        candidates = [load_dir]
        latest = None
    else:
        dirs = _checkpoint_dirs(load_dir)
        latest = _read_latest(load_dir, log)
        run = _owner(latest) if latest is not None else None
        if run is not None:
            same_run = [p for p in dirs if p == latest or _owner(p) == run]
            candidates = sorted(same_run, key=lambda p: (_iteration_of(p), p == latest), reverse=True)
            others = len(dirs) - len(same_run)
        else:  # no valid latest, or one whose run cannot be read: every checkpoint, most recently saved first
            candidates = sorted(dirs, key=_saved_at, reverse=True)
            if latest is not None:
                candidates = [latest] + [p for p in candidates if p != latest]
    skipped = []
    for path in candidates:
        reason = check_checkpoint(path, verify, info)
        if reason is None:
            for bad, why in skipped:
                log(f"WARNING: checkpoint {bad} is unusable: {why}; falling back to {path.name}")
            if latest is not None and path != latest and not skipped:
                log(f"note: {LATEST} names {latest.name}; resuming from the newer complete {path.name} of the "
                    "same run")
            return path
        skipped.append((path, reason))
    for bad, why in skipped:
        log(f"WARNING: checkpoint {bad} is unusable: {why}")
    if skipped:
        newest, why = skipped[0]
        hint = (f"; {others} checkpoint(s) of other runs are not considered: pass one as --load {load_dir}/iter_..."
                if others else "")
        raise CheckpointError(f"no usable checkpoint in {load_dir}: all {len(skipped)} candidate(s) are incomplete "
                              f"or corrupt (newest {newest.name}: {why}){hint}")
    return None


def resume_run_id(path: Path) -> str | None:
    """The run id a run resuming from `path` continues with, or None (start a new id) when `path` has none or a
    newer complete checkpoint of its run exists: resuming from an older one branches, and the branch must not
    overwrite or prune the newer ones."""
    run = _owner(path)
    if run is None or path.parent is None:
        return None
    iteration = _iteration_of(path)
    for other in _checkpoint_dirs(path.parent):
        if other != path and _owner(other) == run and (other / RECORD).is_file() and \
                (_iteration_of(other) or 0) > (iteration or 0):
            return None
    return run


# ------------------------------------------------------------------------------------------------- comparing
def model_config_mismatches(saved: dict[str, Any], current, source: str) -> list[str]:
    """One line per architecture field that differs between a checkpoint's model config and this run's
    (`engine.config.ModelConfig`); fields such as seq_length or attention_backend may change."""
    from engine.config import ARCHITECTURE_FIELDS, ModelConfig

    if not isinstance(saved, dict):
        return [f"{source}: the recorded model config is not an object"]
    mine = current.to_dict()
    unknown = sorted(set(saved) - set(mine))
    lines = [f"{source}: model config field {name!r} is unknown to this Chrysalis" for name in unknown]
    try:
        saved_config = ModelConfig.from_dict({k: v for k, v in saved.items() if k in mine}).to_dict()
    except (TypeError, ValueError) as err:
        return [*lines, f"{source}: the recorded model config is invalid ({' '.join(str(err).split())})"]
    for name in ARCHITECTURE_FIELDS:
        if name == "vocab_size":  # the padding may differ (another TP size): vocabulary rows adapt on load
            saved_real, real = vocab_padding.real_vocab_of(saved_config), current.num_real_tokens
            if saved_real != real:
                lines.append(f"{source}: the vocabulary has {saved_real} real tokens in the checkpoint but {real} "
                             "in this run (another tokenizer)")
            continue
        if saved_config.get(name) != mine.get(name):
            flag = "--" + name.replace("_", "-")
            lines.append(f"{source}: model field {name} is {saved_config.get(name)!r} in the checkpoint but "
                         f"{mine.get(name)!r} in this run ({flag})")
    return lines


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """fqn -> global shape of every tensor in the checkpoint, from the safetensors headers (JSON)."""
    try:
        metadata = HuggingFaceStorageReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 (a corrupt header: safetensors raises several types)
        raise CheckpointError(f"{path}: cannot read the tensor index from the safetensors headers ({err})") from None
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def _tensor_problems(expected: dict[str, Any], stored: dict[str, tuple[int, ...]], prefix: str,
                     partial: bool) -> tuple[list[str], list[str]]:
    """(problems, names left initialised) for loading `expected` (name -> tensor) from `stored`."""
    problems, missing = [], []
    for name, tensor in expected.items():
        shape = stored.get(prefix + name)
        if shape is None:
            missing.append(name)
        elif tuple(shape) != tuple(tensor.shape):
            problems.append(f"tensor {name} has shape {list(shape)} in the checkpoint, {list(tensor.shape)} in "
                            "this model")
    if len(problems) > 10:  # another --hidden-size mis-shapes every tensor: 40 of them made a 6 KB line
        problems[10:] = [f"... and {len(problems) - 10} more mis-shaped tensors"]
    if missing and not partial:
        problems += [f"tensor {name} is missing from the checkpoint" for name in missing[:10]]
        if len(missing) > 10:
            problems.append(f"... and {len(missing) - 10} more missing tensors")
    return problems, missing


def _saved_state(path: Path) -> dict[str, Any]:
    state = read_json(path / STATE)
    if not isinstance(state, dict) or not isinstance(state.get("trainer"), dict) \
            or not isinstance(state.get("optimizer_items"), dict):
        raise CheckpointError(f"{path / STATE}: expected an object with 'trainer' and 'optimizer_items'")
    trainer = state["trainer"]
    for key in ("iteration", "consumed_samples", "skipped_total", "consecutive_skipped", "global_batch_size"):
        value = trainer.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path / STATE}: trainer.{key} is {value!r}, not a non-negative integer")
    for key in ("iteration", "consumed_samples"):
        if key not in trainer:
            raise CheckpointError(f"{path / STATE}: trainer.{key} is missing")
    schedule = trainer.get("schedule")
    if not isinstance(schedule, dict) or not isinstance(schedule.get("step_count"), int):
        raise CheckpointError(f"{path / STATE}: trainer.schedule is not an object with an integer 'step_count'")
    return state


def _load_tensors(path: Path, state: dict[str, dict[str, Any]], info: ParallelInfo | None,
                  partial: bool = False) -> None:
    """dcp.load of {"model": ..., "optimizer": ...} in place, through the pickle-free reader."""
    no_dist = info is None or info.mesh is None
    with _quiet_single_process():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)),
                 process_group=None if no_dist else info.world_group,
                 planner=DefaultLoadPlanner(allow_partial_load=partial), no_dist=no_dist)


# ------------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: ParallelInfo, partial: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Loads the model (and, with `optimizer`, the optimizer, trainer state and this rank's RNG) in place.
    Returns the trainer state, or None for a model-only load.

    Args:
        partial: model-only loads: tensors the checkpoint lacks keep their initial values and are listed (the
            default refuses them); checkpoint tensors the model lacks are ignored and listed.
    """
    path = Path(path)
    stored = _stored_shapes(path)
    saved_state = _saved_state(path)
    partial = partial and optimizer is None
    model_sd, optim_sd = (model_state(model), None) if optimizer is None else model_and_optimizer_state(model, optimizer)
    # Vocabulary matrices saved with another padding (another TP size): load the stored rows, keep the real ones.
    vocab_rows = vocab_padding.swap_in_stored_rows(model_sd, stored, "model.")
    optim_vocab_rows: list = []
    problems, missing = _tensor_problems(model_sd, stored, "model.", partial)
    optim_tensors: dict[str, Any] = {}
    optim_other: dict[str, Any] = {}
    saved_items = saved_state["optimizer_items"]
    if optim_sd is not None:
        optim_tensors, optim_other = _split_tensors(optim_sd)
        optim_vocab_rows = vocab_padding.swap_in_stored_rows(optim_tensors, stored, "optimizer.")
        more, _ = _tensor_problems(optim_tensors, stored, "optimizer.", False)
        problems += [p.replace("tensor ", "optimizer tensor ", 1) for p in more]
        problems += [f"optimizer item {k} is missing from {STATE}" for k in optim_other if k not in saved_items][:10]
    names = set(model_sd)
    for part in _all_gather(sorted(names), info):
        names.update(part)
    unused = sorted(k[len("model."):] for k in stored if k.startswith("model.") and k[len("model."):] not in names)
    if unused and not partial:
        problems += [f"checkpoint tensor {name} has no place in this model" for name in unused[:10]]
        if len(unused) > 10:
            problems.append(f"... and {len(unused) - 10} more unexpected tensors")
    _raise_together(f"{path} does not fit this model: " + "; ".join(problems) if problems else None, info)

    if optimizer is None:
        state = {"model": {k: v for k, v in model_sd.items() if k not in missing}}
        _load_tensors(path, state, info, partial=partial)
        vocab_padding.copy_back(vocab_rows, state["model"])
        set_model_and_optimizer_state(model, None, state["model"], None, strict=not partial)
        if partial and info.is_main:
            for name in missing:
                log(f"--load-partial: {name} is not in {path}: left initialised")
            for name in unused:
                log(f"--load-partial: {name} of {path} is not used by this model")
        return None

    state = {"model": model_sd, "optimizer": optim_tensors}
    _load_tensors(path, state, info)
    vocab_padding.copy_back(vocab_rows, state["model"])
    vocab_padding.copy_back(optim_vocab_rows, state["optimizer"])
    items = {k: _restore_like(saved_items[k], v) for k, v in optim_other.items()}
    for k, v in optim_other.items():  # a hand-edited state.json: one line naming the item, not a step that fails
        if not _same_kind(items[k], v):
            raise CheckpointError(f"{path / STATE}: optimizer item {k} is {saved_items[k]!r}, not like this run's "
                                  f"{v!r}")
    _keep_this_runs_hyperparameters(items, optim_other, path, log if info.is_main else None)
    set_model_and_optimizer_state(model, optimizer, state["model"], {**state["optimizer"], **items})
    rng_file = path / RNG_DIR / f"rank_{info.rank:05d}.json"
    if rng_file.is_file():
        rng = read_json(rng_file)
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{rng_file}: not a valid RNG state ({err})") from None
    return saved_state["trainer"]




_HYPERPARAMETER_FLAGS = {"weight_decay": "--weight-decay", "betas": "--adam-beta1/--adam-beta2", "eps": "--adam-eps"}


def _keep_this_runs_hyperparameters(items: dict[str, Any], current: dict[str, Any], path: Path,
                                    log: Callable[[str], None] | None) -> None:
    """A resumed optimizer keeps its moments and step counts, but its param-group settings (weight decay, betas,
    eps, foreach/fused) are this run's flags, as for --lr (which the schedule sets every step); restoring the
    checkpoint's silently ignored `--weight-decay 0.05` given on a resume. Each flag that changed gets one note.
    `lr` stays as restored: the schedule overwrites it before the next step."""
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in current.items():
        name = key.rsplit(".", 1)[-1]
        if not key.startswith("param_groups.") or name == "lr":
            continue
        if name in _HYPERPARAMETER_FLAGS and items[key] != value:
            changed.setdefault(name, (items[key], value))
        items[key] = value
    if log is not None:
        for name, (saved, now) in changed.items():
            log(f"note: {_HYPERPARAMETER_FLAGS[name]}: using this run's {name} {now!r} (the checkpoint {path} was "
                f"trained with {saved!r})")


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Single process, no process group: the model weights of a training checkpoint into `model` (for export,
    generation and evaluation). Every tensor must be present with its shape, but for the number of vocabulary
    rows (a padding of another TP size: the shared rows are loaded)."""
    path = Path(path)
    stored = _stored_shapes(path)
    state = {"model": model_state(model)}
    vocab_rows = vocab_padding.swap_in_stored_rows(state["model"], stored, "model.")
    problems, _ = _tensor_problems(state["model"], stored, "model.", False)
    unused = sorted(k for k in stored if k.startswith("model.") and k[len("model."):] not in state["model"])
    problems += [f"checkpoint tensor {k[len('model.'):]} has no place in this model" for k in unused[:10]]
    if problems:
        raise CheckpointError(f"{path} does not fit its recorded model config: " + "; ".join(problems))
    _load_tensors(path, state, None)
    vocab_padding.copy_back(vocab_rows, state["model"])
    set_model_and_optimizer_state(model, None, state["model"], None)
