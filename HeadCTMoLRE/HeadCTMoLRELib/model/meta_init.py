"""Build a model without initialising weights that a file will overwrite, and load the file into it.

A ViT-B built the ordinary way draws 86 M random numbers (about 80% of its load time on a CPU) that the
bundle's weights then replace, and `load_state_dict` copies every tensor once more (a transient second copy
of the model). Instead:

    with parameters_on_meta():          # parameters live on torch's "meta" device: shapes only, no memory
        model = build(...)              # initialisers run on meta tensors: free
    assign_state_dict(model, state)     # the loaded tensors become the parameters (no copy)

Buffers (RoPE frequencies, position ids, a given MoLRE W0) are created on the CPU as usual: they are
computed, not loaded, and some are never saved (non-persistent). After loading, no tensor may be left on
the meta device: `assign_state_dict` raises naming the parameters the file did not provide.

The patch of ``nn.Module.register_parameter`` is process-wide while the block runs; a lock keeps two
threads from building at the same time with it.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

_LOCK = threading.RLock()


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside the block is moved to the meta device (type and requires_grad kept)."""
    with _LOCK:
        original = nn.Module.register_parameter

        def register_on_meta(module, name, param):
            original(module, name, param)
            if param is not None and param.device.type != "meta":
                kwargs = dict(module._parameters[name].__dict__)
                kwargs["requires_grad"] = param.requires_grad
                module._parameters[name] = type(param)(param.to("meta"), **kwargs)

        nn.Module.register_parameter = register_on_meta
        try:
            yield
        finally:
            nn.Module.register_parameter = original


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors the model's parameters and persistent buffers (``load_state_dict(assign=True)``:
    no copy; each tensor is cast to the dtype the model declares). Names and shapes must already be checked
    (classifier.load_full_state_dict). Raises ValueError when a tensor of the model is still on the meta
    device afterwards (a weight the file lacks), naming it."""
    expected = model.state_dict(keep_vars=True)
    fitted = {}
    for name, tensor in state.items():
        target = expected.get(name)
        if target is not None and tensor.dtype != target.dtype and tensor.is_floating_point():
            tensor = tensor.to(target.dtype)
        fitted[name] = tensor
    model.load_state_dict(fitted, strict=False, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
        raise ValueError(f"the weights file lacks {shown}; they would have no values")
