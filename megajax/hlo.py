"""Read the collectives of a compiled program from its optimized HLO text.

Each collective is attributed to the mesh axes its replica groups span and counted as many
times as it runs: a collective inside a `while` body runs once per trip.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # "all-reduce", "all-gather", ...
    axes: tuple[str, ...]  # mesh axes the replica groups span, e.g. ("model",)
    shapes: tuple[tuple[int, ...], ...]  # result shapes (a tuple all-reduce has several)
    bytes: int  # bytes of the result
    computation: str  # the HLO computation holding it
    runs: int  # executions per step (product of the trip counts of enclosing loops)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(math.prod(int(x) for x in dims.split(","))).reshape(
        [int(x) for x in dims.split(",")]
    )
    return ids.transpose([int(x) for x in perm.split(",")]) if perm else ids


def _groups(text: str) -> list[list[int]]:
    """Replica groups in any of XLA's printed forms: explicit {{0,1},{2,3}}, iota
    [G,S]<=[dims]T(p), or mesh['a'=2,'b'=4] {'a'} (with optional device_ids=(...))."""
    named = re.search(
        r"replica_groups=mesh\[([^\]]*)\]"
        r"(?:, device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,\s]+)\))? \{([^}]*)\}",
        text,
    )
    if named:
        axes = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        sizes = [int(n) for _, n in axes]
        if named.group(2):
            iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", named.group(2).strip())
            ids = (
                _iota(iota.group(1), iota.group(2))
                if iota
                else np.array([int(x) for x in re.findall(r"\d+", named.group(2))])
            )
        else:
            ids = np.arange(math.prod(sizes))
        ids = ids.reshape(sizes)
        reduced = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in named.group(3)]
        kept = [i for i in range(len(axes)) if i not in reduced]
        ids = ids.transpose(kept + reduced).reshape(-1, math.prod(sizes[i] for i in reduced))
        return ids.tolist()
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        return _iota(iota.group(2), iota.group(3)).reshape(shape).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
    if explicit:
        return [
            [int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))
        ]
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", text)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
    return []


def _axes(groups: list[list[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which the members of the first replica group differ."""
    names = list(mesh_shape)
    if not groups or len(groups[0]) <= 1:
        return ()
    coords = np.array(np.unravel_index(groups[0], [mesh_shape[n] for n in names])).T
    return tuple(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1)


def _split_computations(hlo: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line) if not line[:1].isspace() else None
        if match:
            current = match.group(1)
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    return comps


def _runs_per_computation(comps: dict[str, list[str]]) -> dict[str, int]:
    """How often each computation runs per program execution, from while trip counts."""
    entry = next((n for n in comps if n.startswith("main")), next(iter(comps)))
    calls: dict[str, list[tuple[str, int]]] = {n: [] for n in comps}
    for name, lines in comps.items():
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key in ("body", "condition", "to_apply", "calls"):
                for callee in re.findall(key + r"=%?([\w.\-]+)", line):
                    n = int(trips.group(1)) if trips and key in ("body", "condition") else 1
                    calls[name].append((callee, n))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                calls[name] += [(c.strip().lstrip("%"), 1) for c in group.split(",")]
    runs = {n: 0 for n in comps}

    def visit(name, times):
        if name not in runs:
            return
        runs[name] += times
        for callee, n in calls[name]:
            visit(callee, times * n)

    visit(entry, 1)
    return runs


def _in_branches(comps: dict[str, list[str]]) -> set[str]:
    """The computations that a conditional's branch runs (the branches and what they call)."""
    found, todo = set(), []
    for lines in comps.values():
        for line in lines:
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += [c.strip().lstrip("%") for c in group.split(",")]
            todo += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
    while todo:
        name = todo.pop()
        if name in found or name not in comps:
            continue
        found.add(name)
        for line in comps[name]:
            for key in ("body", "condition", "to_apply", "calls"):
                todo += re.findall(key + r"=%?([\w.\-]+)", line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += [c.strip().lstrip("%") for c in group.split(",")]
    return found


def dots(hlo: str) -> list[tuple[tuple[int, ...], bool]]:
    """Every dot (matmul) in optimized HLO text: its result shape, and whether it runs only
    inside a conditional's branch (so only where that branch is taken)."""
    comps = _split_computations(hlo)
    branches = _in_branches(comps)
    found = []
    for name, lines in comps.items():
        for line in lines:
            op = re.search(r"=\s*(\S+)\s+dot\(", line)
            if op:
                dims = _SHAPE.search(op.group(1)).group(2)
                found.append((tuple(int(d) for d in dims.split(",") if d), name in branches))
    return found


def collectives(hlo: str, mesh_shape: dict[str, int]) -> list[Collective]:
    """Every collective in optimized HLO text, with its mesh axes and executions per step."""
    comps = _split_computations(hlo)
    runs = _runs_per_computation(comps)
    found = []
    for name, lines in comps.items():
        for line in lines:
            op = _OP.search(line)
            if not op or "-done(" in line:
                continue
            result = op.group(1)
            shapes = tuple(
                tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(result)
            )
            nbytes = sum(
                _DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                for dt, dims in _SHAPE.findall(result)
            )
            if op.group(2) in ("all-gather", "reduce-scatter") and "-start(" in line:
                shapes, nbytes = shapes[-1:], nbytes  # async start: (operand, result) pair
            found.append(
                Collective(
                    kind=op.group(2),
                    axes=_axes(_groups(line), mesh_shape),
                    shapes=shapes,
                    bytes=nbytes,
                    computation=name,
                    runs=runs.get(name, 0),
                )
            )
    return found


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")


def _instructions(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(name, result type, opcode, the rest of the line) of each instruction."""
    return [m.groups() for m in map(_INSTR.match, lines) if m]


def _elements(result: str) -> int:
    return sum(
        math.prod(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(result)
    )


# Ops that hand a value on whole (elementwise or relayout): its users' slices count for it.
_PASS_THROUGH = (
    "get-tuple-element", "bitcast", "copy", "convert", "transpose", "reshape",
    "add", "subtract", "multiply", "divide", "negate",
)  # fmt: skip


def _slice_factor(comps, lines, value: str, elements: int) -> int:
    """How many times smaller than the value (`elements`) the piece its users keep is: the
    smallest factor over its users, following _PASS_THROUGH ops, and into fusions to the
    dynamic-slice of the matching parameter; 1 where a user reads it whole."""
    factors = []
    for name, result, opcode, rest in _instructions(lines):
        operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
        if value not in operands:
            continue
        if opcode in _PASS_THROUGH:
            factors.append(_slice_factor(comps, lines, name, elements))
        elif opcode == "dynamic-slice":
            factors.append(elements // max(_elements(result), 1))
        elif opcode == "fusion":
            callee = re.search(r"calls=%([\w.\-]+)", rest).group(1)
            index = operands.index(value)
            body = comps.get(callee, [])
            param = next(
                (n for n, _, op, r in _instructions(body) if op == "parameter" and
                 r.startswith(f"{index})")),
                None,
            )  # fmt: skip
            factors.append(_slice_factor(comps, body, param, elements) if param else 1)
        else:
            factors.append(1)
    return min(factors) if factors else 1


def reduce_scatter_factors(
    hlo: str, mesh_shape: dict[str, int]
) -> list[tuple[Collective, tuple[int, ...]]]:
    """Each all-reduce with, per reduced tensor, the factor by which the code after it slices
    the result (1: some user reads it whole). XLA:CPU prints GSPMD's reduce-scatter as an
    all-reduce whose every user keeps a 1/n slice: a factor equal to the group size n."""
    comps = _split_computations(hlo)
    found = []
    for comp, lines in comps.items():
        for name, result, opcode, _ in _instructions(lines):
            if opcode not in ("all-reduce", "all-reduce-start"):
                continue
            shapes = _SHAPE.findall(result)
            factors = []
            for i, (_, dims) in enumerate(shapes):
                n = math.prod(int(d) for d in dims.split(",") if d)
                if len(shapes) == 1:
                    factors.append(_slice_factor(comps, lines, name, n))
                    continue
                element = re.compile(rf"%{re.escape(name)}\), index={i}\b")
                parts = [
                    g
                    for g, _, op, rest in _instructions(lines)
                    if op == "get-tuple-element" and element.match(rest)
                ]
                kept = [_slice_factor(comps, lines, g, n) for g in parts]
                factors.append(min(kept, default=1))
            found.append((comp, tuple(factors)))
    reduces = [c for c in collectives(hlo, mesh_shape) if c.kind == "all-reduce"]
    assert [c.computation for c in reduces] == [comp for comp, _ in found]
    return [(c, factors) for c, (_, factors) in zip(reduces, found, strict=True)]
