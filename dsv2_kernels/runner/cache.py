"""The paged latent cache: one [num_blocks, block_size, 576] tensor per layer, a block allocator, block tables.

Each cached token is one 576-wide row (RMSNorm'd c_kv | rotated k_pe), shared by all heads. A sequence owns a list of
blocks; its token at position p lives in row ``p % block_size`` of block ``blocks[p // block_size]``, i.e. at slot
``blocks[p // block_size] * block_size + p % block_size`` of the flattened cache. Block 0 is never handed out: padded
batch entries of a captured decode step point at it, so they read finite (zero) rows and write nothing.
"""

from __future__ import annotations

import torch


class OutOfBlocks(RuntimeError):
    pass


class PagedCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, *, dim: int = 576,
                 dtype=torch.bfloat16, device="cpu"):
        self.block_size, self.num_blocks = block_size, num_blocks
        fp8 = dtype == torch.float8_e4m3fn
        self.kv = [torch.zeros(num_blocks, block_size, dim, dtype=dtype, device=device) for _ in range(num_layers)]
        # An FP8 cache keeps two fp32 scales per row (c_kv, k_pe), written by compress_kv.
        self.scale = [torch.ones(num_blocks, block_size, 2, device=device) if fp8 else None for _ in range(num_layers)]
        self.free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low block ids first
        self.blocks: dict[int, list[int]] = {}

    @staticmethod
    def blocks_for(num_tokens: int, block_size: int) -> int:
        return -(-num_tokens // block_size)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make sure sequence ``seq_id`` owns enough blocks for its first ``num_tokens`` tokens."""
        blocks = self.blocks.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens, self.block_size) - len(blocks)
        if need > len(self.free):
            raise OutOfBlocks(f"paged cache full: sequence {seq_id} needs {need} more blocks, {len(self.free)} free "
                              f"of {self.num_blocks - 1} (raise --cache-blocks)")
        blocks.extend(self.free.pop() for _ in range(max(need, 0)))

    def release(self, seq_id: int) -> None:
        self.free.extend(reversed(self.blocks.pop(seq_id, [])))

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots of positions [start, end) of a sequence (its blocks must be reserved)."""
        blocks, bs = self.blocks[seq_id], self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def block_table(self, seq_ids: list[int], width: int, device) -> torch.Tensor:
        """[len(seq_ids), width] int32 block table, padded with block 0."""
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for row, sid in enumerate(seq_ids):
            blocks = self.blocks[sid]
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table.to(device)
