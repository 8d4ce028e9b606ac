"""OpenAI's completions and chat completions as the engine's Work, and its answers back.

The fields follow OpenAI's API reference (`top_k` is an extension, as in vLLM). A field the API
does not know, or a value out of its range, is an ApiError (HTTP 400) naming the field.
`echo: true` with `logprobs` scores the prompt: each prompt token's log-probability (the first
has none) and the `logprobs` most likely tokens at each position, which is how lm-evaluation-
harness's `local-completions` computes log-likelihoods (`max_tokens: 1`, last position dropped).
"""

from __future__ import annotations

import random
import time
import uuid

from megajax.engine import Choice, Work

# OpenAI's sampling fields, with vLLM's extensions top_k and ignore_eos (run to max_tokens).
SAMPLING = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
}
COMPLETION_FIELDS = SAMPLING | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = SAMPLING | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
MAX_STOPS = 4  # OpenAI's limit on stop strings
# End-of-turn tokens of common chat templates: generation stops at any the vocabulary has.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")


class ApiError(Exception):
    """An answer in OpenAI's error JSON with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status,
            message,
            param,
            kind,
            code,
        )

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def number(body, name, low, high, default, *, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise _bad(name, f"must be in [{low}, {high}], got {value}")
    return value


def flag(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


class Limits:
    """What one request may ask for (the server's flags)."""

    def __init__(self, *, max_prompts: int = 128, max_n: int = 8):
        self.max_prompts, self.max_n = max_prompts, max_n


def sampling_fields(body: dict, fields: set, limits: Limits, model_name: str) -> dict:
    """The sampling options every route shares, checked; unknown fields refused."""
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"unknown fields {unknown}", param=unknown[0])
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            404,
            f"model {model!r} is not served here: this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if number(body, name, -2, 2, 0) != 0:
            raise _bad(name, "only 0 is supported")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "must be a non-empty string or a list of them")
    if len(stop) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stop)}")
    top_k = number(body, "top_k", -1, 2**31 - 1, 0, integer=True)
    options = {
        "temperature": float(number(body, "temperature", 0, 2, 1.0)),
        "top_p": float(number(body, "top_p", 0, 1, 1.0)),
        "top_k": max(top_k, 0),  # -1 (vLLM's) or 0: off
        "n": number(body, "n", 1, limits.max_n, 1, integer=True),
        "seed": number(body, "seed", -(2**63), 2**64 - 1, None, integer=True),
        "stop": tuple(stop),
        "stream": flag(body, "stream"),
        "ignore_eos": flag(body, "ignore_eos"),
    }
    if options["top_p"] == 0:
        raise _bad("top_p", "must be in (0, 1]")
    if options["seed"] is None:  # as OpenAI: without a seed, every request samples afresh
        options["seed"] = random.getrandbits(32)
    options["seed"] %= 2**32
    return options


def completion_prompts(body: dict, tokenizer, limits: Limits) -> tuple[list[list[int]], list]:
    """(token ids, text or None) of each prompt: a string, a list of strings, a list of token
    ids or a list of such lists."""
    from megajax.data.tokenizer import text_ids

    prompt = body.get("prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(_is_id(x) for x in prompt)
    ):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad(
            "prompt",
            "must be a string, a list of strings, a list of token ids or a "
            "list of lists of token ids",
        )
    if len({isinstance(p, str) for p in prompt}) > 1:
        raise _bad("prompt", "a list of prompts must be all strings or all lists of token ids")
    if len(prompt) > limits.max_prompts:
        raise _bad("prompt", f"at most {limits.max_prompts} prompts, got {len(prompt)}")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            try:
                ids.append(text_ids(tokenizer, p))
            except KeyError as e:
                raise _bad("prompt", f"a character the model never saw: {e}") from None
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_id(x) for x in p):
            ids.append(list(p))
            texts.append(None)
        else:
            raise _bad("prompt", "each prompt must be a non-empty string or list of token ids")
    return ids, texts


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def chat_messages(body: dict) -> list[dict]:
    """The messages as the chat template reads them: role and text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a role and content")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def stop_ids(tokenizer, template=None) -> frozenset:
    """The tokens generation ends at: the end of text, those that close an assistant's turn in
    the chat template (ChatTemplate.stop_ids: its eos_token and its own end-of-turn marker),
    and the end-of-turn tokens the vocabulary has."""
    ids = set() if tokenizer.eot_id is None else {tokenizer.eot_id}
    if template is not None:
        ids.update(template.stop_ids())
    for name in END_OF_TURN:
        try:
            found, _ = tokenizer.encode_with_offsets(name)
        except (KeyError, AttributeError):
            continue
        if len(found) == 1 and tokenizer.decode(list(found)) == name:
            ids.add(int(found[0]))
    return frozenset(ids)


def works_for(ids_list, *, max_tokens, options, score, engine, stops) -> list[Work]:
    """One Work per prompt, each checked against the engine's limits."""
    works = []
    for ids in ids_list:
        try:
            engine.check(ids, max_tokens)
        except ValueError as e:
            raise _bad("prompt", str(e)) from None
        works.append(
            Work(
                ids=ids,
                max_tokens=max_tokens,
                notify=None,
                n=options["n"],
                temperature=options["temperature"],
                top_k=options["top_k"],
                top_p=options["top_p"],
                seed=options["seed"],
                stop=options["stop"],
                stop_ids=frozenset() if options["ignore_eos"] else stops,
                score=score,
            )
        )
    return works


def _top_dict(tokenizer, top, n) -> dict:
    ids, values = top
    return {tokenizer.decode([i]): v for i, v in zip(ids[:n], values[:n], strict=True)}


def completion_choice(choice: Choice, tokenizer, *, index, echo, logprobs, prompt_text) -> dict:
    """One entry of a completion's `choices`."""
    work = choice.work
    text = choice.text
    if echo:
        prompt_text = tokenizer.decode(work.ids) if prompt_text is None else prompt_text
        text = prompt_text + text
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(choice)}
    if logprobs is not None:
        tokens, values, tops = [], [], []
        if echo:
            tokens += list(work.ids)
            values += [None, *work.prompt_logprobs]
            tops += [None, *(_top_dict(tokenizer, t, logprobs) for t in work.prompt_top)]
        tokens += choice.tokens
        values += choice.logprobs
        tops += [_top_dict(tokenizer, t, logprobs) for t in choice.top]
        strings = [tokenizer.decode([t]) for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        out["logprobs"] = {
            "tokens": strings,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
    return out


def finish_reason(choice: Choice) -> str:
    return "stop" if choice.finish_reason == "stop" else "length"


def chat_logprobs(choice: Choice, tokenizer, top_n: int) -> dict:
    """A chat choice's `logprobs`: each token with its log-probability and alternatives."""

    def entry(token, value):
        text = tokenizer.decode([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for token, value, (ids, values) in zip(choice.tokens, choice.logprobs, choice.top, strict=True):
        alternatives = [entry(i, v) for i, v in zip(ids[:top_n], values[:top_n], strict=True)]
        content.append({**entry(token, value), "top_logprobs": alternatives})
    return {"content": content}


def usage(works: list[Work]) -> dict:
    prompt = sum(len(w.ids) for w in works)
    completion = sum(len(c.tokens) for w in works for c in w.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def envelope(kind: str, model: str) -> dict:
    """The fields every response object starts with."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }
