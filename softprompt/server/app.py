"""HTTP routes: translate requests to engine calls through the scheduler, and results back to JSON.

The routes never touch torch; the engine (behind :class:`Scheduler`) does. Errors go through
:mod:`softprompt.server.errors`, the one place that maps exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from softprompt.data import DataError, is_chat
from softprompt.data.chat import conversation_prompt, render_chat
from softprompt.engine import ClassifyRequest, GenerateRequest, ScoreRequest, UnknownTaskError, require_chat_layout
from softprompt.server import errors, logprobs
from softprompt.server.metrics import Metrics
from softprompt.server.scheduler import Scheduler
from softprompt.server.schemas import ChatCompletionRequest, ClassifyBody, CompletionRequest, ScoreBody


@dataclass
class ServerState:
    """What the routes need: the engine, its scheduler, the store for admin loads, and limits."""

    engine: object
    scheduler: Scheduler
    store: object | None = None
    admin_token: str | None = None
    max_tokens: int = 512
    default_max_tokens: int = 16
    metrics: Metrics | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_input_chars: int = 100_000
    disconnect_poll_s: float = 0.2
    client_header: str | None = None  # the header naming a request's client (else: its peer address)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state.engine``'s tasks."""
    state.metrics = state.metrics or Metrics()
    if state.scheduler.observe_ttft is None:
        state.scheduler.observe_ttft = state.metrics.observe_ttft

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.scheduler.start()
        yield
        state.scheduler.stop()

    app = FastAPI(title="softprompt", version="0.1", description="Many soft-prompt tasks on one frozen model.",
                  lifespan=lifespan)

    def on_error(scope, status: int) -> None:
        state.metrics.observe(errors.route_label(app, scope), status)

    errors.install(app, on_error)
    app.add_middleware(errors.BodyLimit, max_bytes=state.max_body_bytes, on_error=on_error)

    def check_chars(texts: list[str], what: str) -> None:
        """Refuse text over the character limit before any of it is tokenised."""
        longest = max((len(t) for t in texts), default=0)
        if longest > state.max_input_chars:
            raise errors.LimitError(f"{what} has {longest} characters, over this server's limit of "
                                    f"{state.max_input_chars} per text")

    def input_texts(inputs: list) -> list[str]:
        return [v for x in inputs for v in ([x] if isinstance(x, str) else x.values())]

    def client_of(request: Request) -> str:
        """Whose request this is, for the scheduler's fair order and per-client share: the ``client_header``
        value (hashed: a key is never kept or logged) when the server has one and the request sends it, else
        the connection's peer address."""
        if state.client_header:
            value = request.headers.get(state.client_header)
            if value:
                return "header:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return "peer:" + (request.client.host if request.client else "unknown")

    async def submit(kind: str, reqs: list, request: Request, on_token=None) -> list:
        """Prepare (tokenise) in a worker thread, never on the event loop; queue all or none."""
        return await asyncio.to_thread(state.scheduler.submit_many, kind, reqs, on_token, client_of(request))

    async def unless_gone(awaitable, request: Request):
        """``awaitable``'s result, or :class:`ClientGone` once the client is seen disconnected (polled)."""
        pending = asyncio.ensure_future(awaitable)
        try:
            while True:
                done_, _ = await asyncio.wait({pending}, timeout=state.disconnect_poll_s)
                if done_:
                    return pending.result()
                if await request.is_disconnected():
                    raise errors.ClientGone("the client disconnected")
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def wait(jobs: list, request: Request) -> list:
        """The jobs' results; when the client goes away, its remaining work is cancelled."""
        try:
            return await unless_gone(asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)), request)
        finally:
            for j in jobs:
                j.cancel()

    async def run(kind: str, reqs: list, request: Request) -> list:
        return await wait(await submit(kind, reqs, request), request)

    def label(request: Request) -> str:
        return errors.route_label(app, request.scope)

    def done(request: Request, t0: float) -> None:
        state.metrics.observe(label(request), 200, time.perf_counter() - t0)

    async def entries(results: list, asked: bool) -> list:
        """Each result's logprob entries (None each when not asked), rendered in a worker thread."""
        if not asked:
            return [None] * len(results)
        return await asyncio.to_thread(lambda: [logprobs.entries_of(state.engine.tok, r) for r in results])

    def sampling(body, max_tokens: int | None, chat: bool = False) -> dict:
        """The request's decoding settings. Without ``max_tokens``: a completion gets OpenAI's 16 (at most the
        server's --max-tokens), a chat reply the rest of the context up to --max-tokens."""
        if max_tokens is not None and max_tokens > state.max_tokens:
            raise errors.LimitError(f"max_tokens {max_tokens} is over this server's limit of {state.max_tokens}")
        n = max_tokens or (state.max_tokens if chat else min(state.default_max_tokens, state.max_tokens))
        return {"max_tokens": n, "fit_max_tokens": max_tokens is None and chat, "temperature": body.temperature,
                "top_k": body.top_k, "top_p": body.top_p, "seed": body.seed, "stop": body.stops()}

    @app.get("/health")
    async def health(response: Response) -> dict:
        # 503 once the scheduler thread is gone: every request would fail, and a load balancer should know
        up = state.scheduler.running
        response.status_code = 200 if up else 503
        return {"status": "ok" if up else "scheduler stopped", "tasks": len(state.engine.task_names()),
                "queue": state.scheduler.depth()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        st = state.scheduler.stats
        return state.metrics.render({
            "softprompt_tasks_loaded": ("Tasks being served.", len(state.engine.task_names())),
            "softprompt_queue_depth": ("Requests waiting for a batch.", state.scheduler.depth()),
            "softprompt_queue_clients": ("Clients with requests waiting (taken round-robin).",
                                         state.scheduler.clients_waiting()),
            "softprompt_batches_total": ("Engine batches run.", st.batches),
            "softprompt_batched_requests_total": ("Requests run in batches.", st.rows),
            "softprompt_largest_batch": ("Most requests in one batch.", st.largest_batch),
            "softprompt_failed_requests_total": ("Requests the engine rejected.", st.failed),
            "softprompt_continuous_batching": ("1: generations join the running batch at every step; 0: "
                                               "batch-at-a-time.", int(state.scheduler.policy == "continuous")),
            "softprompt_decode_steps_total": ("Decode steps of the running batch.", st.steps),
            "softprompt_running_generations": ("Generations in the running batch.", st.running),
            "softprompt_kv_slot_bytes": ("Bytes of the running rows' key/value slots (prompts excluded: "
                                         "shared).", st.slot_bytes),
            "softprompt_kv_slot_tokens": ("Tokens held in the running rows' key/value slots.", st.slot_tokens),
        })

    @app.get("/v1/models")
    async def models() -> dict:
        data = []
        for name in state.engine.task_names():
            try:
                d = state.engine.describe(name)
            except UnknownTaskError:  # unloaded since the names were read: the list was a 404
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "softprompt",
                         "kind": d["kind"], "labels": d["labels"], "template": d["template"]})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        texts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        check_chars(texts, "prompt")
        reqs = [GenerateRequest(body.model, t, raw=body.raw, logprobs=body.logprobs,
                                **sampling(body, body.max_tokens)) for t in texts]
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def lps(got: list | None) -> dict | None:
            return None if got is None else logprobs.completion_format(got, bool(body.logprobs))

        if body.stream:
            if len(reqs) != 1:
                raise errors.LimitError("streaming takes one prompt, not a list")

            def chunk(text: str, finish: str | None, got: list | None = None) -> dict:
                return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"text": text, "index": 0, "logprobs": lps(got), "finish_reason": finish}]}

            return _sse(await stream_text(reqs[0], chunk, request, usage=body.include_usage()), request, t0)
        results = await run("generate", reqs, request)
        got = await entries(results, body.logprobs is not None)
        state.metrics.add_tokens(sum(len(r.tokens) for r in results))
        done(request, t0)
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"text": r.text, "index": i, "logprobs": lps(g), "finish_reason": r.finish_reason}
                            for i, (r, g) in enumerate(zip(results, got, strict=True))],
                "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        check_chars(["".join(m.text() + (m.name or "") for m in body.messages)], "messages")
        task = state.engine.task(body.model)  # unknown task -> 404 before anything else
        require_chat_layout(task)  # a distilled prompt never learned a chat layout -> 400
        fmt = task.formats[0]
        text, raw, turn = await asyncio.to_thread(chat_input, body, fmt)  # a chat template can be slow
        req = GenerateRequest(body.model, text, raw=raw, logprobs=body.top_count(), chat=turn,
                              **sampling(body, body.max_completion_tokens or body.max_tokens, chat=True))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            def chunk(delta: str, finish: str | None, got: list | None = None, first: bool = False) -> dict:
                d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
                lps = None if got is None else logprobs.chat_format(got)
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": d, "logprobs": lps, "finish_reason": finish}]}

            return _sse(await stream_text(req, chunk, request, role_first=True, usage=body.include_usage()), request,
                        t0)
        (res,) = await run("generate", [req], request)
        (got,) = await entries([res], req.logprobs is not None)
        state.metrics.add_tokens(len(res.tokens))
        done(request, t0)
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "logprobs": None if got is None else logprobs.chat_format(got),
                             "finish_reason": res.finish_reason}],
                "usage": _usage([res])}

    def chat_input(body: ChatCompletionRequest, fmt) -> tuple[str, bool, bool]:
        """The input, whether it is raw, and whether the tokenizer's chat template rendered it (its end of turn
        ends the reply). A chat task renders the conversation with its chat format (the soft prompt goes before
        it); the last user message fills a prompt task's template; the base model gets the chat template."""
        users = [m for m in body.messages if m.role == "user"]
        if is_chat(fmt):
            msgs = [m.as_message() for m in body.messages]
            try:
                return conversation_prompt(state.engine.tok, fmt, msgs), True, False
            except DataError as e:
                raise errors.RequestError(f"task {body.model!r}: {e}") from None
        template = None if fmt is None else fmt.template
        if template is not None:
            if not users:
                raise errors.RequestError("messages need a user message to fill the task's template")
            return users[-1].text(), False, False
        tok = state.engine.tok
        msgs = [m.as_message() for m in body.messages]
        if getattr(tok, "chat_template", None):
            try:  # a template may refuse the conversation (raise_exception: roles that do not alternate...)
                return render_chat(tok, msgs, add_generation_prompt=True), True, True
            except DataError as e:
                raise errors.RequestError(f"task {body.model!r}: {e}") from None
        return "\n".join(f"{m['role']}: {m['content']}" for m in msgs) + "\nassistant:", True, False

    async def stream_text(req: GenerateRequest, chunk, request: Request,
                          role_first: bool = False, usage: bool = False):
        """Queue the generation (an invalid request raises here, before any response is sent), and return
        chunks of new text as tokens arrive; text after a stop string is never sent. With logprobs asked, a
        chunk carries the entries of the tokens whose text starts in it; the last text chunk, any left. With
        ``usage`` (``stream_options.include_usage``), every chunk has ``"usage": null`` and one more chunk,
        with no choices, the request's token usage (as OpenAI streams it).

        The generation is cancelled when the client goes away (the stream is closed or the client is
        seen disconnected while waiting for a token).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stops = [*req.stop, *state.engine.turn_stops(req.task, req.chat)]  # the engine adds a text end of turn
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        render = None if req.logprobs is None else logprobs.Renderer(state.engine.tok)

        def on_token(toks: list[int], lps) -> None:
            text = state.engine.detok.text(toks)
            cuts = [text.index(s) for s in stops if s in text]
            # the hold counts whole characters: the U+FFFD of an unfinished one is not text yet (it may become
            # the end of a stop string), and counting it would send the characters before it
            whole = text.rstrip(logprobs.PARTIAL)
            visible = text[:min(cuts)] if cuts else whole[:max(len(whole) - hold, 0)]
            new = render.extend(toks, lps) if render is not None and lps is not None else []
            loop.call_soon_threadsafe(queue.put_nowait, (visible, new))

        (job,) = await submit("generate", [req], request, on_token)
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, None))
        return chunks(job, queue, chunk, request, role_first, render, usage)

    async def chunks(job, queue: asyncio.Queue, chunk, request: Request, role_first: bool,
                     render: logprobs.Renderer | None, usage: bool = False) -> AsyncIterator[dict]:
        if usage:
            chunk = (lambda plain: lambda *a, **k: {**plain(*a, **k), "usage": None})(chunk)
        try:
            sent, pending, given = 0, [], 0  # text sent; entries rendered, not sent; entries sent
            if role_first:
                yield chunk("", None, first=True)
            while True:
                item = await unless_gone(queue.get(), request)
                if item is None:
                    break
                pending.extend(item[1])
                visible = item[0].rstrip("\ufffd")  # a multi-byte character not yet complete
                if len(visible) > sent:
                    n = logprobs.starting_before(pending, len(visible))
                    yield chunk(visible[sent:], None, pending[:n] if render is not None else None)
                    sent, given, pending = len(visible), given + n, pending[n:]
            res = await asyncio.wrap_future(job.future)
            state.metrics.add_tokens(len(res.tokens))
            rest = None if render is None else (await asyncio.to_thread(render.final, res))[given:]
            if len(res.text) > sent or rest:
                yield chunk(res.text[sent:], None, rest)
            yield chunk("", res.finish_reason)
            if usage:
                yield {**chunk("", None), "choices": [], "usage": _usage([res])}
        finally:
            job.cancel()  # a no-op once it has finished

    def _sse(chunks: AsyncIterator[dict], request: Request, t0: float) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            except Exception as e:  # noqa: BLE001 - headers are sent: report the error in the stream
                status, kind = errors.status_of(e)
                state.metrics.observe(label(request), status)
                if status == 500:
                    errors.log.error("stream failed: %s: %s", type(e).__name__, e, exc_info=e)
                yield f"data: {json.dumps(errors.error_body(errors.message_of(e, status), kind, status))}\n\n"
                return
            done(request, t0)
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody, request: Request) -> dict:
        t0 = time.perf_counter()
        check_chars(input_texts(body.items()), "input")
        results = await run("classify", [ClassifyRequest(body.model, x, raw=body.raw) for x in body.items()],
                            request)
        done(request, t0)
        return {"object": "list", "model": body.model,
                "data": [{"index": i, "label": r.label, "probs": r.probs, "scores": r.scores,
                          **({"votes": r.votes} if r.votes is not None else {})} for i, r in enumerate(results)]}

    @app.post("/v1/score")
    async def score(body: ScoreBody, request: Request) -> dict:
        t0 = time.perf_counter()
        check_chars([*input_texts([body.input]), body.continuation], "input")
        (r,) = await run("score", [ScoreRequest(body.model, body.input, body.continuation, raw=body.raw,
                                                           eos=body.eos)], request)
        done(request, t0)
        return {"model": body.model, "logprob": r.logprob, "token_logprobs": r.token_logprobs, "tokens": r.tokens}

    def admin(request: Request) -> None:
        if not state.admin_token:
            raise errors.AuthError("admin endpoints are disabled: start the server with --admin-token", 403)
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {state.admin_token}".encode()):  # constant time
            raise errors.AuthError("admin endpoints need 'Authorization: Bearer <admin token>'")
        if state.store is None:
            raise errors.LimitError("this server has no --store to load prompts from")

    @app.post("/admin/tasks/{name}/load")
    async def load(name: str, request: Request) -> dict:
        admin(request)
        await asyncio.to_thread(state.engine.load_from_store, state.store, name)
        state.metrics.observe(label(request), 200)
        return {"loaded": name, "task": state.engine.describe(name)}

    @app.post("/admin/tasks/{name}/reload")
    async def reload(name: str, request: Request) -> dict:
        admin(request)
        state.engine.describe(name)  # 404 unless it is being served
        await asyncio.to_thread(state.engine.load_from_store, state.store, name)
        state.metrics.observe(label(request), 200)
        return {"reloaded": name, "task": state.engine.describe(name)}

    @app.post("/admin/tasks/{name}/unload")
    async def unload(name: str, request: Request) -> dict:
        admin(request)
        # off the event loop, as load and reload: unloading waits for the engine call in progress to end
        await asyncio.to_thread(state.engine.unload, name)
        state.metrics.observe(label(request), 200)
        return {"unloaded": name}

    return app


def _usage(results) -> dict:
    p, c = sum(r.prompt_tokens for r in results), sum(len(r.tokens) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
