"""Exponential moving average (EMA) of a model's weights, used for previews and saved as
the inference weights.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = EMA(model, decay=0.999)
    >>> ema.update(model)
    >>> ema.updates, sorted(ema.state_dict())
    (1, ['decay', 'shadow', 'updates'])
"""

from __future__ import annotations

import torch

from medidiff.errors import CheckpointError

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of parameters and buffers, with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by
    the random initialisation. The update is one fused ``_foreach_lerp_`` over all
    floating-point tensors: shadow <- shadow + (1 - decay_t) (theta - shadow)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        state = model.state_dict()
        self.shadow = {k: v.detach().clone().float() for k, v in state.items()}
        self.updates = 0
        self._float_keys = [k for k, v in state.items() if v.dtype.is_floating_point]
        self._other_keys = [k for k, v in state.items() if not v.dtype.is_floating_point]
        self._shadow_float = [self.shadow[k] for k in self._float_keys]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict(keep_vars=False)
        live = [state[k].detach().float() for k in self._float_keys]
        torch._foreach_lerp_(self._shadow_float, live, 1.0 - d)
        for k in self._other_keys:
            self.shadow[k].copy_(state[k])

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["shadow"].items():
            if k not in self.shadow or self.shadow[k].shape != v.shape:
                raise CheckpointError(f"EMA state does not match the model at key '{k}'")
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
