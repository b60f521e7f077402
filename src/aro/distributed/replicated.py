"""ARO on replicated parameters (DDP): split the rotation work, all-gather the results.

Every rank holds every parameter and, after DDP's all-reduce, the same gradient. The cheap
elementwise work (momentum) runs everywhere; the expensive per-unit work (cross-Gram, QR, f,
rotated update) is assigned to one rank per unit, balanced by cost (:mod:`.planning`). Each
bucket's results (the :func:`aro.state_schema.step_outputs` fields) are all-gathered
asynchronously while the next bucket is computed, and every rank then writes all of them: the
parameters, and the optimizer state of *every* matrix, stay identical on all ranks, so a
``state_dict()`` from any rank holds the true rotations and resumes on any world size.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from .. import state_schema as S
from ..engine import (BucketResult, Count, Sources, Unit, apply_bucket, assemble_updates, bucketize, compute_bucket,
                      count_rotations, output_shapes)
from ..spec import GroupSpec
from .executor import Report, SingleProcess
from .planning import plan_work
from .transport import all_gather_rows, pack_rows, unpack_rows

__all__ = ["Replicated"]


class Replicated(SingleProcess):
    """Units split across the ranks of ``process_group``; every rank applies every result."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    def run(self, spec: GroupSpec, units: list[Unit], src: Sources, count: Count) -> Report:
        world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        buckets = bucketize(spec, units, src)
        rank_of, loads = plan_work([[u] for b in buckets for u in b], world)
        pending, offset, rotations, sent = [], 0, 0, 0
        for bucket in buckets:
            ranks = rank_of[offset : offset + len(bucket)]
            offset += len(bucket)
            shapes = output_shapes(spec, bucket[0])
            mine = [u for u, r in zip(bucket, ranks) if r == rank]
            M = src.tensors[(S.MOMENTUM, id(bucket[0].members[0].param))]
            rows = M.new_zeros(0, sum(torch.Size(s).numel() for s in shapes))
            if mine:
                result = compute_bucket(spec, mine, src)
                rotations += count_rotations(spec, mine, result, src, count)
                rows = pack_rows(result.values)
                sent += rows.numel() * rows.element_size() * (world - 1)  # delivered to every other rank
            work, recv = all_gather_rows(rows, max(ranks.count(r) for r in range(world)), self.process_group)
            pending.append((bucket, ranks, shapes, work, recv))  # the gather overlaps the next bucket
        pieces: dict[int, list] = defaultdict(list)
        for bucket, ranks, shapes, work, recv in pending:
            work.wait()
            seen = [0] * world
            rows_in_order = []
            for r in ranks:
                rows_in_order.append(recv[r][seen[r]])
                seen[r] += 1
            values = unpack_rows(torch.stack(rows_in_order), shapes)
            apply_bucket(spec, bucket, BucketResult(values, torch.zeros(()), torch.zeros(())), src, pieces)
        return Report(assemble_updates(units, pieces), rotations, loads, sent)
