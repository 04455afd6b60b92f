"""Several processes (GPUs) through Hugging Face accelerate's launcher:
`accelerate launch --multi_gpu --num_processes N -m gpo_fast.cli train ...` (or torchrun, which it wraps).

How the run equals the one-process run with the same global batch (docs/sd35.md, "Several GPUs"):
- every rank draws the same global random numbers (prompts, starting noise, noise levels, noise) from
  the same seeded generator and keeps its slice: whole groups per rank, P / world groups each;
- a rank's loss is the mean over its non-degenerate groups; it is scaled by n_rank / n_global before
  backward and the gradients are summed across ranks, which gives the gradient of the mean over all
  non-degenerate groups (the one-process loss);
- clipping and the optimizer step then see identical gradients on every rank, so the weights stay
  identical without broadcasting them.
Every evaluation is shared out: each rank samples and scores its contiguous share of the fixed seeds (`part`),
and the per-sample results are gathered in rank order (`gather_objects`), so every rank gets what one process
would measure (to the float rounding of other batch sizes); the kept images, for pictures, go to rank 0 alone
(`gather_to_main`). Rank 0 alone logs and writes the run folder, and keeps the best weights, which it sends to the
others (`broadcast_from_main`) for the final evaluation.
"""

from __future__ import annotations

import torch



TIMEOUT_ENV = "GPO_FAST_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120


def timeout():
    """How long a process waits in a collective for the others: GPO_FAST_DIST_TIMEOUT_MIN minutes, 120 by default.
    NCCL's own default is 10 minutes. The evaluations are shared out, but rank 0 alone writes checkpoints, the
    adapter and the pictures while the others wait, and a slow disk or a slow rank should not end a run."""
    import datetime
    import os

    from gpo_fast.errors import InputError

    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise InputError(f"{TIMEOUT_ENV}={text!r} is not a positive number of minutes; unset it (120) or give one")
    return datetime.timedelta(minutes=minutes)


class Dist:
    """The process group as the loop needs it; with one process every call is a no-op."""

    def __init__(self):
        self.world = 1
        self.rank = 0
        self.local_rank = 0
        self._state = None
        self.comm_device = torch.device("cpu")  # where collectives run: NCCL only moves CUDA tensors

    @classmethod
    def from_env(cls) -> "Dist":
        """Join the process group that `accelerate launch --multi_gpu` (or torchrun, which it wraps) set
        up through RANK / WORLD_SIZE / LOCAL_RANK: NCCL between GPUs, gloo between CPU processes."""
        import os

        import torch.distributed as dist

        d = cls()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            d.world, d.rank = world, int(os.environ["RANK"])
            d.local_rank = int(os.environ.get("LOCAL_RANK", d.rank))
            if not dist.is_initialized():
                gpu = torch.cuda.is_available() and torch.cuda.device_count() > d.local_rank
                if gpu:
                    torch.cuda.set_device(d.local_rank)
                dist.init_process_group(backend="nccl" if gpu else "gloo", timeout=timeout())
            if dist.get_backend() == "nccl":
                d.comm_device = torch.device("cuda", torch.cuda.current_device())
        return d

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: cuda:local_rank when the run asks for CUDA."""
        if self.world > 1 and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items, for any n: rank r of w takes [r n // w, (r + 1) n // w), so the
        shares differ by one at most and, in rank order, are the n items in order."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable object (tensors on the CPU), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)  # NCCL: through the current device, set to this rank's by from_env
        return out

    def gather_to_main(self, obj) -> list | None:
        """Every rank's picklable object (tensors on the CPU), in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)  # NCCL: through the current device, as gather_objects
        return out

    def broadcast_from_main(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place (one broadcast per tensor: once per run)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            x = t.detach()
            if x.device == self.comm_device and x.is_contiguous():
                dist.broadcast(x, src=0)  # in place
                continue
            x = x.to(self.comm_device).contiguous()
            dist.broadcast(x, src=0)
            with torch.no_grad():
                t.copy_(x)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.detach().to(self.comm_device, copy=True)
        dist.all_reduce(x)
        return x.to(t.device)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (equal-sized) tensor, concatenated in rank order, on every rank."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def sum_grads(self, params: list[torch.nn.Parameter], bucket_elements: int = 1 << 24) -> None:
        """Sum the gradients across ranks (a rank without a gradient contributes zeros): one all-reduce per
        bucket of up to `bucket_elements` gradient entries of one dtype and device (64 MB of float32), not one per
        tensor. A LoRA's few hundred tensors go in one call; a full fine-tune's in buckets, so the flat copy
        stays small."""
        if self.world == 1:
            return
        import torch.distributed as dist

        groups: dict = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            bucket, size = [], 0
            for g in [*grads, None]:  # None: flush the last bucket
                if g is not None and (not bucket or size + g.numel() <= bucket_elements):
                    bucket.append(g)
                    size += g.numel()
                    continue
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = ([g], g.numel()) if g is not None else ([], 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
