"""Saved-tensor memory and time of the field with normals (issue 11): explicit Jacobian vs autograd.

    OMP_NUM_THREADS=1 python benchmarks/field_memory.py            # paper field, 65,536 points, CPU

For each way of getting normals it runs forward (density, albedo, normals) + a loss on all three +
backward, and reports the bytes of tensors saved for the backward per point (distinct storages
seen by ``saved_tensors_hooks`` while the forward runs; parameters and buffers excluded, they are
not per point) and the best wall time of a few interleaved repeats. "plain" rows are the field
without normals (density and albedo only); "graph kept" is the explicit pass without the recompute
wrapper, the alternative not taken (faster, ~40x the saved memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Callable

import torch

from mvsdi.field import Field, FieldConfig


def saved_bytes(module: torch.nn.Module, run: Callable[[], object]) -> tuple[int, object]:
    """(bytes of distinct storages saved for backward while ``run`` runs, its result)."""
    fixed = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t  # kept alive, so no storage address is reused during the measurement

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(sizes.values()), result


def loss_of(outputs: tuple[torch.Tensor, ...], weights: torch.Tensor) -> torch.Tensor:
    """A loss on every output, like shading + orientation: density, albedo and normals all count."""
    density, albedo, *normals = outputs
    total = density.mean() + (albedo * weights).sum(-1).mean()
    return total + ((normals[0] * weights).sum(-1).mean() if normals else 0.0)


def step(field: Field, x: torch.Tensor, weights: torch.Tensor, forward: Callable) -> int:
    """Forward through ``forward(field, x)``, loss, backward; returns the saved bytes."""
    field.zero_grad(set_to_none=True)
    nbytes, outputs = saved_bytes(field, lambda: forward(field, x))
    loss_of(outputs, weights).backward()
    return nbytes


def graph_kept(field: Field, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    density, albedo, grad = field._explicit_gradient(x)
    return density, albedo, torch.nn.functional.normalize(-grad, dim=-1, eps=1e-12)


ROWS = (  # name, normal_type, forward
    ("plain, autograd lookup (old)", "autograd", lambda f, x: f.forward_autograd(x)),
    ("plain, custom Function (new)", "analytic", lambda f, x: f(x)),
    ("normals: autograd, double backward (old)", "autograd", lambda f, x: f.with_normals(x)),
    ("normals: explicit Jacobian (new)", "analytic", lambda f, x: f.with_normals(x)),
    # the alternative not taken: the explicit pass with its autograd graph kept (no recompute)
    ("normals: explicit Jacobian, graph kept", "analytic", lambda f, x: graph_kept(f, x)),
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=65_536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Field(FieldConfig())
    with torch.no_grad():
        base.encoding.embeddings.uniform_(-0.1, 0.1)  # structure beyond the 1e-4 init
    x = torch.rand(args.points, 3, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    fields = []
    for _, kind, _ in ROWS:
        field = Field(dataclasses.replace(base.cfg, normal_type=kind))
        field.load_state_dict(base.state_dict())
        fields.append(field)
    weights = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(1))
    per_point = [step(f, x, weights, fwd) / len(x) for f, (_, _, fwd) in zip(fields, ROWS)]  # + warm-up
    times: list[list[float]] = [[] for _ in ROWS]
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits all rows
        for i, (field, (_, _, forward)) in enumerate(zip(fields, ROWS)):
            start = time.perf_counter()
            step(field, x, weights, forward)
            times[i].append(time.perf_counter() - start)
    best = [min(t) for t in times]  # the least disturbed repeat
    print(f"FieldConfig() defaults, {args.points} points, float32, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}, best of {args.repeats}")
    print("| path | saved bytes / point | fwd+bwd s | x plain (old) |")
    print("|---|---|---|---|")
    for (name, _, _), nbytes, seconds in zip(ROWS, per_point, best):
        print(f"| {name} | {nbytes:,.0f} | {seconds:.3f} | {seconds / best[0]:.2f} |")


if __name__ == "__main__":
    main()
