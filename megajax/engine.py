"""Continuous batching: concurrent requests decoded together on one model, each joining the
running batch at the next step and leaving it when done (as vLLM and JetStream batch).

One thread owns the model (`Engine.run`); everything else talks to it through a bounded queue
and callbacks. The decoding batch is a KV cache of (layers, rows, slots, kv heads, head_dim)
used as a ring: all rows write the token of decode step t at slot t mod slots, and each row
attends only to the slots written since it joined (attention does not care where a key sits:
its position was applied when it was written), so a row can join at any step without moving
the others. A joining prompt runs through the model once (prefill), and its keys and values
are written to the slots just behind the clock, as if it had been decoded there. A request
fits when prompt + max_tokens - 1 <= slots (the last token is never fed back), so a row never
overwrites its own keys.

Every compiled shape comes from buckets: rows are the data degree times a power of two up to
`max_rows`, prompt widths 16 times a power of two up to `slots`. So the programs are at most
rows x widths prefills, rows decode steps and rows^2 regroupings (the rows moved into a larger
or smaller cache), all compiled on first use or by `warm_up`, and never more.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import traceback
from collections.abc import Callable

import numpy as np

from megajax import parallel, sampling

TOP = 5  # alternatives scored at every position (OpenAI's most for completions' logprobs)
WIDTH_BUCKET = 16  # the narrowest prompt bucket


class QueueFull(RuntimeError):
    """The engine's queue holds as many requests as it may."""


@dataclasses.dataclass
class Work:
    """One prompt to complete `n` times. The engine fills `choices` and calls `notify(choice,
    delta_text)` from its thread as text arrives and once more when a choice finishes."""

    ids: list[int]
    max_tokens: int
    notify: Callable
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: frozenset = frozenset()
    score: bool = False  # the prompt's own log-probabilities and alternatives
    cancelled: bool = False
    choices: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None  # per prompt token after the first
    prompt_top: list | None = None  # (ids, values) per prompt token after the first


@dataclasses.dataclass
class Choice:
    """One completion of a Work: its tokens, their log-probabilities and alternatives, text."""

    work: Work
    index: int
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already handed to notify
    finish_reason: str | None = None
    stopped_by_token: bool = False  # the last token is the end of text, outside `text`


def buckets(low: int, high: int) -> list[int]:
    """low, 2 low, 4 low, ... up to high (high included)."""
    out = [low]
    while out[-1] < high:
        out.append(min(out[-1] * 2, high))
    return out


def bucket(sizes: list[int], size: int) -> int:
    return next(b for b in sizes if b >= size)


class Engine:
    """Serves Work on a Generator's model and mesh (megajax.generate.Generator), in the thread
    that calls run(); submit() from any thread."""

    def __init__(
        self,
        generator,
        tokenizer,
        *,
        max_rows: int = 8,
        max_queue: int = 64,
        slots: int | None = None,
    ):
        import jax

        self.generator, self.tokenizer = generator, tokenizer
        self.sharded, self.params = generator.sharded, generator.params
        self.vocab_size = generator.vocab_size
        self.slots = min(slots or generator.seq_len, generator.seq_len)
        degree = generator.data_degree
        self.rows = buckets(degree, max(degree, -(-max_rows // degree) * degree))
        self.widths = buckets(min(WIDTH_BUCKET, self.slots), self.slots)
        self.max_rows = self.rows[-1]
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.programs: dict = {}
        self.compiled = 0  # programs compiled so far: none after warm_up
        self.busiest = 0  # the most rows decoded in one step
        self.joined_running = 0  # requests that joined while others decoded
        self._pending: list[Work] = []  # taken from the queue, waiting for rows
        self._row: list[Choice | None] = []  # the choice decoding in each row of the cache
        self._cache = None
        self._clock = 0  # the decode step; its token goes to slot clock % slots
        self._begin = np.zeros(0, np.int64)  # the step at which each row's first token sits
        self._stopping = threading.Event()
        mesh = self.sharded.mesh
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        with self.sharded.context():
            spec = parallel.spec("layers", "batch", "length", "heads", None)
        self._cache_sharding = jax.sharding.NamedSharding(mesh, spec)

    # The web side ------------------------------------------------------------------------------

    def check(self, ids: list[int], max_tokens: int) -> None:
        """ValueError when a prompt cannot be served: empty, foreign ids, or too long."""
        if not ids:
            raise ValueError("a prompt needs at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        # The last token chosen is never fed back: prompt + max_tokens - 1 tokens take slots
        # (a prompt of the whole context is scored, and its next token chosen, as lm-eval asks).
        if len(ids) + max(max_tokens, 1) - 1 > self.slots:
            raise ValueError(
                f"the prompt's {len(ids)} tokens and max_tokens {max_tokens} exceed the model's "
                f"{self.slots} positions: shorten the prompt or ask for fewer tokens"
            )

    def submit(self, job) -> None:
        """Queue a list of Work (served together, as one request) or a callable the model
        thread runs alone between steps; QueueFull when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server's queue is full ({self.queue.maxsize} requests)") from None

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.queue.put_nowait(None)  # wakes run() if it waits
        except queue.Full:
            pass

    # The model thread --------------------------------------------------------------------------

    def run(self, *, until_idle: bool = False) -> None:
        """Serve until stop() (or, until_idle, until nothing is left to do): take requests,
        admit them as rows free up, decode a step."""
        while not self._stopping.is_set():
            idle = not (any(self._row) or self._pending)
            if until_idle and idle and self.queue.empty():
                return
            try:
                self._take(block=idle)
                self._admit()
                if any(self._row):
                    self._decode()
            except Exception:  # a failed step ends its requests, not the server
                traceback.print_exc()
                for r, choice in enumerate(self._row):
                    if choice is not None:
                        self._finish(r, "error")
                self._reset()

    def _take(self, *, block: bool) -> None:
        """Move requests from the queue to the pending list while rows could take them; run
        callables at once (the batch waits for them)."""
        while len(self._pending) < self.max_rows and not self._stopping.is_set():
            try:
                job = self.queue.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if job is None:
                continue
            if callable(job):
                job()
                continue
            self._pending.extend(job)

    def _admit(self) -> None:
        """Prefill the pending prompts that fit the free rows, in order; each choice of a work
        takes a row, kept while it decodes."""
        self._pending = [w for w in self._pending if not w.cancelled]
        joining, used = [], sum(c is not None for c in self._row)
        while self._pending and used + len(joining) + self._pending[0].n <= self.max_rows:
            work = self._pending.pop(0)
            work.choices = [Choice(work, i) for i in range(work.n)]
            joining.extend(work.choices)
        if not joining:
            return
        self.joined_running += used > 0
        self._resize(used + len(joining))
        free = [r for r, c in enumerate(self._row) if c is None]
        rows = len(self._row)
        width = bucket(self.widths, max(len(c.work.ids) for c in joining))
        ids = np.zeros((rows, width), np.int32)
        pads = np.full(rows, width, np.int32)  # rows not joining: no prompt, nothing written
        params = self._row_params()
        for r, choice in zip(free, joining, strict=False):
            work = choice.work
            ids[r, width - len(work.ids) :] = work.ids
            pads[r] = width - len(work.ids)
            self._set_row_params(params, r, choice, step=0)
            self._row[r] = choice
            self._begin[r] = self._clock - len(work.ids)
        fn = self._program("prefill", rows, width)
        score = np.bool_(any(c.work.score for c in joining))
        clock = np.int32(self._clock)
        self._cache, out = fn(self.params, self._cache, ids, pads, clock, score, *params)
        out = {k: np.asarray(v) for k, v in out.items()}
        for r, choice in zip(free, joining, strict=False):
            work, start = choice.work, pads[r]
            if work.score and work.prompt_logprobs is None:
                work.prompt_logprobs = out["prompt_logprobs"][r, start:].tolist()
                work.prompt_top = list(
                    zip(
                        out["prompt_top_ids"][r, start:].tolist(),
                        out["prompt_top_values"][r, start:].tolist(),
                        strict=True,
                    )
                )
            if work.max_tokens == 0:
                self._finish(r, "length")
                continue
            self._add_token(
                r, out["token"][r], out["logprob"][r], out["top_ids"][r], out["top_values"][r]
            )
        self._settle()  # requests wanting no more than the prefill's token are done

    def _decode(self) -> None:
        """One token for every row, then hand each its token."""
        rows = len(self._row)
        tokens = np.zeros(rows, np.int32)
        params = self._row_params()
        for r, choice in enumerate(self._row):
            if choice is not None:
                tokens[r] = choice.tokens[-1]
                self._set_row_params(params, r, choice, step=len(choice.tokens))
        active = [c is not None for c in self._row]
        self.busiest = max(self.busiest, sum(active))
        begin = np.where(active, self._begin, self._clock)
        fn = self._program("decode", rows)
        self._cache, out = fn(
            self.params, self._cache, tokens, np.int32(self._clock), begin.astype(np.int32), *params
        )
        out = {k: np.asarray(v) for k, v in out.items()}
        self._clock += 1
        for r, choice in enumerate(self._row):
            if choice is not None:
                self._add_token(
                    r, out["token"][r], out["logprob"][r], out["top_ids"][r], out["top_values"][r]
                )
        self._settle()

    def _settle(self) -> None:
        """After rows left: an empty batch frees its cache (the next starts afresh), a smaller
        one moves into the smaller bucket."""
        active = sum(c is not None for c in self._row)
        if not active:
            self._reset()
        elif bucket(self.rows, active) < len(self._row):
            self._resize(active)

    def _reset(self) -> None:
        self._cache, self._row, self._clock = None, [], 0
        self._begin = np.zeros(0, np.int64)

    def _row_params(self) -> list[np.ndarray]:
        """Per-row sampling inputs: seed, choice index, step, temperature, top_k, top_p."""
        rows = len(self._row)
        kinds = (np.uint32, np.int32, np.int32, np.float32, np.int32)
        return [*(np.zeros(rows, kind) for kind in kinds), np.ones(rows, np.float32)]

    @staticmethod
    def _set_row_params(params, r, choice, *, step) -> None:
        work = choice.work
        values = (work.seed, choice.index, step, work.temperature, work.top_k, work.top_p)
        for array, value in zip(params, values, strict=True):
            array[r] = value

    def _add_token(self, r, token, logprob, top_ids, top_values) -> None:
        """Append a chosen token to row r's choice; finish it at a stop token, a stop string,
        max_tokens or cancellation; else hand on the text that no stop string can take back."""
        choice = self._row[r]
        work, token = choice.work, int(token)
        choice.tokens.append(token)
        choice.logprobs.append(float(logprob))
        choice.top.append((top_ids.tolist(), top_values.tolist()))
        if token in work.stop_ids:  # scored with the others, but not part of the text
            choice.stopped_by_token = True
            return self._finish(r, "stop")
        choice.text = self.tokenizer.decode(choice.tokens)
        cut = min((i for i in (choice.text.find(s) for s in work.stop) if i >= 0), default=-1)
        if cut >= 0:
            choice.text = choice.text[:cut]
            return self._finish(r, "stop")
        if work.cancelled:
            return self._finish(r, "cancelled")
        if len(choice.tokens) >= work.max_tokens:
            return self._finish(r, "length")
        # Text a stop string might still claim, or an unfinished character, waits.
        held = max((_overlap(choice.text, s) for s in work.stop), default=0)
        safe = len(choice.text) - held
        while safe > choice.sent and choice.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > choice.sent:
            _tell(choice, choice.text[choice.sent : safe])
            choice.sent = safe

    def _finish(self, r, reason) -> None:
        choice = self._row[r]
        self._row[r] = None
        choice.finish_reason = reason
        delta = choice.text[choice.sent :]
        choice.sent = len(choice.text)
        _tell(choice, delta)

    def _resize(self, needed: int) -> None:
        """Give the cache the rows bucket `needed` takes, its decoding rows first."""
        import jax

        rows = bucket(self.rows, needed)
        if rows == len(self._row) and self._cache is not None:
            return
        if self._cache is None:
            shape = self._cache_shape(rows)
            zeros = jax.jit(
                lambda: {k: jax.numpy.zeros(shape, self._dtype()) for k in ("k", "v")},
                out_shardings=self._cache_sharding,
            )
            self._cache = zeros()
            self._row, self._begin = [None] * rows, np.zeros(rows, np.int64)
            return
        keep = [r for r, c in enumerate(self._row) if c is not None]
        order = np.array(keep + [r for r in range(len(self._row)) if r not in keep], np.int32)
        order = np.resize(order, rows)  # rows added copy old ones: masked until a prompt joins
        fn = self._program("regroup", len(self._row), rows)
        self._cache = fn(self._cache, order)
        self._row = [
            self._row[i] if i < len(self._row) and n < len(keep) else None
            for n, i in enumerate(order)
        ]
        self._begin = self._begin[order]

    # Programs ---------------------------------------------------------------------------------

    def _dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.sharded.cfg.model.compute_dtype)

    def _cache_shape(self, rows):
        m = self.sharded.cfg.model
        heads = m.kv_slots(self.sharded.mesh.shape[parallel.MODEL])
        return (m.num_layers, rows, self.slots, heads, m.head_dim)

    def warm_up(self, widths=None) -> int:
        """Compile every program requests can need (with `widths`, prompts up to the largest
        of them); returns how many programs there are."""
        widths = self.widths if widths is None else sorted({bucket(self.widths, w) for w in widths})
        for rows in self.rows:
            self._program("decode", rows)
            for width in widths:
                self._program("prefill", rows, width)
            for other in self.rows:
                if other != rows:
                    self._program("regroup", rows, other)
        return len(self.programs)

    def _program(self, kind: str, *shape):
        """The compiled program of this kind and bucketed shape, compiled on first use."""
        import jax

        key = (kind, *shape)
        if key in self.programs:
            return self.programs[key]
        rep = self._replicated

        def arg(s, dtype, sharding=rep):
            return jax.ShapeDtypeStruct(s, dtype, sharding=sharding)

        def cache(rows):
            return {
                k: arg(self._cache_shape(rows), self._dtype(), self._cache_sharding)
                for k in ("k", "v")
            }

        rows = shape[0]
        per_row = [
            arg((rows,), t)
            for t in (np.uint32, np.int32, np.int32, np.float32, np.int32, np.float32)
        ]
        outs = (self._cache_sharding, rep)
        with self.sharded.context():
            if kind == "prefill":
                width = shape[1]
                args = [
                    self.params,
                    cache(rows),
                    arg((rows, width), np.int32),
                    arg((rows,), np.int32),
                    arg((), np.int32),
                    arg((), np.bool_),
                    *per_row,
                ]
                fn = jax.jit(self._prefill, donate_argnums=1, out_shardings=outs)
            elif kind == "decode":
                args = [
                    self.params,
                    cache(rows),
                    arg((rows,), np.int32),
                    arg((), np.int32),
                    arg((rows,), np.int32),
                    *per_row,
                ]
                fn = jax.jit(self._decode_step, donate_argnums=1, out_shardings=outs)
            else:
                args = [cache(rows), arg((shape[1],), np.int32)]
                fn = jax.jit(
                    lambda c, order: jax.tree.map(lambda x: x[:, order], c),
                    out_shardings=self._cache_sharding,
                )
            self.programs[key] = fn.lower(*args).compile()
        self.compiled += 1
        return self.programs[key]

    def _choose(self, model, hidden, seed, index, step, temperature, top_k, top_p):
        """Each row's next token from hidden (rows, hidden), its log-probability and the TOP
        most likely; row keys as megajax.generate draws them: (seed, choice index, step)."""
        import jax

        def key(s, i, t):
            return jax.random.key_data(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), t)
            )

        keys = jax.vmap(key)(seed, index, step)
        token, logprob, values, ids = sampling.sample(
            hidden,
            model.lm_head,
            keys,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            vocab_size=self.vocab_size,
            top=TOP,
        )
        return {"token": token, "logprob": logprob, "top_values": values, "top_ids": ids}

    def _prefill(self, params, cache, ids, pads, clock, score, *row):
        """The prompts of the joining rows (left-padded in ids (rows, width); pads = width on
        the others) through the model: their keys and values written behind the clock, their
        first tokens chosen, and with `score` every prompt token scored."""
        import jax
        import jax.numpy as jnp

        model = self.sharded.model(params)
        (rows, width), slots = ids.shape, self.slots
        at = jnp.arange(width)
        real = at[None, :] >= pads[:, None]  # (rows, width)
        mask = (at[:, None] >= at[None, :])[None] & real[:, None, :]
        positions = jnp.maximum(at[None, :] - pads[:, None], 0)
        hidden, fresh = model.extend(
            ids, model.empty_cache(rows, width), start=0, positions=positions, mask=mask[:, None]
        )
        # Prompt slot i of a row goes to ring slot clock - width + i; padding nowhere.
        ring = jnp.where(real, (clock - width + at[None, :]) % slots, slots)
        which = jnp.arange(rows)[:, None]
        cache = {
            k: cache[k].at[:, which, ring].set(fresh[k].astype(cache[k].dtype), mode="drop")
            for k in ("k", "v")
        }
        out = self._choose(model, hidden[:, -1], *row)
        # Prompt scores: log p of token j + 1 after tokens up to j, with the TOP best there.
        # Only when a joining request echoes its prompt: the head over every prompt position
        # costs as much as several layers.
        shape = (rows, width - 1)

        def scores():
            flat = hidden[:, :-1].reshape(rows * (width - 1), -1)
            logprob, values, top_ids = sampling.score(
                flat, model.lm_head, ids[:, 1:].reshape(-1), n=TOP, vocab_size=self.vocab_size
            )
            return logprob.reshape(shape), values.reshape(*shape, TOP), top_ids.reshape(*shape, TOP)

        def none():
            top = (*shape, TOP)
            return jnp.zeros(shape), jnp.zeros(top), jnp.zeros(top, jnp.int32)

        names = ("prompt_logprobs", "prompt_top_values", "prompt_top_ids")
        out.update(zip(names, jax.lax.cond(score, scores, none), strict=True))
        return cache, out

    def _decode_step(self, params, cache, tokens, clock, begin, *row):
        """Each row's last token fed at ring slot clock % slots and position clock - begin,
        attending the slots written since its begin; its next token chosen."""
        import jax.numpy as jnp

        model = self.sharded.model(params)
        slots = self.slots
        age = (clock - jnp.arange(slots)) % slots  # steps since each slot was written
        live = age[None, :] <= (clock - begin)[:, None]  # (rows, slots)
        hidden, cache = model.extend(
            tokens[:, None],
            cache,
            start=clock % slots,
            positions=(clock - begin)[:, None],
            mask=live[:, None, None, :],
        )
        return cache, self._choose(model, hidden[:, 0], *row)


def _tell(choice: Choice, delta: str) -> None:
    """Hand new text to the request; one whose client is gone fails alone."""
    try:
        choice.work.notify(choice, delta)
    except Exception:
        choice.work.cancelled = True
        traceback.print_exc()


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of text that begins stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
