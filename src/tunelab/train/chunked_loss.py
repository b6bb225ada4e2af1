"""Token cross-entropy through the output layer a chunk of tokens at a time, so the `tokens x vocabulary` logits
and their gradient never exist whole.

The model's own loss keeps the full fp32 logits, their log-softmax and, in backward, their gradient: for the
embedded model (vocabulary 49,152) a batch of 8 x 256 tokens holds 403 MB in each. Here each chunk's gradient
with respect to the hidden states (and the output weight, when it trains) is computed in the forward pass, right
after its logits, and the logits are dropped: backward is one multiplication by the incoming scalar, nothing is
recomputed. This is Liger Kernel's "fused linear cross-entropy" in plain PyTorch (Liger needs Triton, not on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.render import IGNORE

# The logits of one chunk, in bytes (fp32): 341 tokens for a 49k vocabulary. Measured on 2,048 tokens of the
# embedded model's output layer (forward + backward, 2 cores): the full logits' loss 1.96 s and 1,180 MiB above the
# baseline; chunks of 256 MiB 1.77 s, 560 MiB; 128 MiB 1.85 s, 440 MiB; 64 MiB 1.94 s, 245 MiB; 16 MiB 2.22 s.
CHUNK_BYTES = 2**26


def output_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The causal LM's output layer, if the chunked loss can use it: a plain Linear whose weight is whole here.

    None for models without one (classification heads), for an output layer a method wraps (LoRA on lm_head) and
    under ZeRO-3, where the weight is a shard outside the module's own forward."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or hasattr(head.weight, "ds_id"):
        return None
    return head


def chunked_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, num_items: float
) -> torch.Tensor:
    """sum(cross-entropy of `head(hidden)` against `targets`, IGNORE skipped) / num_items, as the model's own loss
    with `num_items_in_batch`. hidden: (n, d); targets: (n,)."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    loss: torch.Tensor = _ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, num_items, need_grad)
    return loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        num_items: float,
        need_grad: bool,
    ) -> torch.Tensor:
        grads = _Grads(hidden, weight, bias, need_grad)
        weight = grads.weight_matrix
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        for start in range(0, hidden.shape[0], rows):
            chunk, wanted = hidden[start : start + rows], targets[start : start + rows]
            valid = wanted != IGNORE
            if not bool(valid.any()):
                continue  # no loss and no gradient from this chunk: skip its matmul
            logits = F.linear(chunk, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = wanted.clamp(min=0)
            total += ((lse - logits.gather(1, picked[:, None]).squeeze(1)) * valid).sum()
            if need_grad:
                # d(loss)/d(logits) = softmax - one_hot(target), for counted tokens, over the step's item count.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(picked), device=probs.device), picked] -= 1
                probs.mul_((valid.float() / num_items)[:, None])
                grads.add(start, chunk, probs)
        ctx.grads = grads.result()
        return total / num_items

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias = ctx.grads
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (hidden, weight, bias)]
        return (*scaled, None, None, None)


def _autocast_once(weight: torch.Tensor) -> torch.Tensor:
    """The output weight in autocast's dtype, cast once for all chunks: autocast would cast it again for every
    chunk (49k x 576 values on the embedded model), as it keeps no cast of a frozen weight."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


class _Grads:
    """The gradients the forward pass accumulates chunk by chunk, for the inputs that need them."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, need: bool):
        self.weight_dtype = weight.dtype
        self.weight_matrix = _autocast_once(weight)
        self.hidden = torch.zeros_like(hidden) if need and hidden.requires_grad else None
        self.weight = torch.zeros_like(weight, dtype=torch.float32) if need and weight.requires_grad else None
        self.bias = (
            torch.zeros_like(bias, dtype=torch.float32) if need and bias is not None and bias.requires_grad else None
        )

    def add(self, start: int, chunk: torch.Tensor, grad_logits: torch.Tensor) -> None:
        g = grad_logits.to(chunk.dtype)
        if self.hidden is not None:
            # in the weight's dtype: bf16 under autocast, as the model's own output layer computes this gradient
            self.hidden[start : start + len(chunk)] = g.to(self.weight_matrix.dtype) @ self.weight_matrix
        if self.weight is not None:
            self.weight += (g.t() @ chunk).float()
        if self.bias is not None:
            self.bias += grad_logits.sum(0)

    def result(self) -> tuple[torch.Tensor | None, ...]:
        weight = None if self.weight is None else self.weight.to(self.weight_dtype)
        bias = None if self.bias is None else self.bias.to(self.weight_dtype)
        return self.hidden, weight, bias
