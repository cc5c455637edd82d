"""Run with torchrun (2 ranks, gloo): expert parallelism (ep=2) gives the logits and gradients of
the same model run without it on the union of the two ranks' batches. Prints one line per check
and exits non-zero on a mismatch."""

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from momtitan.config import get_flavor
from momtitan.model import MoMTransformer
from momtitan.parallel.expert_parallel import apply_expert_parallel


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same weights and data everywhere
    args = get_flavor("debug").replace(num_memories=4, topk=2, num_hidden_layers=2)
    reference = MoMTransformer(args)
    reference.init_weights()
    tokens = torch.randint(0, args.vocab_size, (world * 2, 40))
    doc_starts = torch.rand(world * 2, 40) < 0.05
    labels = torch.randint(0, args.vocab_size, (world * 2, 40))
    n_tokens = labels.numel()

    ref_out = reference(tokens, doc_starts=doc_starts)
    F.cross_entropy(ref_out.logits.flatten(0, 1), labels.flatten(), reduction="sum").div(n_tokens).backward()

    model = copy.deepcopy(reference)
    model.zero_grad(set_to_none=True)
    apply_expert_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    memories = model.layers["0"].mixer.memories
    assert memories.k_proj.to_local().shape[0] == args.num_memories // world, memories.k_proj.to_local().shape
    mine = slice(rank * 2, rank * 2 + 2)
    out = model(tokens[mine], doc_starts=doc_starts[mine])
    F.cross_entropy(out.logits.flatten(0, 1), labels[mine].flatten(), reduction="sum").div(n_tokens).backward()

    failures = []
    err = rel(out.logits, ref_out.logits[mine].detach())
    print(f"rank {rank} logits rel err {err:.2e}")
    if err > 1e-5:
        failures.append("logits")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()  # memories: each rank holds its own, gradients from every rank's tokens
        else:
            grad = grad.clone()
            dist.all_reduce(grad)  # data-parallel sum (the loss is normalised by the global token count)
        err = rel(grad, p_ref.grad)
        if err > 1e-5:
            failures.append(f"{name}: {err:.2e}")
    print(f"rank {rank} gradients checked: {len(list(model.parameters()))}, mismatches: {failures or 'none'}")
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
