"""The rule as a short program of in-place ``torch._foreach`` ops, for the torch backend.

Run over lists of tensors one operator at a time, :func:`fastopt.rule.update` would make
a new list for every operator: 20-odd for Adam, each an allocation and a pass over the
batch, then a copy back of every array it changed. Torch's own foreach Adam takes seven
ops, mostly in place. So the torch backend does not run the rule directly. For each set of
switches it

1. traces :func:`~fastopt.rule.update` once with symbolic values (the rule's own source,
   as for Triton: no second copy of the update math);
2. drops what the outputs do not need and rewrites the trace into torch's fused
   multi-tensor ops: ``x + a * s`` into ``add(x, a, alpha=s)``, ``x + a * b * s`` into
   ``addcmul``, ``x + a / b * s`` into ``addcdiv``, ``a * (1 / b)`` into ``a / b``;
3. does each op in place on an operand that no later op reads (a temporary, or a state
   array whose old value is dead), so that state is updated where it lives;
4. writes the result as Python source, compiled once and cached.

Fusing changes the order of a few roundings (``a / b * s`` rather than ``a * (1 / b) * s``):
a few units in the last place per step, well inside what the tests allow a backend.
"""

from __future__ import annotations

import functools
import itertools
import linecache
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .. import rule

# update()'s list inputs and outputs, and the scalars it takes
LIST_INPUTS = ("p", "g", "h", "m", "v", "vmax", "gavg", "u")
OUTPUTS = ("p", "m", "v", "vmax", "gavg", "u")
SCALARS = (
    "lr", "weight_decay", "decay_factor", "grad_scale", "m_decay", "m_weight", "m_out",
    "g_out", "v_decay", "v_weight", "v_scale", "eps",
)  # fmt: skip
# arrays the program may overwrite: the param and the state, never the gradient or H u
WRITABLE = frozenset(OUTPUTS)


@dataclass(eq=False)
class Node:
    """One value of the trace: a list of tensors or a scalar."""

    op: str
    args: list[Any]  # Nodes, and for 'const' the number
    is_list: bool
    order: float  # position in the trace; a fused node takes the position of the op it ends
    name: str = ""  # inputs: the argument's name


@dataclass
class _Trace:
    counter: itertools.count = field(default_factory=itertools.count)

    def node(self, op: str, args: list[Any], is_list: bool, name: str = "") -> Node:
        return Node(op, args, is_list, next(self.counter), name)


class _Sym:
    """A traced value: arithmetic on it records a node instead of computing."""

    __slots__ = ("trace", "node")

    def __init__(self, trace: _Trace, node: Node):
        self.trace, self.node = trace, node

    def _lift(self, other: Any) -> Node:
        if isinstance(other, _Sym):
            return other.node
        if isinstance(other, float | int):
            return self.trace.node("const", [float(other)], False)
        raise TypeError(f"cannot trace an operation with {type(other).__name__}")

    def _op(self, op: str, *args: Node) -> _Sym:
        return _Sym(self.trace, self.trace.node(op, list(args), any(a.is_list for a in args)))

    def _binary(self, op: str, a: Node, b: Node) -> _Sym:
        # a list op takes its list first: (scalar op list) is written with the list first
        if not a.is_list and b.is_list:
            if op in ("add", "mul", "max"):
                a, b = b, a
            elif op == "sub":  # s - x = (-x) + s
                return self._op("add", self._op("neg", b).node, a)
            elif op == "div":  # s / x
                return self._op("rdiv", a, b)
        return self._op(op, a, b)

    def __add__(self, o):
        return self._binary("add", self.node, self._lift(o))

    def __radd__(self, o):
        return self._binary("add", self._lift(o), self.node)

    def __sub__(self, o):
        return self._binary("sub", self.node, self._lift(o))

    def __rsub__(self, o):
        return self._binary("sub", self._lift(o), self.node)

    def __mul__(self, o):
        return self._binary("mul", self.node, self._lift(o))

    def __rmul__(self, o):
        return self._binary("mul", self._lift(o), self.node)

    def __truediv__(self, o):
        return self._binary("div", self.node, self._lift(o))

    def __rtruediv__(self, o):
        return self._binary("div", self._lift(o), self.node)

    def __neg__(self):
        return self._op("neg", self.node)

    def sqrt(self):
        return self._op("sqrt", self.node)

    def abs(self):
        return self._op("abs", self.node)

    def maximum(self, o):
        return self._binary("max", self.node, self._lift(o))


def trace(switches: dict[str, int]) -> dict[str, Node]:
    """update() traced for these switches: the node of each output."""
    tr = _Trace()
    lists = {n: _Sym(tr, tr.node("input", [], True, n)) for n in LIST_INPUTS}
    scalars = {n: _Sym(tr, tr.node("input", [], False, n)) for n in SCALARS}
    out = rule.update(**lists, **scalars, **switches)
    return {name: sym.node for name, sym in zip(OUTPUTS, out)}


# ---- rewriting ---------------------------------------------------------------------------


def _reachable(outputs: dict[str, Node]) -> list[Node]:
    seen: dict[int, Node] = {}
    stack = list(outputs.values())
    while stack:
        n = stack.pop()
        if id(n) not in seen:
            seen[id(n)] = n
            stack.extend(a for a in n.args if isinstance(a, Node))
    return sorted(seen.values(), key=lambda n: n.order)


def _uses(nodes: list[Node], outputs: dict[str, Node]) -> dict[int, int]:
    uses = {id(n): 0 for n in nodes}
    for n in nodes:
        for a in n.args:
            if isinstance(a, Node):
                uses[id(a)] += 1
    for n in outputs.values():
        uses[id(n)] += 1
    return uses


class _Rewriter:
    def __init__(self, outputs: dict[str, Node]):
        self.outputs = dict(outputs)

    @staticmethod
    def scalar(op: str, *args: Node) -> Node:
        # just after its arguments, so before the fused op that reads it
        return Node(op, list(args), False, max(a.order for a in args) + 1e-3)

    def run(self) -> dict[str, Node]:
        while self._rewrite_once():
            pass
        return self.outputs

    def _rewrite_once(self) -> bool:
        nodes = _reachable(self.outputs)
        uses = _uses(nodes, self.outputs)
        for n in nodes:
            if n.is_list:
                new = self._fuse(n, lambda x: x.is_list and x.op != "input" and uses[id(x)] == 1)
                if new is not None:
                    self._replace(nodes, n, new)
                    return True
        return False

    def _replace(self, nodes: list[Node], old: Node, new: Node) -> None:
        for n in nodes:
            n.args = [new if a is old else a for a in n.args]
        self.outputs = {k: new if v is old else v for k, v in self.outputs.items()}

    def _fuse(self, n: Node, single: Callable[[Node], bool]) -> Node | None:
        """A fused node equal to ``n``, or None. ``single(x)``: x is a list op read only by n."""
        op, args = n.op, n.args

        def fused(new_op: str, *new_args: Node) -> Node:
            return Node(new_op, list(new_args), True, n.order)

        # a * (k / b) -> (a / b) * k, and just a / b for k = 1
        if op == "mul" and len(args) == 2 and args[1].is_list:
            for a, r in (args, args[::-1]):
                if r.op == "rdiv" and single(r) and a.is_list:
                    k, b = r.args
                    div = fused("div", a, b)
                    if k.op == "const" and k.args[0] == 1.0:
                        return div
                    div.order = n.order - 0.5  # after a and b, before the product
                    return fused("mul", div, k)
        if op in ("add", "sub") and args[1].is_list or op == "add" and args[0].is_list:
            pairs = [(args[0], args[1])]
            if op == "add":
                pairs.append((args[1], args[0]))
            for x, y in pairs:
                if not (x.is_list and y.is_list and single(y)):
                    continue
                sign = (lambda s: s) if op == "add" else (lambda s: self.scalar("neg", s))
                one = Node("const", [1.0], False, -1)
                # x + a * b * s -> addcmul; x + a / b * s -> addcdiv; x + a * s -> add alpha.
                # Not x - a * b: torch's CPU addcmul may round a * b + x once (FMA), and a
                # difference of products is where that changes the result most: the centered
                # variance v - gavg^2 is exactly 0 for a gradient that never changed, and the
                # rule (and the reference) then take 1 / (sqrt(0) + eps), not 1 / sqrt(ulp).
                products = op == "add"
                if y.op == "mul" and not y.args[1].is_list:
                    inner, s = y.args
                    if inner.op in ("mul", "div") and inner.args[1].is_list and single(inner):
                        if inner.op == "div":
                            return fused("addcdiv", x, inner.args[0], inner.args[1], sign(s))
                        if products:
                            return fused("addcmul", x, inner.args[0], inner.args[1], sign(s))
                    return fused("add_alpha", x, inner, sign(s))
                if y.op == "mul" and products:
                    a, b = y.args
                    if a.op == "mul" and not a.args[1].is_list and single(a):  # (a s) b
                        return fused("addcmul", x, a.args[0], b, a.args[1])
                    return fused("addcmul", x, a, b, one)
                if y.op == "div" and y.args[1].is_list:
                    return fused("addcdiv", x, y.args[0], y.args[1], sign(one))
        # a scalar factor of the added term moves into alpha or value
        if op == "add_alpha":
            x, a, s = args
            if a.op == "mul" and not a.args[1].is_list and single(a):
                return fused(op, x, a.args[0], self.scalar("mul", s, a.args[1]))
        if op in ("addcmul", "addcdiv"):
            x, a, b, s = args
            if a.op == "mul" and not a.args[1].is_list and single(a):
                return fused(op, x, a.args[0], b, self.scalar("mul", s, a.args[1]))
            if op == "addcmul" and b.op == "mul" and not b.args[1].is_list and single(b):
                return fused(op, x, a, b.args[0], self.scalar("mul", s, b.args[1]))
        return None


# ---- code generation ---------------------------------------------------------------------

# list op -> (torch function, how its arguments are written); "{0}" the base list
_LIST_CALLS = {
    "add": "_foreach_add{_}({0}, {1})",
    "sub": "_foreach_sub{_}({0}, {1})",
    "mul": "_foreach_mul{_}({0}, {1})",
    "div": "_foreach_div{_}({0}, {1})",
    "max": "_foreach_maximum{_}({0}, {1})",
    "neg": "_foreach_neg{_}({0})",
    "sqrt": "_foreach_sqrt{_}({0})",
    "abs": "_foreach_abs{_}({0})",
    "add_alpha": "_foreach_add{_}({0}, {1}, alpha={2})",
    "addcmul": "_foreach_addcmul{_}({0}, {1}, {2}, value={3})",
    "addcdiv": "_foreach_addcdiv{_}({0}, {1}, {2}, value={3})",
}
_SCALAR_CODE = {
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "neg": "-{0}",
    "sqrt": "_sqrt({0})",
    "abs": "abs({0})",
    "max": "max({0}, {1})",
}
_COMMUTATIVE = ("add", "mul", "max")


class _CrossRole(Exception):
    """An output would end in another array's storage: plan without writing inputs."""


def _generate(outputs: dict[str, Node], write_inputs: bool) -> str:
    nodes = _reachable(outputs)
    last: dict[int, float] = {}  # id -> position of its last reader (inf: an output)
    for i, n in enumerate(nodes):
        for a in n.args:
            if isinstance(a, Node):
                last[id(a)] = i
    for n in outputs.values():
        last[id(n)] = math.inf
    name: dict[int, str] = {}
    home: dict[int, str] = {}  # id -> the array whose storage holds the value
    temps = itertools.count()
    body: list[str] = []

    def writable(x: Node, i: int) -> bool:
        if not x.is_list or last[id(x)] != i:
            return False
        return home[id(x)] not in LIST_INPUTS or write_inputs and home[id(x)] in WRITABLE

    for i, n in enumerate(nodes):
        if n.op == "input":
            name[id(n)], home[id(n)] = (n.name.upper(), n.name) if n.is_list else (n.name, "")
            continue
        if n.op == "const":
            name[id(n)] = repr(n.args[0])
            continue
        args = list(n.args)
        if not n.is_list:
            name[id(n)] = f"s{next(temps)}"
            body.append(f"{name[id(n)]} = " + _SCALAR_CODE[n.op].format(*(name[id(a)] for a in args)))
            continue
        if n.op == "rdiv":  # k / x: reciprocal, then times k
            k, x = args
            if writable(x, i):
                var, where = name[id(x)], home[id(x)]
                body.append(f"torch._foreach_reciprocal_({var})")
            else:
                var = where = f"t{next(temps)}"
                body.append(f"{var} = torch._foreach_reciprocal({name[id(x)]})")
            if not (k.op == "const" and k.args[0] == 1.0):
                body.append(f"torch._foreach_mul_({var}, {name[id(k)]})")
            name[id(n)], home[id(n)] = var, where
            continue
        if n.op in _COMMUTATIVE and args[1].is_list and not writable(args[0], i) and writable(args[1], i):
            args = [args[1], args[0]]
        in_place = writable(args[0], i)
        call = _LIST_CALLS[n.op].format(*(name[id(a)] for a in args), _="_" if in_place else "")
        if in_place:
            body.append(f"torch.{call}")
            name[id(n)], home[id(n)] = name[id(args[0])], home[id(args[0])]
        else:
            var = f"t{next(temps)}"
            body.append(f"{var} = torch.{call}")
            name[id(n)], home[id(n)] = var, var
    # each output into its own array's storage
    for role, n in outputs.items():
        if home[id(n)] == role:
            continue
        if home[id(n)] in WRITABLE:
            # copying it here could read an array already overwritten by another copy
            if write_inputs:
                raise _CrossRole(role)
            raise NotImplementedError(f"output {role} is the unchanged input {home[id(n)]}")
        body.append(f"torch._foreach_copy_({role.upper()}, {name[id(n)]})")
    args = ", ".join([n.upper() for n in LIST_INPUTS] + list(SCALARS))
    return f"def run({args}):\n" + "".join(f"    {line}\n" for line in body or ["pass"])


def compile_program(switches: dict[str, int], write_inputs: bool = True) -> tuple[Callable[..., None], str]:
    """The program for these switches and its source. With ``write_inputs=False`` only
    temporaries are written in place and every output is copied into its array at the end
    (the plan taken when writing in place would leave an output in another's storage)."""
    outputs = _Rewriter(trace(switches)).run()
    outputs = {role: n for role, n in outputs.items() if not (n.op == "input" and n.name == role)}
    try:
        code = _generate(outputs, write_inputs)
    except _CrossRole:
        code = _generate(outputs, write_inputs=False)
    env: dict[str, Any] = {"torch": torch, "_sqrt": rule.sqrt}
    filename = f"<fastopt foreach program {sorted(switches.items())}, write_inputs={write_inputs}>"
    exec(compile(code, filename, "exec"), env)
    # a traceback through the program shows its lines, as for a file
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    return env["run"], code


class Program(NamedTuple):
    """``run(P, G, H, M, V, VMAX, GAVG, U, lr, ..., eps)``: one step of the rule on lists of
    tensors, leaving the new param and state in P, M, V, VMAX, GAVG and U. G and H are only
    read; an array the switches do not use may be None. ``source``: its Python source;
    ``ops``: how many foreach ops it runs."""

    run: Callable[..., None]
    source: str
    ops: int


def program(switches: dict[str, int]) -> Program:
    """The program for these switches, compiled once per set of switches."""
    return _cached(tuple(sorted(switches.items())))


def source(switches: dict[str, int]) -> str:
    """The Python source of :func:`program` for these switches."""
    return program(switches).source


@functools.cache
def _cached(key: tuple[tuple[str, int], ...]) -> Program:
    run, code = compile_program(dict(key))
    return Program(run, code, code.count("torch._foreach_"))
