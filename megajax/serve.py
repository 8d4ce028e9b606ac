"""The REST server for a trained GPT or a Hugging Face GPT-2 or Llama: OpenAI's completions
and chat completions, and Megatron-LM's `PUT /api`, on FastAPI and uvicorn.

    python -m megajax.serve --workdir runs/sc --port 5000
    curl localhost:5000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0}'
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \
        -d '{"prompts":["ROMEO:"],"tokens_to_generate":50}'

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` sends server-sent
events), `GET /v1/models`, `GET /health` (megajax.openai_api), and Megatron-LM's `PUT /api`
(megajax.megatron_api).

One thread owns the model (megajax.engine.Engine): OpenAI requests are decoded together as
they come (continuous batching) and `PUT /api` requests run between its steps, each a batch of
its prompts. The web side only parses, queues and waits. Errors are JSON with their status:
OpenAI's error object on its routes (400 a bad field, 404 an unknown model or route, 413 a
body over --max_body_bytes, 503 a full queue, 504 past --request_timeout), `{"message": ...}`
on `/api` (400, and 405 for a method other than PUT); never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading

from starlette.requests import Request  # read by FastAPI from the routes' annotations

from megajax.config import ConfigError


class Server:
    """What the routes need: the engine (started by the caller), the tokenizer, the chat
    template, the served model's name and the limits."""

    def __init__(
        self,
        engine,
        tokenizer,
        template,
        *,
        model_name: str,
        max_body_bytes: int = 4 << 20,
        max_prompts: int = 128,
        request_timeout: float = 600.0,
    ):
        from megajax import openai_api

        self.engine, self.tokenizer, self.template = engine, tokenizer, template
        self.model_name, self.max_body_bytes = model_name, max_body_bytes
        self.request_timeout = request_timeout
        self.limits = openai_api.Limits(max_prompts=max_prompts, max_n=engine.max_rows)
        self.stops = openai_api.stop_ids(tokenizer, template)


def make_app(server: Server):
    """The FastAPI application of `server`'s routes."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from megajax import engine as engine_lib
    from megajax import megatron_api
    from megajax import openai_api as api
    from megajax.data.chat import ChatError

    app = FastAPI(title="megajax", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: api.ApiError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(api.ApiError)
    async def api_error(request, e):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes and methods
        if request.url.path.rstrip("/") == "/api":
            message = f"{request.method} /api is not served: send the JSON request with PUT /api"
            return JSONResponse({"message": message}, status_code=405, headers={"Allow": "PUT"})
        message = f"{request.method} {request.url.path} is not served here"
        return error(api.ApiError(e.status_code, message, code="not_found"))

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # the traceback goes to the log, never the client
        return error(api.ApiError(500, "internal error", kind="server_error"))

    async def read_body(request: Request) -> bytes:
        limit = server.max_body_bytes
        too_large = api.ApiError(413, f"the body is over {limit} bytes", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await read_body(request))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise api.ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise api.ApiError(400, "the body must be a JSON object")
        return body

    def submit(works) -> asyncio.Queue:
        """Queue the works (before any answer starts: a full queue is a 503); the engine puts
        (choice, new text) on the returned queue as it goes."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for work in works:
            work.notify = lambda choice, delta: loop.call_soon_threadsafe(
                events.put_nowait, (choice, delta)
            )
        try:
            server.engine.submit(works)
        except engine_lib.QueueFull as e:
            raise api.ApiError(
                503, f"{e}: retry later", kind="server_error", code="queue_full"
            ) from None
        return events

    async def served(works, events):
        """(choice, new text) as the engine hands them over, until every choice finished;
        the works cancelled when the client goes or the time is up."""
        loop = asyncio.get_running_loop()
        remaining = sum(w.n for w in works)
        deadline = loop.time() + server.request_timeout
        try:
            while remaining:
                try:
                    choice, delta = await asyncio.wait_for(events.get(), deadline - loop.time())
                except TimeoutError:
                    raise api.ApiError(
                        504,
                        f"not finished in {server.request_timeout} s",
                        kind="server_error",
                        code="timeout",
                    ) from None
                if choice.finish_reason == "error":
                    raise api.ApiError(500, "the model failed on this request", kind="server_error")
                remaining -= choice.finish_reason is not None
                yield choice, delta
        finally:
            for work in works:
                work.cancelled = True  # a no-op for finished works

    def stream(chunks):
        async def events():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except api.ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        entry = {
            "id": server.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "megajax",
            "max_model_len": server.engine.slots,
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        options = api.sampling_fields(body, api.COMPLETION_FIELDS, server.limits, server.model_name)
        echo = api.flag(body, "echo")
        logprobs = api.number(body, "logprobs", 0, engine_lib.TOP, None, integer=True)
        max_tokens = api.number(body, "max_tokens", 0, server.engine.slots, 16, integer=True)
        if options["stream"] and echo:
            raise api.ApiError(400, "echo: not supported with stream", param="echo")
        if max_tokens == 0 and not echo:
            raise api.ApiError(
                400, "max_tokens: 0 needs echo: true (it scores the prompt)", param="max_tokens"
            )
        ids, texts = api.completion_prompts(body, server.tokenizer, server.limits)
        works = api.works_for(
            ids,
            max_tokens=max_tokens,
            options=options,
            score=echo,
            engine=server.engine,
            stops=server.stops,
        )
        head = api.envelope("text_completion", server.model_name)
        n = options["n"]
        if options["stream"]:
            events = submit(works)

            async def chunks():
                async for choice, delta in served(works, events):
                    index = works.index(choice.work) * n + choice.index
                    finish = api.finish_reason(choice) if choice.finish_reason else None
                    if delta or finish:
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": index,
                                    "text": delta,
                                    "logprobs": None,
                                    "finish_reason": finish,
                                }
                            ],
                        }
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield {**head, "choices": [], "usage": api.usage(works)}

            return stream(chunks())
        async for _ in served(works, submit(works)):
            pass
        choices = [
            api.completion_choice(
                c,
                server.tokenizer,
                index=i * n + c.index,
                echo=echo,
                logprobs=logprobs,
                prompt_text=texts[i],
            )
            for i, work in enumerate(works)
            for c in work.choices
        ]
        return {**head, "choices": choices, "usage": api.usage(works)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        options = api.sampling_fields(body, api.CHAT_FIELDS, server.limits, server.model_name)
        messages = api.chat_messages(body)
        try:
            ids = server.template.prompt_ids(messages)
        except ChatError as e:
            raise api.ApiError(400, f"messages: {e}", param="messages") from None
        room = server.engine.slots - len(ids)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = api.number(
            {field: limit}, field, 1, server.engine.slots, max(room, 1), integer=True
        )
        want_logprobs = api.flag(body, "logprobs")
        top_n = api.number(body, "top_logprobs", 0, engine_lib.TOP, 0, integer=True)
        works = api.works_for(
            [ids],
            max_tokens=max_tokens,
            options=options,
            score=False,
            engine=server.engine,
            stops=server.stops,
        )
        if options["stream"]:
            head = api.envelope("chat.completion.chunk", server.model_name)

            events = submit(works)

            async def chunks():
                for i in range(options["n"]):
                    yield {
                        **head,
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                async for choice, delta in served(works, events):
                    finish = api.finish_reason(choice) if choice.finish_reason else None
                    if delta:
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": choice.index,
                                    "delta": {"content": delta},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    if finish:
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": choice.index,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": finish,
                                }
                            ],
                        }
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield {**head, "choices": [], "usage": api.usage(works)}

            return stream(chunks())
        async for _ in served(works, submit(works)):
            pass
        choices = []
        for c in works[0].choices:
            logprobs = api.chat_logprobs(c, server.tokenizer, top_n) if want_logprobs else None
            message = {"role": "assistant", "content": c.text}
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": api.finish_reason(c),
                }
            )
        return {
            **api.envelope("chat.completion", server.model_name),
            "choices": choices,
            "usage": api.usage(works),
        }

    @app.put("/api")
    async def megatron(request: Request):
        try:
            body = await read_body(request)
        except api.ApiError as e:
            return JSONResponse({"message": e.message}, status_code=e.status)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def job():  # in the model's thread, between decode steps
            try:
                result = (200, megatron_api.answer(server.engine.generator, server.tokenizer, body))
            except megatron_api.BadRequest as e:
                result = (400, {"message": str(e)})
            except Exception:  # the server keeps serving the next request
                import traceback

                traceback.print_exc()
                result = (500, {"message": "internal error"})
            loop.call_soon_threadsafe(done.set_result, result)

        try:
            server.engine.submit(job)
        except engine_lib.QueueFull as e:
            return JSONResponse({"message": f"{e}: retry later"}, status_code=503)
        status, reply = await done
        return JSONResponse(reply, status_code=status)

    return app


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, keep_alive: int = 5):
    """uvicorn serving `app` in a daemon thread; (uvicorn.Server, port). For tests and
    benchmarks: main() runs uvicorn in its own thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=keep_alive)
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        threading.Event().wait(0.01)
    return server, sock.getsockname()[1]


def start_engine(generator, tokenizer, *, warm_up=False, **limits):
    """An Engine over the generator, serving in its own daemon thread; with `warm_up`, every
    program (or those of prompts up to the widths it lists) compiled first."""
    from megajax.engine import Engine

    engine = Engine(generator, tokenizer, **limits)
    if warm_up:
        engine.warm_up(None if warm_up is True else warm_up)
    threading.Thread(target=engine.run, name="model", daemon=True).start()
    return engine


def parse_args(argv=None) -> argparse.Namespace:
    from megajax import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    generate.add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--served_model_name",
        help="the model's name in the API (default: the "
        "--workdir or --hf_checkpoint directory's name)",
    )
    parser.add_argument("--max_rows", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting; past it 503")
    parser.add_argument("--max_prompts", type=int, default=128, help="prompts per request")
    parser.add_argument("--max_body_bytes", type=int, default=4 << 20, help="past it 413")
    parser.add_argument(
        "--context",
        type=int,
        help="prompt + max_tokens at most this (default and most: model.seq_len)",
    )
    parser.add_argument("--request_timeout", type=float, default=600.0, help="seconds; past it 504")
    parser.add_argument("--keep_alive", type=int, default=5, help="an idle connection's seconds")
    parser.add_argument(
        "--chat_template",
        default="",
        help="a .jinja file instead of the "
        "checkpoint's template (default: the checkpoint's, else megajax's)",
    )
    parser.add_argument(
        "--warm_up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every program before serving (no compiling later)",
    )
    args = parser.parse_args(argv)
    if not (args.workdir or args.hf_checkpoint):
        parser.error("pass --workdir (a trained run) or --hf_checkpoint")
    if min(args.max_rows, args.max_queue, args.max_prompts, args.max_body_bytes) < 1:
        parser.error("--max_rows, --max_queue, --max_prompts and --max_body_bytes must be positive")
    return args


def main(argv=None) -> int:
    from pathlib import Path

    import jax
    import uvicorn

    from megajax import generate
    from megajax.data import chat

    args = parse_args(argv)
    try:
        generator, tokenizer, step = generate.load(args)
        if jax.process_count() > 1:
            raise ConfigError(
                f"the server runs in one process, not {jax.process_count()}: serve a model that "
                "fits one host's devices (--mesh over them), without a multi-process launch"
            )
        directory = args.hf_checkpoint or getattr(generator.sharded.cfg.data, "vocab_dir", None)
        template = chat.template_for(tokenizer, directory, args.chat_template)
        engine = start_engine(
            generator,
            tokenizer,
            max_rows=args.max_rows,
            max_queue=args.max_queue,
            slots=args.context,
            warm_up=args.warm_up,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"compiled {engine.compiled} programs", flush=True)
    name = args.served_model_name or Path(args.workdir or args.hf_checkpoint).resolve().name
    server = Server(
        engine,
        tokenizer,
        template,
        model_name=name,
        max_body_bytes=args.max_body_bytes,
        max_prompts=args.max_prompts,
        request_timeout=args.request_timeout,
    )
    source = args.hf_checkpoint or f"{args.workdir}, step {step}"
    print(f"serving {name} ({source}) on http://{args.host}:{args.port}/v1 and /api", flush=True)
    uvicorn.run(
        make_app(server),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_keep_alive=args.keep_alive,
    )
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
