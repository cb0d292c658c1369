"""The endpoints. Each one calls the engine API a Python user calls (add_request, abort,
load_adapter, unload_adapter, stats); nothing here touches the model.

A request's life: resolve ``model`` to an adapter, tokenize and admit it on the admission thread
(so a long prompt never blocks the event loop), then read its outputs from ``handle.stream()``.
Whatever ends the answer early (the client going away, a cancelled task) aborts the request in
the engine at once, which frees its cache slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..runtime import RequestHandle
from ..runtime.adapters import check_name
from ..runtime.errors import UnknownAdapter
from .auth import require_api_key
from .errors import ENGINE_ERRORS, APIError, from_engine
from .responses import DONE, Answer, usage_event, whole
from .schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest
from .state import ServerState

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

router = APIRouter()
guarded = APIRouter(dependencies=[Depends(require_api_key)])


def _state(request: Request) -> ServerState:
    return request.app.state.server


# -- generation --------------------------------------------------------------------------------


@guarded.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await _generate(_state(request), request, body, body.prompt, chat=False)


@guarded.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await _generate(_state(request), request, body, [m.as_dict() for m in body.messages], chat=True)


async def _generate(state: ServerState, request: Request, body, prompt, chat: bool):
    arrival = time.monotonic()
    body.check_supported()
    adapter = state.resolve_model(body.model)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    n = body.n or 1
    handles, echo = await _admit(state, partial(_add_requests, state, prompt, adapter, body, chat, request_id, n))
    for handle in handles:
        state.answering(handle)
    trackers = [state.metrics.track(adapter, arrival) for _ in handles]
    answers = [Answer(request_id, body.model, chat, body.return_token_ids, body.include_usage, state.token_text, echo, index=i)
               for i in range(n)]
    if body.stream:
        return StreamingResponse(_events(handles, trackers, answers), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outs = await _finals(request, handles, trackers)
    if outs is None:  # the client left; nobody reads this
        return Response(status_code=499)
    failed = next((out for out in outs if out.error is not None), None)
    if failed is not None:
        raise APIError(500, f"the request failed: {failed.error}", None, "internal_error")
    return JSONResponse(whole(answers, outs))


def _add_requests(state: ServerState, prompt, adapter: str | None, body, chat: bool, request_id: str,
                  n: int) -> tuple[list[RequestHandle], str | None]:
    """Tokenize, size and queue one request's n choices (admission thread): all or none. With
    completions' echo, also the prompt's text (decoded here, off the event loop, once)."""
    engine = state.engine
    ids = engine.prompt_ids(prompt, body.chat_template_kwargs if chat else None)
    echo = None
    if not chat and body.echo:
        echo = prompt if isinstance(prompt, str) else state.prompt_text(ids)
    default_max = engine.max_model_len - len(ids) if chat else COMPLETIONS_MAX_TOKENS
    samplings = [body.sampling(default_max, choice=i) for i in range(n)]
    handles = []
    try:
        for i, sampling in enumerate(samplings):
            handles.append(engine.add_request(ids, adapter, sampling, request_id if n == 1 else f"{request_id}-{i}"))
    except BaseException:
        for handle in handles:
            handle.abort()
        raise
    return handles, echo


async def _admit(state: ServerState, add):
    """Run ``add`` on the admission thread (it returns the handles it queued, and what else it
    found). If this task is cancelled meanwhile, those requests are aborted as soon as they exist."""
    future = asyncio.get_running_loop().run_in_executor(state.admission, add)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_abort_admitted)
        raise


def _abort_admitted(future) -> None:
    if not future.cancelled() and future.exception() is None:
        for handle in future.result()[0]:
            handle.abort()


async def _finals(request: Request, handles: list[RequestHandle], trackers) -> list | None:
    """Each choice's final output, or None if the client disconnected first (then every request
    still running is aborted)."""

    async def collect(handle, tracker):
        async for out in handle.stream():
            tracker.observe(out)
            if out.finished:
                return out

    collecting = asyncio.ensure_future(asyncio.gather(*(collect(h, t) for h, t in zip(handles, trackers))))
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        return collecting.result() if collecting.done() else None
    finally:
        leaving.cancel()
        collecting.cancel()
        _end(handles, trackers)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(handles: list[RequestHandle], trackers, answers: list[Answer]):
    """The SSE stream, every choice's outputs as they come. Starlette cancels it when the client
    disconnects: the requests are aborted then."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int):
        async for out in handles[i].stream():
            await merged.put((i, out))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(handles))]
    finals = [None] * len(handles)
    try:
        while None in finals:
            i, out = await merged.get()
            trackers[i].observe(out)
            for chunk in answers[i].chunks(out):
                yield chunk
            if out.error is not None:  # said in the stream; the other choices end with it
                break
            if out.finished:
                finals[i] = out
        else:
            if answers[0].include_usage:
                yield usage_event(answers, finals)
        yield DONE
    finally:
        for task in pumps:
            task.cancel()
        _end(handles, trackers)


def _end(handles: list[RequestHandle], trackers) -> None:
    """However the answer ended: a request still running is aborted (its cache slot freed now)."""
    for handle, tracker in zip(handles, trackers):
        if not handle.finished:
            handle.abort()
        tracker.abandoned(len(handle.prompt_token_ids))


# -- models and adapters -----------------------------------------------------------------------


@guarded.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    created = int(state.started)
    base = {"id": state.served_name, "object": "model", "created": created, "owned_by": "expertlora",
            "root": state.served_name, "parent": None, "max_model_len": state.engine.max_model_len}
    adapters = [{"id": name, "object": "model", "created": created, "owned_by": "expertlora", "root": name,
                 "parent": state.served_name, "max_model_len": state.engine.max_model_len} for name in state.engine.adapter_names]
    return {"object": "list", "data": [base, *adapters]}


@guarded.post("/v1/load_lora_adapter")
@guarded.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadAdapterRequest, request: Request):
    state = _state(request)
    name = body.lora_name
    try:
        check_name(name)
    except ValueError as e:
        raise APIError(400, f"lora_name: {e}", "lora_name", "invalid_value") from None
    if name == state.served_name:
        raise APIError(400, f"lora_name: {name!r} is the base model's served name", "lora_name", "invalid_value")
    if name in state.engine.adapter_names:
        raise APIError(409, f"lora_name: an adapter named {name!r} is already loaded; unload it first", "lora_name", "adapter_exists")
    path = state.allowed_adapter_path(body.lora_path)
    try:
        await asyncio.get_running_loop().run_in_executor(state.adapter_ops, state.engine.load_adapter, name, path)
    except Exception as e:
        raise _load_error(e, state) from None
    return {"success": True, "message": f"adapter {name!r} loaded", "lora_name": name, "loaded_adapters": state.engine.adapter_names}


def _load_error(e: Exception, state: ServerState) -> APIError:
    """A load that failed changed nothing: say why in one line."""
    if isinstance(e, ENGINE_ERRORS):
        return from_engine(e, state.config.retry_after_s)
    if isinstance(e, (ValueError, OSError)):  # AdapterError included: the reader's one line
        return APIError(400, f"the adapter could not be loaded: {e}", "lora_path", "invalid_adapter")
    return APIError(500, f"the adapter could not be loaded: {type(e).__name__}: {e}", "lora_path", "internal_error")


@guarded.post("/v1/unload_lora_adapter")
@guarded.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadAdapterRequest, request: Request):
    state = _state(request)
    if body.lora_name == state.served_name:
        raise APIError(400, f"lora_name: {body.lora_name!r} is the base model's served name, not an adapter; it cannot be unloaded",
                       "lora_name", "invalid_value")
    try:
        await asyncio.get_running_loop().run_in_executor(state.adapter_ops, state.engine.unload_adapter, body.lora_name)
    except UnknownAdapter as e:  # the field is lora_name here, not a request's model
        raise APIError(404, f"lora_name: {e}", "lora_name", "adapter_not_found") from None
    return {"success": True, "message": f"adapter {body.lora_name!r} unloaded", "lora_name": body.lora_name,
            "loaded_adapters": state.engine.adapter_names}


# -- operations --------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
