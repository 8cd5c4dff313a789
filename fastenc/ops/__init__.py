"""torch.library custom ops (namespace `fastenc`), one file per op, each with fake kernels and autograd."""

from __future__ import annotations

import typing
from typing import Callable

import torch
from torch import Tensor

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_SCHEMA_TYPES = {Tensor: "Tensor", Tensor | None: "Tensor?", int: "SymInt", float: "float", bool: "bool", str: "str",
                 list[bool]: "bool[]"}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The contract's one dtype rule: statistics, saved intermediates and parameter gradients are float64 for
    float64 inputs and float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spec_op(name: str, *records: type, returns: str) -> Callable:
    """Decorator making `fn(*records, backend)` the torch.library custom op `name`. Each record is a NamedTuple
    of arguments: an op declares its arguments once, in one (its backward in one more, for what it adds), and
    functional, every backend and every `supports` rule take that record. The schema is derived from the records'
    annotations: the dispatcher sees their fields as flat arguments, then the backend's name. The op keeps
    `.body` (flat arguments, for `run`), `.unflatten(flat) -> (*records, backend)` (for its autograd context) and
    `.fake`, a decorator registering `fake(*records)` as its fake kernel."""
    fields = []
    for record in records:
        hints = typing.get_type_hints(record)
        fields += [f"{_SCHEMA_TYPES[hints[f]]} {f}" for f in record._fields]
    schema = f"({', '.join(fields)}, str backend) -> {returns}"
    bounds = [0]
    for record in records:
        bounds.append(bounds[-1] + len(record._fields))

    def unflatten(flat):
        return (*(r._make(flat[a:b]) for r, a, b in zip(records, bounds, bounds[1:])), flat[-1])

    def wrap(fn):
        def body(*flat):
            return fn(*unflatten(flat))
        op = torch.library.custom_op(name, body, mutates_args=(), schema=schema)

        def fake(fake_fn):
            op.register_fake(lambda *flat: fake_fn(*unflatten(flat)[:-1]))
            return fake_fn
        op.body, op.unflatten, op.fake = body, unflatten, fake
        return op
    return wrap


def save_args(ctx, a: tuple, *tensors: Tensor) -> None:
    """Save `tensors` and the tensor fields of the argument record `a` for the backward (its other fields are kept
    as they are); `saved_args` gives them back."""
    is_tensor = [isinstance(x, Tensor) for x in a]
    ctx.save_for_backward(*tensors, *(x for x, t in zip(a, is_tensor) if t))
    # The record itself is kept without its tensors: tensors held on ctx outside save_for_backward escape its
    # in-place modification checks and can keep a graph alive.
    ctx.saved_record = a._make(None if t else x for x, t in zip(a, is_tensor))
    ctx.saved_is_tensor, ctx.saved_count = is_tensor, len(tensors)


def saved_args(ctx) -> tuple[tuple[Tensor, ...], tuple]:
    """(the tensors given to save_args, the argument record with its saved tensor fields)."""
    saved = ctx.saved_tensors
    fields = iter(saved[ctx.saved_count:])
    a = ctx.saved_record
    return saved[:ctx.saved_count], a._make(next(fields) if t else x for x, t in zip(a, ctx.saved_is_tensor))


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records a graph through any of `tensors` (None entries allowed): a backward may run."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(op, *args):
    """op(*args) through the dispatcher, or op's body itself where the dispatcher would add nothing: an eager call
    (not traced or compiled) on plain tensors (no fake, meta or subclass tensors), without autocast, that records
    no gradient. The dispatcher's own cost per call is larger than a small layer's kernel: a short sentence
    through a 384-wide encoder spends more there than in fastenc's kernels."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(args[0].device.type):
        return op(*args)
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta or (grad and a.requires_grad)):
            return op(*args)
    return op.body(*args)


def autograd_gradients(outputs, grads_out, inputs, wanted, create_graph=True) -> list[Tensor | None]:
    """What the ops' higher derivatives are built from: the gradients of `outputs` (recomputed by the op's
    reference, plain torch ops, under autograd) for `grads_out`, with respect to the `inputs` flagged in `wanted`;
    None for the others and for those no used output reaches. With create_graph (a backward under
    create_graph=True: gradient penalties, Hessian-vector products) the gradients can be differentiated again."""
    used = [(out, grad) for out, grad in zip(outputs, grads_out) if grad is not None and out.requires_grad]
    chosen = [t for t, want in zip(inputs, wanted) if want]
    grads = iter(torch.autograd.grad([o for o, _ in used], chosen, [g for _, g in used], create_graph=create_graph,
                                     allow_unused=True) if used else [None] * len(chosen))
    return [next(grads) if want else None for want in wanted[:len(inputs)]]
