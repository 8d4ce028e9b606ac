"""Conversations as token ids and a loss mask, rendered through a chat template as transformers
renders it (`apply_chat_template(..., return_assistant_tokens_mask=True)`).

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}` (Hugging Face's and
OpenAI's form) or `{"prompt": ..., "completion": ...}`. The template is the checkpoint's own
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) or DEFAULT_TEMPLATE. It
runs in jinja2's immutable sandbox with transformers' settings and globals (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII, a guarded `dict` and `namespace`, `tools` and `documents` none, the special tokens by
name from tokenizer_config.json or else the tokenizer). The rendered text is tokenized whole,
special tokens parsed and none added, and a token is trained on when its characters overlap:
- a `{% generation %}` block's output, where the template has such blocks (transformers'
  assistant mask);
- else the text each assistant message adds to the rendering: rendering the messages before it
  with the generation prompt, then with it, the difference is its reply (and whatever the
  template closes a turn with, an end-of-turn token included).
A prompt-completion pair is the prompt's ids and the completion's, each tokenized alone, then
the end-of-sequence token (tokenizer_config.json's eos_token, else the tokenizer's end of text),
with the tokenizer's beginning-of-text token first where it has one (TRL's prompt-completion
form, no template); the completion and the end-of-sequence token are trained on.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np

from megajax.config import ConfigError

ROLES = ("system", "user", "assistant")
# The special tokens a template sees by name (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip
# For a run without a template of its own (a GPT-2 trained here): each turn after a role line,
# an assistant's reply closed by the end-of-text token, which generation stops at.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatError(ConfigError):
    """A conversation or template that cannot be rendered; the message says which and why."""


def messages_of(record) -> tuple[list[dict], bool]:
    """(messages, whether it is a prompt-completion pair as two messages) of one JSON record;
    ChatError on anything else."""
    if not isinstance(record, dict):
        raise ChatError("a conversation must be a JSON object with 'messages' (or 'prompt' and "
                        "'completion')")  # fmt: skip
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError("'messages' must be a non-empty list")
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                raise ChatError(
                    f"message {i}: unknown role {role!r}: use one of {', '.join(ROLES)}"
                )
            if not isinstance(m.get("content"), str):
                kind = type(m.get("content")).__name__
                raise ChatError(
                    f"message {i} ({m['role']}): the content must be a string, not {kind}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatError("a conversation with no assistant message has nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages], False
    if {"prompt", "completion"} <= set(record):
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ChatError("'prompt' and 'completion' must be strings, the completion non-empty")
        pair = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return pair, True
    raise ChatError(f"a conversation needs 'messages' or 'prompt' and 'completion', not "
                    f"{sorted(record)}")  # fmt: skip


def _token_text(value) -> str:
    """A special token from tokenizer_config.json: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def find_template(directory) -> tuple[str | None, dict]:
    """(template text or None, special tokens by name) of a Hugging Face tokenizer directory:
    `chat_template.jinja` (transformers 5), else `chat_template` in tokenizer_config.json (a
    string, or a list of named templates of which "default" is used)."""
    directory = Path(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    specials = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES if config.get(name)}
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8"), specials
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template, specials


# The (rendered blocks, generation spans) of the rendering under way in this thread, if any: a
# compiled template is shared (cached by its text), so the spans go to whoever renders.
_TRACKER: ContextVar[tuple[list, list] | None] = ContextVar("megajax_chat_tracker", default=None)


@cache
def _compile(source: str):
    """The template compiled in transformers' sandbox and with its globals (chat_template_utils
    `_cached_compile_jinja_template`), with a {% generation %} tag that records the character
    spans its blocks render into while a tracker is set."""
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_track", [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            if (tracker := _TRACKER.get()) is not None:
                blocks, spans = tracker
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class TemplateDict:  # dict() without the class itself reachable from the template
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore-prefixed attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore-prefixed attributes ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(_one_line(f"the chat template does not parse: {e}")) from None


def _one_line(message: str) -> str:
    return " ".join(message.split())


class ChatTemplate:
    """A chat template with the special tokens it may name, and the tokenizer that reads what it
    renders."""

    def __init__(self, source: str, tokenizer, specials: dict | None = None):
        self.source, self.tokenizer = source, tokenizer
        self.specials = {**default_specials(tokenizer), **(specials or {})}
        self.has_generation = _has_generation_tag(source)
        self._template = _compile(source)

    def render(self, messages, *, add_generation_prompt: bool = False):
        """(text, spans of its {% generation %} blocks), rendered as transformers renders it
        (no tools, no documents)."""
        import jinja2

        blocks, spans = [], []
        token = _TRACKER.set((blocks, spans))
        try:
            for block in self._template.generate(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.specials,
            ):
                blocks.append(block)
        except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names, ...
            raise ChatError(_one_line(f"the chat template raised: {e}")) from None
        except Exception as e:  # what Python raises inside it: "a" + 1, a missing key, ...
            message = f"the chat template raised {type(e).__name__}: {e}"
            raise ChatError(_one_line(message)) from None
        finally:
            _TRACKER.reset(token)
        return "".join(blocks), spans

    def assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans trained on)."""
        text, spans = self.render(messages)
        if self.has_generation:
            return text, spans
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, _ = self.render(messages[:i], add_generation_prompt=True)
            upto, _ = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ChatError(
                    "the chat template renders a conversation's beginning differently from the "
                    "whole, so its assistant turns cannot be found by rendering prefixes: give "
                    "it {% generation %} blocks around the assistant's text"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(self, record) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, loss mask uint8) of one conversation record."""
        messages, pair = messages_of(record)
        if pair:
            ids, mask = self._encode_pair(messages[0]["content"], messages[1]["content"])
        else:
            text, spans = self.assistant_spans(messages)
            ids, offsets = self.tokenizer.encode_with_offsets(text)
            ids, mask = np.asarray(ids, np.int32), _overlapping(offsets, spans)
        if not mask[1:].any():  # the first token is no token's target
            raise ChatError(
                "no token of the assistant's messages to train on (the chat template rendered "
                "none of their text)"
            )
        return ids, mask

    def _encode_pair(self, prompt: str, completion: str):
        tok = self.tokenizer
        bos = [] if tok.bos_id is None else [tok.bos_id]
        head = bos + list(tok.encode(prompt))
        tail = list(tok.encode(completion)) + self._eos()
        mask = np.r_[np.zeros(len(head), np.uint8), np.ones(len(tail), np.uint8)]
        return np.asarray(head + tail, np.int32), mask

    def _eos(self) -> list[int]:
        """[the end-of-sequence token's id]: the eos_token named, if it is one token."""
        if "eos_token" in self.specials:
            ids, _ = self.tokenizer.encode_with_offsets(self.specials["eos_token"])
            if len(ids) == 1:
                return list(ids)
        return [] if self.tokenizer.eot_id is None else [self.tokenizer.eot_id]

    def stop_ids(self) -> list[int]:
        """The tokens that end an assistant's turn: the end-of-sequence token, and the marker
        the template closes a reply with (Llama 3's <|eot_id|>, ChatML's <|im_end|>), found by
        rendering one."""
        marker = "\x00reply\x00"
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text, _ = self.render(probe)
        except ChatError:  # a template that insists on a system message, say
            return self._eos()
        tail = text[text.find(marker) + len(marker) :].lstrip()
        ids, offsets = self.tokenizer.encode_with_offsets(tail)
        stops = set(self._eos())
        if len(ids) and offsets[0][0] == 0 and tail[: offsets[0][1]].startswith("<"):
            first = tail[: offsets[0][1]]
            if first.endswith(">") and len(first) > 2:  # one token, a marker: <|eot_id|>, </s>
                stops.add(int(ids[0]))
        return sorted(stops)

    def prompt_ids(self, messages) -> list[int]:
        """A conversation's ids ready for the assistant's reply (the generation prompt)."""
        text, _ = self.render(messages, add_generation_prompt=True)
        return list(self.tokenizer.encode_with_offsets(text)[0])


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter: non-ASCII and HTML characters kept as they are."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _has_generation_tag(source: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def _overlapping(offsets, spans) -> np.ndarray:
    """1 for each token whose character range (start, end) overlaps a span, as transformers'
    assistant mask marks them (a sweep over both, in order): the span a token can overlap is
    the first that ends after it starts (spans end in the order they are rendered)."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    if not spans:
        return np.zeros(len(offsets), np.uint8)
    starts, ends = np.asarray(spans, np.int64).T
    s = np.searchsorted(ends, offsets[:, 0], side="right")
    inside = s < len(ends)
    overlap = inside & (offsets[:, 1] > starts[np.minimum(s, len(ends) - 1)])
    return overlap.astype(np.uint8)


def default_specials(tokenizer) -> dict:
    """The special tokens by name that the tokenizer itself gives: GPT-2's are those that
    transformers' GPT2Tokenizer sets (all <|endoftext|>), a tokenizer.json's its beginning- and
    end-of-text tokens; a tokenizer_config.json beside it names them instead."""
    if hasattr(tokenizer, "special_tokens"):
        return dict(tokenizer.special_tokens)
    out = {}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eot_id)):
        if i is not None:
            out[name] = tokenizer.token_text(i)
    return out


def template_source(directory=None, override: str = "") -> tuple[str, dict, str]:
    """(template text, special tokens named by the directory's tokenizer_config.json, where the
    text comes from) of a run: `override` (a .jinja file), else the tokenizer directory's own
    template, else DEFAULT_TEMPLATE. `directory` may be a tokenizer.json (its folder is read)."""
    source, specials, origin = None, {}, "default"
    if directory is not None:
        directory = Path(directory)
        directory = directory if directory.is_dir() else directory.parent
        source, specials = find_template(directory)
        if source is not None:
            origin = str(directory)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConfigError(f"data.chat_template: {path} not found")
        source, origin = path.read_text(encoding="utf-8"), str(path)
    return source or DEFAULT_TEMPLATE, specials, origin


def template_for(tokenizer, directory=None, override: str = "") -> ChatTemplate:
    """The chat template of a run (template_source) over its tokenizer."""
    source, specials, _ = template_source(directory, override)
    return ChatTemplate(source, tokenizer, specials)
