"""One preallocated key/value cache shared by both MoME branches.

The MoME backbone runs ONE attention over the whole interleaved sequence, so there is one cache whichever
branch produced a token's keys (LatentUM §3). Generation of a latent image forks the cache, fills the fork
through the gen branch, discards it and replays the latents through the und branch (LatentUM §4): that is
``fork()`` plus, for the replay, ``truncate()``.

Shape letters:
    L  layers (depth)          B  batch rows
    K  kv heads                S  key slots (S_max preallocated; ``length`` of them filled)
    T  tokens written by the forward in progress
    d  head dim
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class KVCache:
    """Preallocated k/v ``(L, B, K, S_max, d)`` plus a ``(B, S_max)`` key-validity mask and a ``length``.

    One forward of the backbone writes T new tokens into every layer. Its protocol is:
    ``with cache.extend(key_valid_new) as key_valid_all:`` then ``cache.append(layer, k, v)`` once per layer;
    ``length`` advances by T only when the block exits cleanly, so layer ``l`` always sees exactly the same
    keys as layer 0 and a forward that raises leaves the cache as it was.
    """

    def __init__(self, depth: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 limit: int | None = None):
        """``max_len`` slots are allocated now; a write past them doubles the allocation, up to ``limit`` tokens
        (default ``max_len``: a fixed size), so a 40k-token model limit costs memory only when used."""
        limit = max_len if limit is None else limit
        for name, val in (("depth", depth), ("batch", batch), ("kv_heads", kv_heads),
                          ("head_dim", head_dim), ("max_len", max_len), ("limit", limit)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        if limit < max_len:
            raise ValueError(f"KVCache: limit={limit} must be >= max_len={max_len}")
        self.limit = limit
        self.k = torch.zeros(depth, batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.length = 0
        self._pending = 0  # T of the forward in progress (0 outside ``extend``)

    # ----------------------------------------------------------------------------------------------- shape
    @property
    def depth(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def valid(self) -> Tensor:
        """Key validity of the committed keys, ``(B, length)`` (a view)."""
        return self.key_valid[:, : self.length]

    # ------------------------------------------------------------------------------------------- writing
    @contextmanager
    def extend(self, key_valid: Tensor) -> Iterator[Tensor]:
        """Open a write of T new tokens; yields the ``(B, length + T)`` key-validity mask for this forward."""
        if self._pending:
            raise RuntimeError("KVCache.extend: a forward is already writing into this cache")
        if key_valid.dtype != torch.bool or key_valid.ndim != 2 or key_valid.shape[0] != self.batch:
            raise ValueError(f"KVCache.extend: key_valid must be bool (B={self.batch}, T), "
                             f"got {key_valid.dtype} {tuple(key_valid.shape)}")
        T = key_valid.shape[1]
        if self.length + T > self.limit:
            raise ValueError(f"KVCache.extend: {T} new tokens do not fit: length={self.length}, "
                             f"limit={self.limit}; allocate a larger cache")
        if self.length + T > self.max_len:
            self._grow(min(self.limit, max(2 * self.max_len, self.length + T)))
        end = self.length + T
        self.key_valid[:, self.length : end] = key_valid
        self._pending = T
        try:
            yield self.key_valid[:, :end]
        except BaseException:
            self.key_valid[:, self.length : end] = False
            raise
        else:
            self.length = end
        finally:
            self._pending = 0

    def write(self, k: Tensor, v: Tensor) -> None:
        """Write the new ``(L, B, K, T, d)`` keys/values of every layer at once (a forward that computed all layers
        before writing, e.g. the static decode step)."""
        if not self._pending:
            raise RuntimeError("KVCache.write must be called inside `with cache.extend(...)`")
        expected = (self.depth, self.batch, self.k.shape[2], self._pending, self.k.shape[4])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KVCache.write: k and v must have shape (L, B, K, T, d)={expected}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        self.k[:, :, :, self.length : self.length + self._pending] = k.detach()
        self.v[:, :, :, self.length : self.length + self._pending] = v.detach()

    def _grow(self, size: int) -> None:
        """Reallocate to ``size`` slots, keeping every slot's contents (the new ones empty and invalid)."""
        pad = size - self.max_len
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:3], pad, self.k.shape[4])], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:3], pad, self.v.shape[4])], dim=3)
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_zeros(self.batch, pad)], dim=1)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new ``(B, K, T, d)`` keys/values; return all ``(B, K, length+T, d)`` so far."""
        if not self._pending:
            raise RuntimeError("KVCache.append must be called inside `with cache.extend(...)`")
        expected = (self.batch, self.k.shape[2], self._pending, self.k.shape[4])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KVCache.append: k and v must have shape (B, K, T, d)={expected}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        start, end = self.length, self.length + self._pending
        # The cache stores values, never graph: past keys are constants to later forwards.
        self.k[layer, :, :, start:end] = k.detach()
        self.v[layer, :, :, start:end] = v.detach()
        if k.requires_grad or v.requires_grad:
            # Training through a cache: keep the graph of this forward's keys (costs one concat).
            past_k, past_v = self.k[layer, :, :, :start], self.v[layer, :, :, :start]
            return torch.cat([past_k, k.to(past_k.dtype)], 2), torch.cat([past_v, v.to(past_v.dtype)], 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # ------------------------------------------------------------------------------------------- editing
    def fork(self) -> KVCache:
        """An independent copy (same capacity) holding the first ``length`` keys; writes do not leak back."""
        if self._pending:
            raise RuntimeError("KVCache.fork: cannot fork while a forward is writing")
        new = KVCache.__new__(KVCache)
        new.k = torch.zeros_like(self.k)
        new.v = torch.zeros_like(self.v)
        new.key_valid = torch.zeros_like(self.key_valid)
        new.k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        new.v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        new.key_valid[:, : self.length] = self.key_valid[:, : self.length]
        new.length = self.length
        new.limit = self.limit
        new._pending = 0
        return new

    def truncate(self, length: int) -> None:
        """Forget every key at or after ``length`` (O(1): later writes overwrite the stale slots)."""
        if self._pending:
            raise RuntimeError("KVCache.truncate: cannot truncate while a forward is writing")
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length must be in [0, {self.length}], got {length}")
        self.length = length

    def truncate_rows(self, start: int, keep: Tensor) -> None:
        """Keep ``keep[b]`` (B,) of row b's slots from ``start`` on and forget the rest: slots past a row's own
        count become invalid (a gap that later queries never see), then the cache ends after the longest kept
        run. Rows that decide different numbers of tokens in one forward (per-row draft checking) use it."""
        if self._pending:
            raise RuntimeError("KVCache.truncate_rows: cannot truncate while a forward is writing")
        if not 0 <= start <= self.length:
            raise ValueError(f"KVCache.truncate_rows: start must be in [0, {self.length}], got {start}")
        keep = keep.to(self.device)
        if keep.shape != (self.batch,) or bool((keep < 0).any()) or bool((keep > self.length - start).any()):
            raise ValueError(f"KVCache.truncate_rows: keep must be (B={self.batch},) counts in "
                             f"[0, {self.length - start}], got {keep.tolist()}")
        slots = torch.arange(start, self.length, device=self.device)
        self.key_valid[:, start:self.length] &= (slots - start)[None] < keep[:, None]
        self.length = start + int(keep.max()) if keep.numel() else start

    def put_rows(self, index: Tensor, other: KVCache, rows: Tensor | None = None) -> None:
        """Replace rows ``index`` (R,) by ``other``'s rows ``rows`` (R,) (default all), right-aligned: their last key
        lands in this cache's last slot, and every earlier slot of those rows becomes invalid (continuous batching:
        a finished row takes the next waiting prompt). If ``other`` is longer, every row is first shifted right by the
        difference (invalid slots in front): positions live in the keys, not in the slots."""
        if self._pending or other._pending:
            raise RuntimeError("KVCache.put_rows: cannot replace rows while a forward is writing")
        if (other.depth, other.k.shape[2], other.k.shape[4]) != (self.depth, self.k.shape[2], self.k.shape[4]):
            raise ValueError(f"KVCache.put_rows: other must have the same depth, kv heads and head dim, got "
                             f"{tuple(other.k.shape)} against {tuple(self.k.shape)}")
        index = index.to(self.device)
        rows = torch.arange(other.batch) if rows is None else rows
        if index.ndim != 1 or index.shape != rows.shape:
            raise ValueError(f"KVCache.put_rows: index must be ({len(rows)},) rows, got {tuple(index.shape)}")
        if other.length > self.length:
            self._shift(other.length - self.length)
        L, P = self.length, other.length
        src = rows.to(other.device)
        self.key_valid[index] = False
        self.key_valid[index, L - P:L] = other.key_valid[src, :P].to(self.device)
        self.k[:, index, :, L - P:L] = other.k[:, src, :, :P].to(self.k)
        self.v[:, index, :, L - P:L] = other.v[:, src, :, :P].to(self.v)

    def _shift(self, n: int) -> None:
        """Move every slot ``n`` to the right (``n`` invalid slots in front), growing if needed."""
        if self.length + n > self.limit:
            raise ValueError(f"KVCache: {n} more slots do not fit: length={self.length}, limit={self.limit}")
        if self.length + n > self.max_len:
            self._grow(min(self.limit, max(2 * self.max_len, self.length + n)))
        L = self.length
        self.k[:, :, :, n:L + n] = self.k[:, :, :, :L].clone()
        self.v[:, :, :, n:L + n] = self.v[:, :, :, :L].clone()
        self.key_valid[:, n:L + n] = self.key_valid[:, :L].clone()
        self.key_valid[:, :n] = False
        self.length = L + n

    def slack(self) -> float:
        """The share of committed slots that ``compact`` would free: slots before the longest row's keys begin
        (rows attend only their own keys, so a batch of ragged rows needs as many slots as its longest row)."""
        if not self.length or not self.batch:
            return 0.0
        return 1.0 - int(self.valid().sum(1).max()) / self.length

    def compact(self) -> None:
        """Drop the gaps: each row's valid keys move right, in order, so that the cache ends after the longest
        row's keys. Attention over a row is unchanged (its keys, their order, their positions)."""
        if self._pending:
            raise RuntimeError("KVCache.compact: cannot compact while a forward is writing")
        valid = self.valid()
        counts = valid.sum(1).tolist()
        n = max(counts, default=0)
        kept = torch.zeros_like(self.key_valid)
        for b, c in enumerate(counts):  # row b's c valid keys, in order, into slots [n - c, n)
            slots = torch.nonzero(valid[b]).flatten()  # indexing copies them before they are written over
            self.k[:, b, :, n - c:n] = self.k[:, b, :, slots]
            self.v[:, b, :, n - c:n] = self.v[:, b, :, slots]
            kept[b, n - c:n] = True
        self.key_valid = kept
        self.length = n

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in that order; repeats allowed (e.g. doubling a batch for CFG)."""
        if self._pending:
            raise RuntimeError("KVCache.reorder: cannot reorder while a forward is writing")
        if index.ndim != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"KVCache.reorder: index must be a 1-D integer tensor, got "
                             f"{index.dtype} {tuple(index.shape)}")
        index = index.to(self.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.key_valid = self.key_valid.index_select(0, index)

    def rows(self, index: Tensor) -> CacheRows:
        """Rows ``index`` (R,) of this cache as a cache of R rows for one forward (``CacheRows``)."""
        return CacheRows(self, index)


class CacheRows:
    """Rows ``index`` (R,) of a ``KVCache``, for a forward that only those rows take part in (the others sit it
    out: their new slots are written invalid, as a forward that masks them out would leave them). It speaks the
    forward's protocol (``length``, ``batch``, ``extend``, ``append``): keys are written into the parent's rows,
    and each layer reads those rows' keys (a gather of R rows instead of computing all B)."""

    def __init__(self, cache: KVCache, index: Tensor):
        if index.ndim != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"CacheRows: index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
        self.cache, self.index = cache, index.to(cache.device)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def batch(self) -> int:
        return self.index.numel()

    @contextmanager
    def extend(self, key_valid: Tensor) -> Iterator[Tensor]:
        """``KVCache.extend`` for these rows' ``key_valid`` (R, T); the other rows' T new slots are invalid."""
        if key_valid.dtype != torch.bool or key_valid.shape[:1] != self.index.shape or key_valid.ndim != 2:
            raise ValueError(f"CacheRows.extend: key_valid must be bool (R={self.batch}, T), "
                             f"got {key_valid.dtype} {tuple(key_valid.shape)}")
        full = torch.zeros(self.cache.batch, key_valid.shape[1], dtype=torch.bool, device=self.cache.device)
        full[self.index] = key_valid.to(full.device)
        with self.cache.extend(full) as valid_all:
            yield valid_all[self.index]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new (R, K, T, d) keys/values into the parent's rows; return the rows' keys and values
        so far, (R, K, length + T, d)."""
        c = self.cache
        if not c._pending:
            raise RuntimeError("CacheRows.append must be called inside `with rows.extend(...)`")
        start, end = c.length, c.length + c._pending
        c.k[layer, self.index, :, start:end] = k.detach().to(c.k.dtype)
        c.v[layer, self.index, :, start:end] = v.detach().to(c.v.dtype)
        return c.k[layer, :, :, :end][self.index], c.v[layer, :, :, :end][self.index]
