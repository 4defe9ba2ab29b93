"""The engine: batched prefill of prompts of different lengths, batched decode over the paged cache, sampling,
stopping; on CUDA the decode step is replayed from CUDA graphs captured per batch-size bucket.

A captured step reads static input buffers (token ids, positions, cache slots, block table, cache lengths) sized to
its bucket; a smaller batch fills the rest with padding entries (slot -1: nothing written; block 0, length 1: a
finite read of the reserved zero block) and ignores their logits.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from .cache import PagedCache
from .model import Batch, Model
from .sampler import Sampler, SamplingParams

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclasses.dataclass
class Output:
    tokens: list[list[int]]  # generated tokens per prompt (a stop token included)
    logits: list[torch.Tensor] | None  # per prompt [generated, vocab] fp32 on CPU, when asked for
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


class Engine:
    def __init__(self, model: Model, *, num_blocks: int, block_size: int = 64, max_model_len: int = 4096,
                 max_batch: int = 256, max_prefill_tokens: int = 16384, cuda_graph: bool | None = None,
                 kv_dtype=None):
        self.model, self.device = model, model.w.embed.device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_prefill_tokens, self.max_batch = max_prefill_tokens, max_batch
        self.cache = PagedCache(model.cfg.num_hidden_layers, num_blocks, block_size, dtype=kv_dtype or model.dtype,
                                device=self.device)
        if max_model_len > model.cos_sin.shape[0]:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's RoPE table ({model.cos_sin.shape[0]} "
                             "positions): build the Model with a larger max_position")
        self.table_width = PagedCache.blocks_for(max_model_len, block_size)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        ep = model.ep
        if ep is not None and max_batch > ep.max_decode_tokens:
            raise ValueError(f"max_batch={max_batch} exceeds the expert-parallel decode buffers "
                             f"(max_decode_tokens={ep.max_decode_tokens})")

    # ---- one forward each ----------------------------------------------------------------------------------
    def _tensor(self, data, dtype=torch.int64):
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write the prompts into the cache; logits [B, vocab] of each prompt's last token."""
        ids, pos, slots, cu = [], [], [0], [0]
        for sid, prompt in zip(seq_ids, prompts):
            self.cache.reserve(sid, len(prompt))
            ids += prompt
            pos += range(len(prompt))
            slots += self.cache.slots(sid, 0, len(prompt))
            cu.append(cu[-1] + len(prompt))
        cu_t = self._tensor(cu, torch.int32)
        batch = Batch(self._tensor(pos), self._tensor(slots[1:]), cu_seqlens=cu_t,
                      max_seqlen=max(map(len, prompts)), logit_rows=cu_t[1:].long() - 1)
        return self.model.forward(self._tensor(ids), batch, self.cache)

    def decode(self, seq_ids: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per sequence at ``positions`` -> logits [B, vocab]."""
        for sid, p in zip(seq_ids, positions):
            self.cache.reserve(sid, p + 1)
        slots = [self.cache.slots(sid, p, p + 1)[0] for sid, p in zip(seq_ids, positions)]
        table = self.cache.block_table(seq_ids, self.table_width, self.device)
        lens = [p + 1 for p in positions]
        if not self.cuda_graph:
            batch = Batch(self._tensor(positions), self._tensor(slots), block_table=table,
                          cache_seqlens=self._tensor(lens, torch.int32))
            return self.model.forward(self._tensor(tokens), batch, self.cache)
        n = len(seq_ids)
        bucket = next((b for b in BUCKETS if b >= n), None)
        if bucket is None or bucket > self.max_batch:
            bucket = max(n, self.max_batch)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
            if self.graphs[bucket] is None:
                self.cuda_graph = False
                return self.decode(seq_ids, tokens, positions)
        graph, static, logits = self.graphs[bucket]
        pad = bucket - n
        static["ids"].copy_(self._tensor(tokens + [0] * pad), non_blocking=True)
        static["pos"].copy_(self._tensor(positions + [0] * pad), non_blocking=True)
        static["slots"].copy_(self._tensor(slots + [-1] * pad), non_blocking=True)
        static["lens"].copy_(self._tensor(lens + [1] * pad, torch.int32), non_blocking=True)
        static["table"].zero_()[:n].copy_(table)
        graph.replay()
        return logits[:n]

    def _capture(self, bucket: int):
        static = {"ids": torch.zeros(bucket, dtype=torch.int64, device=self.device),
                  "pos": torch.zeros(bucket, dtype=torch.int64, device=self.device),
                  "slots": torch.full((bucket,), -1, dtype=torch.int64, device=self.device),
                  "lens": torch.ones(bucket, dtype=torch.int32, device=self.device),
                  "table": torch.zeros(bucket, self.table_width, dtype=torch.int32, device=self.device)}
        batch = Batch(static["pos"], static["slots"], block_table=static["table"], cache_seqlens=static["lens"])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (lazy inits, autotuning) outside the capture
            self.model.forward(static["ids"], batch, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.model.forward(static["ids"], batch, self.cache)
        except RuntimeError as e:  # an op synced the host (e.g. a reference with data-dependent shapes)
            warnings.warn(f"decode step could not be captured as a CUDA graph, running it eagerly: {e}")
            torch.cuda.synchronize()
            return None
        self.pool = graph.pool()
        return graph, static, logits

    def _capture_all(self):
        """Expert parallelism: capture every bucket now, in the same order on every rank, because a capture's warm-up
        forward exchanges tokens with the other ranks (lazy captures would come at different times per rank). A
        failed capture leaves that rank eager, which runs the same collectives as a replay."""
        buckets = sorted({b for b in BUCKETS if b <= self.max_batch} | {self.max_batch})
        for b in buckets:
            if b not in self.graphs:
                self.graphs[b] = self._capture(b)
        if any(g is None for g in self.graphs.values()):
            self.cuda_graph = False

    def _agree(self, n: int) -> int:
        """How many forwards of a phase every rank runs: ``n``, or under expert parallelism the most any rank needs
        (each MoE layer exchanges tokens with every rank, so forwards run in lockstep)."""
        return n if self.model.ep is None else self.model.ep.agree(n)

    # ---- the generation loop -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None, *,
                 stop_ids=(), return_logits=False) -> Output:
        sampler = Sampler(sampling or SamplingParams(), self.device)
        for i, p in enumerate(prompts):
            if not p or max_new_tokens < 1 or len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + {max_new_tokens} new tokens must be in "
                                 f"[1, max_model_len={self.max_model_len}], each at least 1")
        stop, n = set(stop_ids), len(prompts)
        out = Output([[] for _ in range(n)], [[] for _ in range(n)] if return_logits else None)
        seq_ids = list(range(n))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        try:
            # Prefill in groups of whole prompts of at most max_prefill_tokens tokens (one forward per group).
            t0, groups, size = time.perf_counter(), [[]], 0
            for i in seq_ids:
                if groups[-1] and size + len(prompts[i]) > self.max_prefill_tokens:
                    groups.append([])
                    size = 0
                groups[-1].append(i)
                size += len(prompts[i])
            groups = [g for g in groups if g]
            forwards = self._agree(len(groups))  # agreed before any forward: they exchange tokens between ranks
            for g in groups:
                self._emit(out, g, self.prefill(g, [prompts[j] for j in g]), sampler, return_logits)
            for _ in range(forwards - len(groups)):
                self.model.idle(decode=False)
            sync()
            out.prefill_s = time.perf_counter() - t0

            if self.model.ep is not None and self.cuda_graph:
                self._capture_all()
            t0 = time.perf_counter()
            live = [i for i in seq_ids if not self._done(out.tokens[i], max_new_tokens, stop)]
            while True:
                chunks = [live[s: s + self.max_batch] for s in range(0, len(live), self.max_batch)]
                steps = self._agree(len(chunks))
                if not steps:
                    break
                for chunk in chunks:
                    logits = self.decode(chunk, [out.tokens[i][-1] for i in chunk],
                                         [len(prompts[i]) + len(out.tokens[i]) - 1 for i in chunk])
                    self._emit(out, chunk, logits, sampler, return_logits)
                for _ in range(steps - len(chunks)):
                    self.model.idle(decode=True)
                out.decode_steps += bool(chunks)
                for i in live:
                    if self._done(out.tokens[i], max_new_tokens, stop):
                        self.cache.release(i)
                live = [i for i in live if not self._done(out.tokens[i], max_new_tokens, stop)]
            sync()
            out.decode_s = time.perf_counter() - t0
        finally:
            for i in seq_ids:
                self.cache.release(i)
        if return_logits:
            out.logits = [torch.stack(rows) for rows in out.logits]
        return out

    @staticmethod
    def _done(tokens, max_new_tokens, stop) -> bool:
        return len(tokens) >= max_new_tokens or (bool(tokens) and tokens[-1] in stop)

    @staticmethod
    def _emit(out: Output, seqs, logits, sampler, return_logits):
        for i, tok in zip(seqs, sampler(logits).tolist()):
            out.tokens[i].append(tok)
        if return_logits:
            for i, row in zip(seqs, logits.cpu()):
                out.logits[i].append(row)
