"""The segmented causal short convolution token by token: the specification.

Per segment of a packed stream and per channel, with a window of the last `W-1` inputs
(`initial_state [N, D, W-1]`, oldest first, or zeros):

    if reset[t]: window <- 0
    y_t = act(sum_i weight[:, i] * [window, x_t][i])      (weight[:, W-1] multiplies x_t)
    window <- [window, x_t][1:]

A token never sees inputs of another segment, nor inputs from before a reset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_short_conv(x, weight, *, cu_seqlens=None, reset=None, initial_state=None, output_final_state=False,
                     activation="silu"):
    B, T, D = x.shape
    W = weight.shape[-1]
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    y = torch.zeros_like(x)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        window = x.new_zeros(D, W - 1) if initial_state is None else initial_state[n].to(x.dtype)
        for t in range(start, end):
            if reset is not None and bool(reset[b, t]):
                window = torch.zeros_like(window)
            full = torch.cat([window, x[b, t][:, None]], dim=1)
            out = (full * weight).sum(-1)
            y[b, t] = F.silu(out) if activation == "silu" else out
            window = full[:, 1:]
        finals.append(window)
    return y, (torch.stack(finals) if output_final_state else None)
