"""One way to turn an op into a ``torch.library.custom_op`` with a backend argument.

``define_op(name, schema, reference=..., fake=...)`` creates two custom ops in the ``mixops``
namespace,

    mixops::<name>          (<schema inputs>, str backend) -> <schema outputs>
    mixops::<name>_backward (Tensor[] grads, bool[] needs, <schema inputs>, str backend) -> Tensor[]

registers the fake (meta) kernels and the autograd formula that connects them, and registers
the ``torch`` backend: the reference forward and, for the backward, the vector-Jacobian product
of that same reference (``torch.func.vjp``). Later backends register their own forward and
backward with ``mixops.backend.register``; nothing here changes.

Both halves being custom ops is what keeps ``torch.compile`` free of graph breaks and lets
``torch.library.opcheck`` test the forward, the backward and the fake kernels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import backend as _backend

__all__ = ["autocast_args", "define_op"]


_AUTOCASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def autocast_args(policy: str, *args):
    """Cast an op's tensor arguments the way ``torch.autocast`` casts the official op.

    ``policy="lower"``: like ``F.linear``/``conv``/``matmul``, to the autocast dtype
    (fp16/bf16). ``policy="fp32"``: like torchvision's ``deform_conv2d`` autocast rule, to fp32.
    Outside autocast, and for float64 or non-tensor arguments, nothing changes. Public wrappers
    call this first, so a dtype check afterwards sees what the op will compute in.
    """
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return args
    target = torch.get_autocast_dtype(first.device.type) if policy == "lower" else torch.float32
    return tuple(
        a.to(target) if isinstance(a, torch.Tensor) and a.dtype in _AUTOCASTABLE else a for a in args
    )


def _no_autocast(inputs: Sequence[object]):
    """The backends compute in the dtype they are given: autocast already happened (above)."""
    first = next(t for t in inputs if isinstance(t, torch.Tensor))
    return torch.autocast(first.device.type, enabled=False)


def _tensor_slots(schema: torch._C.FunctionSchema) -> list[int]:
    """Positions of the Tensor and Tensor? inputs of a parsed schema."""
    slots = []
    for i, arg in enumerate(schema.arguments):
        t = arg.type
        if isinstance(t, torch._C.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch._C.TensorType):
            slots.append(i)
    return slots


def _own_contiguous(out: torch.Tensor, inputs: Sequence[object]) -> torch.Tensor:
    """Every op returns fresh, contiguous tensors, whatever the backend computed.

    Custom ops may not return views of their inputs (a reference reshape can), and compiled
    graphs check that real outputs have the strides of the fake ones, which are contiguous;
    a VJP happily returns transposed or sliced gradients.
    """
    out = out.contiguous()
    for t in inputs:
        if isinstance(t, torch.Tensor) and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return out.clone()
    return out


def _reference_backward(reference: Callable, slots: list[int]) -> Callable:
    """The torch backend's backward: the VJP of the reference at the saved inputs, taken only
    with respect to the inputs that need a gradient (the others enter as constants)."""

    def backward(grads: list[torch.Tensor], needs: list[bool], *inputs):
        present = [i for i, need in zip(slots, needs) if need]

        def f(*tensors):
            args = list(inputs)
            for i, t in zip(present, tensors):
                args[i] = t
            return reference(*args)

        _, vjp = torch.func.vjp(f, *(inputs[i] for i in present))
        cotangent = grads[0] if len(grads) == 1 else tuple(grads)
        return list(vjp(cotangent))

    return backward


def define_op(name: str, schema: str, *, reference: Callable, fake: Callable) -> Callable:
    """Define ``mixops::<name>`` and return a caller ``op(*inputs, backend=None)``.

    ``schema`` is the argument list and return type without the op name, e.g.
    ``"(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor"``;
    outputs are ``Tensor`` or ``(Tensor, Tensor, ...)``. ``reference`` and ``fake`` take the
    inputs positionally and return the output(s).
    """
    inputs_sig, outputs_sig = (s.strip() for s in schema.split("->"))
    full = f"{inputs_sig[:-1]}, str backend) -> {outputs_sig}"
    parsed = torch._C.parse_schema(f"mixops::{name}{full}")
    slots = _tensor_slots(parsed)
    n_inputs = len(parsed.arguments) - 1  # without backend
    multi = len(parsed.returns) > 1
    bwd_sig = "(Tensor[] grads, bool[] needs, " + full[1:].split(" -> ")[0] + " -> Tensor[]"

    def grad_outputs(needs, inputs, needed_grads) -> list[torch.Tensor]:
        """One tensor per present tensor input: its gradient when needed, else an empty
        placeholder (a list of Tensors cannot hold None)."""
        got = iter(needed_grads)
        return [
            next(got) if need else inputs[i].new_empty(0)
            for i, need in zip(slots, needs)
            if inputs[i] is not None
        ]

    _backend.register(
        name,
        "torch",
        forward=reference,
        backward=_reference_backward(reference, slots),
    )

    def forward_impl(*args):
        *inputs, backend = args
        with _no_autocast(inputs):
            out = _backend.implementation(name, backend).forward(*inputs)
        if multi:
            return tuple(_own_contiguous(o, inputs) for o in out)
        return _own_contiguous(out, inputs)

    def backward_impl(grads, needs, *args):
        *inputs, backend = args
        with _no_autocast(inputs):
            got = _backend.implementation(name, backend).backward(list(grads), list(needs), *inputs)
        return grad_outputs(needs, inputs, [_own_contiguous(g, [*grads, *inputs]) for g in got])

    fwd = torch.library.custom_op(f"mixops::{name}", forward_impl, mutates_args=(), schema=full)
    bwd = torch.library.custom_op(
        f"mixops::{name}_backward", backward_impl, mutates_args=(), schema=bwd_sig
    )
    fwd.register_fake(lambda *args: fake(*args[:-1]))
    bwd.register_fake(
        lambda grads, needs, *args: grad_outputs(
            needs, args, [args[i].new_empty(args[i].shape) for i, n in zip(slots, needs) if n]
        )
    )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in slots))
        ctx.attrs = [a for i, a in enumerate(inputs) if i not in slots]
        outs = output if multi else (output,)
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]

    def backward(ctx, *grads):
        args = [None] * (n_inputs + 1)
        for i, t in zip(slots, ctx.saved_tensors):
            args[i] = t
        attrs = iter(ctx.attrs)
        for i in range(n_inputs + 1):
            if i not in slots:
                args[i] = next(attrs)
        # an output nobody used arrives as None; the backward op takes real zeros
        grads = [
            g if g is not None else torch.zeros(s, dtype=d, device=dev)
            for g, (s, d, dev) in zip(grads, ctx.out_meta)
        ]
        needs = [args[i] is not None and ctx.needs_input_grad[i] for i in slots]
        got = iter(bwd(grads, needs, *args))
        result: list[Optional[torch.Tensor]] = [None] * (n_inputs + 1)
        for i, need in zip(slots, needs):
            if args[i] is not None:
                g = next(got)
                result[i] = g if need else None
        return tuple(result)

    fwd.register_autograd(backward, setup_context=setup_context)

    first_tensor = slots[0]

    def call(*inputs, backend: Optional[str] = None):
        chosen = _backend.resolve(name, backend, inputs[first_tensor])
        return fwd(*inputs, chosen)

    call.__name__ = name
    call.op = fwd
    call.backward_op = bwd
    return call
