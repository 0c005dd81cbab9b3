"""Conversion between the worker's Python values and eft.v1 messages, at the edge only."""

import torch

from eft_core import EFTError, InvalidArgumentError, SamplingParams
from eft_core.errors import require
from services.errors import error_from_status, status_number
from services.pb.eft.v1 import worker_pb2
from services.wire import dtype_enum, from_wire, tensor_payloads, to_wire
from services.worker.api import DraftItem, Drafted, DraftQ, ExtendItem, Extended, ModelInfo, WorkerInfo

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


def extend_items_from_proto(request: worker_pb2.ExtendRequest) -> list[ExtendItem]:
    return [ExtendItem(i.session_id, i.model, list(i.token_ids), i.num_logits, _truncate_to(i)) for i in request.items]


def _truncate_to(item) -> int | None:
    return item.truncate_to if item.HasField("truncate_to") else None


def extend_request(items: list[ExtendItem], logits_dtype: torch.dtype | None = None) -> worker_pb2.ExtendRequest:
    return worker_pb2.ExtendRequest(
        items=[worker_pb2.ExtendItem(session_id=i.session_id, model=i.model, token_ids=i.token_ids, num_logits=i.num_logits, truncate_to=i.truncate_to) for i in items],
        logits_dtype=dtype_enum(logits_dtype),
    )


def extend_response(results: list[Extended | EFTError], logits_dtype: torch.dtype | None = None) -> worker_pb2.ExtendResponse:
    failed = [isinstance(r, EFTError) for r in results]
    return worker_pb2.ExtendResponse(
        logits=[worker_pb2.Tensor() if bad else to_wire(r.logits, logits_dtype) for r, bad in zip(results, failed)],
        cache_lengths=[0 if bad else r.cache_length for r, bad in zip(results, failed)],
        errors=_item_errors(results),
    )


# Where the tensors sit, as field-number paths (wire.tensor_payloads): ExtendResponse.logits;
# DraftResponse.results[].q.dense, .indices, .values.
EXTEND_TENSORS = ((1,),)
DRAFT_TENSORS = ((1, 4, 2), (1, 4, 4), (1, 4, 5))


def extended_from_proto(response: worker_pb2.ExtendResponse, payloads: tuple[list, ...] | None = None) -> list[Extended | EFTError]:
    """``payloads``: per path of EXTEND_TENSORS, each tensor's bytes as views of the
    serialized response (wire.tensor_payloads)."""
    failed, (data,) = _failed_items(response.errors), payloads or ([None] * len(response.logits),)
    return [failed.get(i) or Extended(from_wire(t, f"logits[{i}]", d), n) for i, (t, n, d) in enumerate(zip(response.logits, response.cache_lengths, data))]


def raw_decoder(response_class, decode, paths: tuple[tuple[int, ...], ...]):
    """A function from a serialized Extend/Draft response to (answers, the worker's compute
    seconds): parsed for everything but the tensors, whose bytes are views of the response."""

    def from_raw(raw: bytes) -> tuple[list, float]:
        response = response_class.FromString(raw)
        return decode(response, tuple(tensor_payloads(raw, path) for path in paths)), response.compute_seconds

    return from_raw


def draft_items_from_proto(request: worker_pb2.DraftRequest) -> list[DraftItem]:
    return [DraftItem(i.session_id, i.model, list(i.token_ids), i.num_draft, _sampling(i.sampling, n), _truncate_to(i)) for n, i in enumerate(request.items)]


def draft_request(items: list[DraftItem]) -> worker_pb2.DraftRequest:
    def sampling(p: SamplingParams) -> worker_pb2.DraftSampling:
        return worker_pb2.DraftSampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, has_seed=p.seed is not None, seed=p.seed or 0)

    return worker_pb2.DraftRequest(
        items=[worker_pb2.DraftItem(session_id=i.session_id, model=i.model, token_ids=i.token_ids, num_draft=i.num_draft, sampling=sampling(i.sampling), truncate_to=i.truncate_to) for i in items],
    )


def draft_response(results: list[Drafted | EFTError]) -> worker_pb2.DraftResponse:
    def result(r) -> worker_pb2.DraftResult:
        if isinstance(r, EFTError):
            return worker_pb2.DraftResult()
        return worker_pb2.DraftResult(draft_tokens=r.draft_tokens, cache_length=r.cache_length, q=_draft_probs(r.q))

    return worker_pb2.DraftResponse(results=[result(r) for r in results], errors=_item_errors(results))


def _draft_probs(q: DraftQ) -> worker_pb2.DraftProbs:
    if q.dense is not None:
        return worker_pb2.DraftProbs(at_drafts=q.at_drafts.tolist(), dense=to_wire(q.dense, torch.float32))
    return worker_pb2.DraftProbs(at_drafts=q.at_drafts.tolist(), row_sizes=q.row_sizes.tolist(), indices=to_wire(q.indices, torch.int32), values=to_wire(q.values, torch.float32))


def drafted_from_proto(response: worker_pb2.DraftResponse, payloads: tuple[list, ...] | None = None) -> list[Drafted | EFTError]:
    """``payloads`` as in ``extended_from_proto``, for DRAFT_TENSORS."""
    failed = _failed_items(response.errors)
    payloads = payloads or tuple([None] * len(response.results) for _ in DRAFT_TENSORS)
    return [failed.get(i) or Drafted(list(r.draft_tokens), _draft_q(r.q, f"results[{i}].q", *data), r.cache_length) for i, (r, *data) in enumerate(zip(response.results, *payloads))]


def _draft_q(message: worker_pb2.DraftProbs, field: str, dense, indices, values) -> DraftQ:
    at_drafts = torch.tensor(message.at_drafts, dtype=torch.float32)
    if message.HasField("dense"):
        rows = from_wire(message.dense, f"{field}.dense", dense)
        require(rows.dim() == 2 and rows.shape[0] == len(at_drafts), f"{field}.dense", f"shape {tuple(rows.shape)} does not hold {len(at_drafts)} rows")
        return DraftQ(at_drafts, dense=rows)
    row_sizes = torch.tensor(message.row_sizes, dtype=torch.int64)
    indices, values = from_wire(message.indices, f"{field}.indices", indices), from_wire(message.values, f"{field}.values", values)
    require(len(row_sizes) == len(at_drafts) and int(row_sizes.sum()) == len(indices) == len(values), field, "row_sizes, indices and values disagree")
    return DraftQ(at_drafts, row_sizes=row_sizes, indices=indices, values=values)


def _item_errors(results: list) -> list[worker_pb2.ItemError]:
    return [worker_pb2.ItemError(index=i, code=status_number(r), message=str(r)) for i, r in enumerate(results) if isinstance(r, EFTError)]


def _failed_items(errors) -> dict[int, EFTError]:
    return {e.index: error_from_status(e.code, e.message) for e in errors}


def info_response(info: WorkerInfo) -> worker_pb2.InfoResponse:
    models = [worker_pb2.ModelInfo(**vars(m)) for m in info.models]
    return worker_pb2.InfoResponse(models=models, max_sessions=info.max_sessions, max_cached_tokens=info.max_cached_tokens, sessions=info.sessions, cached_tokens=info.cached_tokens)


def info_from_proto(response: worker_pb2.InfoResponse) -> WorkerInfo:
    fields = ModelInfo.__dataclass_fields__
    models = [ModelInfo(**{f: getattr(m, f) for f in fields}) for m in response.models]
    return WorkerInfo(models, response.max_sessions, response.max_cached_tokens, response.sessions, response.cached_tokens)


def _sampling(message: worker_pb2.DraftSampling, item: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=float(message.temperature),
            top_k=int(message.top_k),
            top_p=float(message.top_p) if message.top_p != 0 else 1.0,
            seed=int(message.seed) if message.has_seed else None,
        )
    except InvalidArgumentError as error:
        raise InvalidArgumentError(error.message, field=f"items[{item}].sampling.{error.field}") from None
