"""Megatron-LM's text generation API (`PUT /api`): its request fields and its answer.

`prompts` (a list of strings) and optionally `tokens_to_generate` (default 64), `temperature`
(0 greedy .. 100, default 1), `top_k` (0: all), `top_p` (1: off), `random_seed` and
`logprobs`, answered with `text` (each prompt plus its completion), `segments` (each token of
it as text) and, when asked, `logprobs` (log p of every token after the first);
`tokens_to_generate: 0` with `logprobs: true` scores the prompts. A bad request is a
BadRequest, which the server answers with HTTP 400 and its message.
"""

from __future__ import annotations

import json

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


def number(request, name, kind, low, high):
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
        "tokens_to_generate": number(request, "tokens_to_generate", int, 0, MAX_TOKENS),
        "temperature": number(request, "temperature", float, 0.0, 100.0),
        "top_k": number(request, "top_k", int, 0, vocab_size),
        "top_p": number(request, "top_p", float, 0.0, 1.0),
        "random_seed": number(request, "random_seed", int, 0, 2**32 - 1),
    }
    if not isinstance(request["logprobs"], bool):
        raise BadRequest("logprobs must be true or false")
    options["logprobs"] = request["logprobs"]
    if options["top_p"] == 0:
        raise BadRequest("top_p must be in (0, 1]")
    if options["tokens_to_generate"] == 0 and not options["logprobs"]:
        raise BadRequest("tokens_to_generate=0 scores the prompts: it needs logprobs=true")
    return options


def answer(generator, tokenizer, body: bytes) -> dict:
    """Megatron-LM's answer to a PUT /api body, from a megajax.generate.Generator."""
    options = parse_request(body, vocab_size=generator.vocab_size)
    try:
        prompts = [text_ids(tokenizer, p) for p in options["prompts"]]
    except KeyError as e:
        raise BadRequest(f"a prompt has a character the model never saw: {e}") from None
    try:
        out = generator(
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
    decode = tokenizer.decode
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
