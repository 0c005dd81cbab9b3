"""One model tensor-parallel over ``tp`` ranks with DeepSpeed AutoTP, one process per rank.

Rank 0 hosts the ModelWorker that serves gRPC. Every call that runs the model is first
broadcast to the other ranks (the serialized request message: bytes, never pickle), so all
ranks enter the same forward passes, whose all-reduces DeepSpeed inserted. The other ranks
run ``follow``: receive, execute on their own shard, repeat, until rank 0 says stop.

On the CPU the ranks all-reduce over gloo (DeepSpeed's shared-memory kernel is kept off:
``_without_shm_all_reduce``); on GPUs, nccl.
"""

import logging
import os
import random
import socket
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from eft_core import EFTError, InvalidArgumentError
from services.pb.eft.v1 import worker_pb2
from services.wire import wire_dtype
from services.worker import convert
from services.worker.api import DraftItem, WorkerLimits
from services.worker.checkpoint import SafetensorsFiles
from services.worker.worker import HostedModel, ModelWorker, load_hosted_model

log = logging.getLogger(__name__)

STOP, EXTEND, DRAFT, TRUNCATE, RELEASE = range(5)
IDLE_TIMEOUT = timedelta(days=7)
_REQUESTS = {EXTEND: worker_pb2.ExtendRequest, DRAFT: worker_pb2.DraftRequest, TRUNCATE: worker_pb2.TruncateRequest, RELEASE: worker_pb2.ReleaseRequest}


def init_rank(rank: int, world_size: int, master_port: int, device: str) -> str:
    """Join the process group as ``rank``; returns this rank's device."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),  # DeepSpeed's CPU accelerator reads it (ENVIRONMENT.md)
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
    )
    deepspeed = _deepspeed()

    on_gpu = device.startswith("cuda")
    if not on_gpu:
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        _without_shm_all_reduce(deepspeed)
    # Followers wait in a broadcast between requests: an idle server must not time out (the
    # default is 10 minutes). A dead rank 0 is still noticed at once: its sockets close.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=IDLE_TIMEOUT)
    return f"cuda:{rank}" if on_gpu else "cpu"


def _deepspeed():
    """DeepSpeed, an extra (only tensor parallelism needs it): its absence is named, with the fix."""
    try:
        import deepspeed
    except ImportError as error:
        raise RuntimeError("tensor parallelism (tp > 1) needs DeepSpeed: pip install 'eft-serve[tp]'") from error
    return deepspeed


def _without_shm_all_reduce(deepspeed) -> None:
    """On CPU, all-reduce through gloo instead of DeepSpeed's shared-memory kernel. That
    kernel is compiled from C++ when the first rank starts (a compiler and ninja on every
    serving image, tens of seconds per start with a new venv), and torch's build lock,
    left behind by a start killed mid-build, makes every later start wait forever: the
    failure that hung CI. CPU tensor parallelism serves tests and small deployments;
    GPUs all-reduce through NCCL and never build it."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def load_tensor_parallel_model(name: str, source: str, tp: int, dtype: torch.dtype, device: str) -> HostedModel:
    """This rank's shard of the model, sharded by DeepSpeed AutoTP (no kernel injection).
    A model AutoTP cannot shard, or whose sharded forward fails, is refused, naming it:
    served wrong would be worse (every rank runs the same trial forward, so its collectives
    match)."""
    try:
        hosted = load_hosted_model(name, source, dtype, device, load=lambda path, dtype: _load_shard(path, tp, dtype, device))
        with torch.inference_mode():
            hosted.model(input_ids=torch.tensor([[0, 1]], device=device), use_cache=False)
    except (RuntimeError, AssertionError) as error:  # AutoTP's refusal, or a sharded forward that cannot run
        model_type = AutoConfig.from_pretrained(source).model_type
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InvalidArgumentError(f"DeepSpeed AutoTP cannot shard {model_type!r} over {tp} ranks ({reason}); serve it at tp 1", field=f"models[{name!r}].tp") from error
    hosted.tensor_parallel_size = tp
    return hosted


def _load_shard(path: str, tp: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Materialise only this rank's shard: build the model on the meta device, let
    ``deepspeed.init_inference`` replace its layers (shapes only, nothing to copy), then read
    each weight from the safetensors files on its own. A layer DeepSpeed splits into
    contiguous parts (``_partition_sizes`` at ``tp_index``: rows of a column-parallel
    linear, columns of a row-parallel one and of the LM head) gets just its part read; any
    other kind of split layer is handed the full weight and cuts it with its own partition
    code. Either way each rank holds what a fully loaded model sharded by DeepSpeed would,
    with at most one full weight in host memory at a time (each goes to ``device`` as it is
    read). Checkpoints without safetensors files, or whose tensor names are not the model's
    (transformers converts those as it loads), load whole first: every rank holds the full
    model for a moment."""
    deepspeed = _deepspeed()

    files = SafetensorsFiles.of(Path(path))
    if files is None:
        log.warning("%s has no safetensors files: every rank loads the whole model before sharding it", path)
        return _load_whole_then_shard(path, tp, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False).module
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # e.g. lm_head.weight -> model.embed_tokens.weight
    name_of = lambda k: k if k in files else tied.get(k, k)  # noqa: E731
    if missing := [k for k, _ in model.named_parameters() if name_of(k) not in files]:
        # transformers converts such checkpoints as it loads (fused experts, renamed heads)
        log.warning("%s names its tensors unlike the model (%s, ...): every rank loads the whole model before sharding it", path, missing[0])
        return _load_whole_then_shard(path, tp, dtype)
    _compute_buffers(model)  # not in the checkpoint (rotary frequencies); DeepSpeed left them allocated, not computed
    for prefix, module in model.named_modules():
        key = lambda n: name_of(f"{prefix}.{n}" if prefix else n)  # noqa: E731
        _load_module(module, key, files, dtype, device)
        for n in module._buffers:
            if (k := f"{prefix}.{n}" if prefix else n) in files:  # a persistent buffer the checkpoint holds
                module._buffers[n] = files.read(k)
    return model


def _load_whole_then_shard(path: str, tp: int, dtype: torch.dtype) -> torch.nn.Module:
    deepspeed = _deepspeed()

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False).module


def _load_module(module: torch.nn.Module, key, files: SafetensorsFiles, dtype: torch.dtype, device: str) -> None:
    """Read a module's own parameters (``key(name)``: its checkpoint name), as its shard."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce, TensorParallel_Layer

    names = [n for n, _ in module.named_parameters(recurse=False)]
    split = {LinearLayer: {"weight": 0, "bias": 0}, LinearAllreduce: {"weight": 1}, LmHeadLinearAllreduce: {"weight": 1}}.get(type(module))
    for n in names:
        dim = split.get(n) if split is not None else None
        if dim is None:
            value = files.read(key(n))
        else:
            sizes = module._partition_sizes
            value = files.read(key(n), dim, sum(sizes[: module.tp_index]), sizes[module.tp_index])
        setattr(module, n, torch.nn.Parameter(value.to(device, dtype), requires_grad=False))
    if names and split is None and isinstance(module, TensorParallel_Layer):
        module._tp_partition([module.weight, getattr(module, "bias", None)])


def _compute_buffers(model: torch.nn.Module) -> None:
    """Compute the non-persistent buffers as the model's class initialises them."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            for n in module._non_persistent_buffers_set:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            model._init_weights(module)


class TensorParallelWorker(ModelWorker):
    """Rank 0's worker: broadcasts each model-running call before running it itself."""

    def extend(self, items, logits_dtype=None):
        with self._serving():
            _broadcast(EXTEND, convert.extend_request(items, logits_dtype))
            return self._extend(items, logits_dtype)

    def draft(self, items):
        items = [_with_seed(item) for item in items]  # every rank must draw the same drafts
        with self._serving():
            _broadcast(DRAFT, convert.draft_request(items))
            return self._draft(items)

    def truncate(self, session_id, model, length):
        with self._serving():
            _broadcast(TRUNCATE, worker_pb2.TruncateRequest(session_id=session_id, model=model, length=length))
            return self._truncate(session_id, model, length)

    def _release_everywhere(self, session_ids):  # called with the lock held
        _broadcast(RELEASE, worker_pb2.ReleaseRequest(session_ids=session_ids))
        return self._release(session_ids)

    def stop_followers(self) -> None:
        with self._serving():
            _broadcast(STOP, None)


def follow(worker: ModelWorker) -> None:
    """Ranks > 0: execute what rank 0 broadcasts until it says stop."""
    while True:
        opcode, request = _receive()
        if opcode == STOP:
            return
        try:
            if opcode == EXTEND:
                worker._extend(convert.extend_items_from_proto(request), wire_dtype(request.logits_dtype))
            elif opcode == DRAFT:
                worker._draft(convert.draft_items_from_proto(request))
            elif opcode == TRUNCATE:
                worker._truncate(request.session_id, request.model, request.length)
            elif opcode == RELEASE:
                worker._release(list(request.session_ids))
        except EFTError:
            pass  # rank 0 refused the same call the same way and told its client


def start_tensor_parallel_worker(name: str, path: str, tp: int, dtype_name: str, device: str, limits: WorkerLimits) -> tuple["TensorParallelWorker", list[subprocess.Popen]]:
    """Become rank 0 of a ``tp``-rank group for one model: start ranks 1..tp-1 as processes
    (``python -m services.worker.server ... --rank r``), join them, shard, and return the
    worker to serve and the follower processes."""
    from services.wire import DTYPE_NAMES

    master_port = _free_port()
    command = [
        sys.executable, "-m", "services.worker.server", "--model", f"{name}={path}", "--tp", str(tp), "--dtype", dtype_name,
        "--device", device, *limits.flags(), "--master-port", str(master_port),
    ]  # fmt: skip
    followers = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.DEVNULL) for rank in range(1, tp)]
    rank_device = init_rank(0, tp, master_port, device)
    hosted = load_tensor_parallel_model(name, path, tp, DTYPE_NAMES[dtype_name], rank_device)
    return TensorParallelWorker([hosted], limits), followers


def run_follower(name: str, path: str, tp: int, rank: int, master_port: int, dtype_name: str, device: str, limits: WorkerLimits) -> None:
    """Ranks > 0: join, shard, and follow rank 0 until it stops."""
    from services.wire import DTYPE_NAMES

    rank_device = init_rank(rank, tp, master_port, device)
    hosted = load_tensor_parallel_model(name, path, tp, DTYPE_NAMES[dtype_name], rank_device)
    follow(ModelWorker([hosted], limits))  # the same limits: every rank must chunk a call into the same forwards


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _broadcast(opcode: int, message) -> None:
    payload = message.SerializeToString() if message is not None else b""
    header = torch.tensor([opcode, len(payload)], dtype=torch.int64)
    dist.broadcast(header, src=0)
    if payload:
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0)


def _receive():
    header = torch.zeros(2, dtype=torch.int64)
    dist.broadcast(header, src=0)
    opcode, size = int(header[0]), int(header[1])
    if opcode == STOP:
        return STOP, None
    payload = torch.empty(size, dtype=torch.uint8)
    if size:
        dist.broadcast(payload, src=0)
    return opcode, _REQUESTS[opcode].FromString(payload.numpy().tobytes())


def _with_seed(item: DraftItem) -> DraftItem:
    if item.sampling.seed is not None:
        return item
    return replace(item, sampling=replace(item.sampling, seed=random.getrandbits(63)))
