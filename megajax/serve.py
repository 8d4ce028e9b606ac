"""Megatron-LM's text generation REST server for a trained GPT or a Hugging Face GPT-2 or Llama.

    python -m megajax.serve --workdir runs/sc --port 5000
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \
        -d '{"prompts":["ROMEO:"],"tokens_to_generate":50}'

`PUT /api` takes JSON with `prompts` (a list of strings) and optionally `tokens_to_generate`
(default 64), `temperature` (0 greedy .. 100, default 1), `top_k` (0: all), `top_p` (1: off),
`random_seed` and `logprobs`; it answers `text` (each prompt plus its completion), `segments`
(each token of it as text) and, when asked, `logprobs` (log p of every token after the first).
`tokens_to_generate: 0` with `logprobs: true` scores the prompts. A bad request gets HTTP 400
and a message, any other method than PUT HTTP 405 (both JSON). Requests are served one at a
time, each a batch of its prompts: concurrent clients queue on a lock and never share the model
mid-request.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megajax.config import ConfigError
from megajax.data.tokenizer import text_ids

MAX_PROMPTS = 128  # Megatron-LM's limit per request
MAX_TOKENS = 4096  # past model.seq_len each token runs the whole window: bound a request
DEFAULTS = {
    "tokens_to_generate": 64,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "random_seed": 0,
    "logprobs": False,
}


class BadRequest(ValueError):
    """A request the server answers with HTTP 400 and this message."""


def _number(request, name, kind, low, high):
    value = request[name]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {value}")
    return kind(value)


def parse_request(body: bytes, *, vocab_size: int) -> dict:
    """The request's options with defaults filled in; BadRequest when anything is wrong."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(request) - {"prompts", *DEFAULTS})
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; known: prompts, {', '.join(DEFAULTS)}")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompts must be a non-empty list of strings")
    if not all(isinstance(p, str) and p for p in prompts):
        raise BadRequest("each prompt must be a non-empty string")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    request = {**DEFAULTS, **request}
    options = {
        "prompts": prompts,
        "tokens_to_generate": _number(request, "tokens_to_generate", int, 0, MAX_TOKENS),
        "temperature": _number(request, "temperature", float, 0.0, 100.0),
        "top_k": _number(request, "top_k", int, 0, vocab_size),
        "top_p": _number(request, "top_p", float, 0.0, 1.0),
        "random_seed": _number(request, "random_seed", int, 0, 2**32 - 1),
    }
    if not isinstance(request["logprobs"], bool):
        raise BadRequest("logprobs must be true or false")
    options["logprobs"] = request["logprobs"]
    if options["top_p"] == 0:
        raise BadRequest("top_p must be in (0, 1]")
    if options["tokens_to_generate"] == 0 and not options["logprobs"]:
        raise BadRequest("tokens_to_generate=0 scores the prompts: it needs logprobs=true")
    return options


class Service:
    """Answers parsed requests with one Generator, one request at a time."""

    def __init__(self, generator, tokenizer):
        self.generator, self.tokenizer = generator, tokenizer
        self.lock = threading.Lock()

    def answer(self, body: bytes) -> dict:
        options = parse_request(body, vocab_size=self.generator.vocab_size)
        try:
            prompts = [text_ids(self.tokenizer, p) for p in options["prompts"]]
        except KeyError as e:
            raise BadRequest(f"a prompt has a character the model never saw: {e}") from None
        try:
            with self.lock:
                out = self.generator(
                    prompts,
                    new_tokens=options["tokens_to_generate"],
                    temperature=options["temperature"],
                    top_k=options["top_k"],
                    top_p=options["top_p"],
                    seed=options["random_seed"],
                    prompt_logprobs=True,  # cheap beside decoding; one program fewer to compile
                )
        except ConfigError as e:  # a prompt too long for the model, or ids outside its vocabulary
            raise BadRequest(str(e)) from None
        decode = self.tokenizer.decode
        tokens = [p + out["tokens"][i].tolist() for i, p in enumerate(prompts)]
        reply = {
            "text": [decode(t) for t in tokens],
            "segments": [[decode([x]) for x in t] for t in tokens],
        }
        if options["logprobs"]:
            reply["logprobs"] = [
                [*out["prompt_logprobs"][i].tolist(), *out["logprobs"][i].tolist()]
                for i in range(len(prompts))
            ]
        return reply


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server answering PUT /api with `service` (port 0: any free port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path.rstrip("/") != "/api":
                return self._send(404, {"message": f"no such endpoint {self.path}: use /api"})
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                return self._send(200, service.answer(body))
            except BadRequest as e:
                return self._send(400, {"message": str(e)})
            except Exception as e:  # the server keeps serving the next request
                return self._send(500, {"message": f"{type(e).__name__}: {e}"})

        def __getattr__(self, name):
            # http.server answers a method without a do_METHOD with an HTML 501 page: any
            # method but PUT gets a JSON answer instead.
            if name.startswith("do_"):
                return self._not_put
            raise AttributeError(name)

        def _not_put(self):
            if self.path.rstrip("/") != "/api":
                return self._send(404, {"message": f"no such endpoint {self.path}: use /api"})
            message = f"{self.command} /api is not served: send the JSON request with PUT /api"
            return self._send(405, {"message": message}, Allow="PUT")

        def _send(self, status: int, payload: dict, **headers):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, fmt, *args):
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    return ThreadingHTTPServer((host, port), Handler)


def parse_args(argv=None) -> argparse.Namespace:
    from megajax import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    generate.add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    if not (args.workdir or args.hf_checkpoint):
        parser.error("pass --workdir (a trained run) or --hf_checkpoint")
    return args


def main(argv=None) -> int:
    from megajax import generate

    args = parse_args(argv)
    try:
        generator, tokenizer, step = generate.load(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = make_server(Service(generator, tokenizer), args.host, args.port)
    print(f"serving step {step} on http://{args.host}:{server.server_port}/api", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
