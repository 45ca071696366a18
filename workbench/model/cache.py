"""KV cache that follows the per-layer accessors.

* full layers: preallocated to ``max_len`` positions, written in place;
* sliding layers: a ring of ``sliding_window(i)`` slots (slot = position mod window), never more;
* KV-shared layers: no storage — they read their source layer's K/V (``kv_source(i)``);
* k_eq_v layers: one tensor (the V-normed raw keys); K is rebuilt from it (K = rope(V * k_norm.w)).

Each layer's cache records the absolute position held by every slot (-1 = empty); attention masks come
from those positions, so ring order never matters.
"""
from __future__ import annotations

import numpy as np


class ContextOverflow(ValueError):
    pass


def _runs(idx) -> list[tuple[int, int, int]] | None:
    """Slot indices as at most two runs of consecutive slots: [(first slot, offset in idx, length)], or None."""
    n = len(idx)
    if n == 0:
        return None
    idx = np.asarray(idx)
    br = np.nonzero(np.diff(idx) != 1)[0]
    if len(br) > 1:
        return None
    if not len(br):
        return [(int(idx[0]), 0, n)]
    c = int(br[0]) + 1
    return [(int(idx[0]), 0, c), (int(idx[c]), c, n - c)]


class LayerCache:
    def __init__(self, ops, batch: int, kv_heads: int, head_dim: int, slots: int, ring: bool, one_tensor: bool):
        self.ops = ops
        self.slots = slots
        self.ring = ring
        self.one_tensor = one_tensor
        shape = (batch, kv_heads, slots, head_dim)
        self.k = None if one_tensor else ops.zeros(shape)
        self.v = ops.zeros(shape)
        self.pos = np.full(slots, -1, dtype=np.int64)

    def _write(self, buf, new, slots_idx):
        ops = self.ops
        runs = _runs(slots_idx)
        if ops.framework == "torch":
            if runs is not None:        # slices: no index array to copy to the device (no host sync)
                for a, j, n in runs:
                    buf[:, :, a:a + n].copy_(new[:, :, j:j + n])
                return buf
            import torch
            idx = torch.as_tensor(slots_idx, device=buf.device)
            buf.index_copy_(2, idx, new)
            return buf
        import mlx.core as mx
        if runs is not None:
            for a, j, n in runs:
                buf[:, :, a:a + n, :] = new[:, :, j:j + n] if len(runs) > 1 else new
        else:
            buf[:, :, mx.array(slots_idx.astype(np.int32)), :] = new
        return buf

    def _read(self, buf, slots_idx):
        """buf[:, :, slots_idx] — slices joined where the slots are one or two consecutive runs (a ring)."""
        runs = _runs(slots_idx)
        if runs is not None:
            parts = [buf[:, :, a:a + n] for a, _, n in runs]
            return parts[0] if len(parts) == 1 else self.ops.concat(parts, 2)
        if self.ops.framework == "torch":
            import torch
            return buf.index_select(2, torch.as_tensor(slots_idx, device=buf.device))
        import mlx.core as mx
        return buf[:, :, mx.array(slots_idx.astype(np.int32))]

    def enable_static(self):
        """Mirror the slot positions on the device for the fast decode step (in place when a captured
        graph already holds the buffer)."""
        new = self.ops.asids(self.pos)
        kd = getattr(self, "kpos_dev", None)
        if kd is not None and self.ops.framework == "torch":
            kd.copy_(new)
        else:
            self.kpos_dev = new

    def update_static(self, k, v, pos):
        """Write one token at slot pos % slots with device-side indices; returns the whole buffers.
        (One tensor layers: returns (V, kpos).)"""
        ops = self.ops
        if ops.framework == "torch":
            slot = pos % self.slots
            if k is not None:
                self.k.index_copy_(2, slot, k)
            self.v.index_copy_(2, slot, v)
            self.kpos_dev.index_copy_(0, slot, pos)
        else:
            slot = pos % self.slots
            if k is not None:
                self.k[:, :, slot, :] = k
            self.v[:, :, slot, :] = v
            self.kpos_dev[slot] = pos
        if k is None:
            return self.v, self.kpos_dev
        return self.k, self.v, self.kpos_dev

    def update(self, k, v, positions: np.ndarray):
        """Store new K/V (k may be None for one-tensor layers) at absolute ``positions``; return
        (K, V, kpos) to attend over — for sliding layers with several new tokens, the old ring entries
        plus all new ones, so no query loses a key it needs."""
        ops = self.ops
        T = len(positions)
        if not self.ring:
            if positions[-1] >= self.slots:
                raise ContextOverflow(f"position {positions[-1]} is past the cache's {self.slots} slots "
                                      "(max_len); start a longer cache or shorten the prompt")
            if self.k is not None:
                self.k = self._write(self.k, k, positions)
            self.v = self._write(self.v, v, positions)
            self.pos[positions] = positions
            n = int(positions[-1]) + 1
            K = None if self.k is None else self.k[:, :, :n]
            return K, self.v[:, :, :n], self.pos[:n].copy()
        W = self.slots
        if T == 1:
            s = positions % W
            if self.k is not None:
                self.k = self._write(self.k, k, s)
            self.v = self._write(self.v, v, s)
            self.pos[s] = positions
            return self.k, self.v, self.pos.copy()
        # several new tokens: attend over (old ring entries, all new), then keep the last W
        valid = np.nonzero(self.pos >= 0)[0]
        order = valid[np.argsort(self.pos[valid])]
        kpos = np.concatenate([self.pos[order], positions])
        if len(order):
            oldv = self._read(self.v, order)
            oldk = None if self.k is None else self._read(self.k, order)
            V = ops.concat([oldv, v], 2)
            K = None if self.k is None else ops.concat([oldk, k], 2)
        else:
            K, V = k, v
        keep = slice(max(0, T - W), T)
        kp = positions[keep]
        s = kp % W
        if self.k is not None:
            self.k = self._write(self.k, k[:, :, keep], s)
        self.v = self._write(self.v, v[:, :, keep], s)
        self.pos[s] = kp
        return K, V, kpos


class KVCache:
    """Per-layer caches for one model and batch size. ``offset`` is the number of positions processed."""

    def __init__(self, model, batch: int = 1, max_len: int | None = None):
        cfg = model.config
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.batch = batch
        self.offset = 0
        self.static = False
        self.rope_tables: dict[int, tuple] = {}
        self.rope_key: dict[int, int] = {}
        self._model = model
        self.layers: list[LayerCache | None] = []
        for i in range(cfg.num_hidden_layers):
            if cfg.kv_shared(i):
                self.layers.append(None)
                continue
            w = cfg.sliding_window(i)
            ring = w is not None and cfg.causal and w < self.max_len
            slots = w if ring else self.max_len
            self.layers.append(LayerCache(model.ops, batch, cfg.num_kv_heads(i), cfg.head_dim(i), slots, ring,
                                          one_tensor=cfg.k_eq_v(i)))

    def reset(self):
        """Forget every position (buffers are kept, so captured graphs stay valid)."""
        for c in self.layers:
            if c is not None:
                c.pos[:] = -1
        self.offset = 0
        self.static = False

    def begin_static(self):
        """Switch to the fast decode mode: device-side slot positions and RoPE tables for every position."""
        m = self._model
        ops = m.ops
        tabs: dict[bytes, tuple] = {}
        for i in range(m.config.num_hidden_layers if not self.rope_tables else 0):
            inv = m._inv_freq[i]
            key = inv.tobytes()
            if key not in tabs:
                tabs[key] = ops.rope_table(inv, self.max_len)
            self.rope_tables[i] = tabs[key]
            self.rope_key[i] = list(tabs).index(key)   # layers with equal tables share a key
        for c in self.layers:
            if c is not None:
                c.enable_static()
        self.static = True

    def static_state(self) -> list:
        """The device arrays the static step reads and writes (K, V, slot positions per layer), in a fixed
        order; with :meth:`set_static_state` this lets a functional compiler (mx.compile) thread them through
        a step as inputs and outputs."""
        out = []
        for c in self.layers:
            if c is not None:
                out += ([] if c.k is None else [c.k]) + [c.v, c.kpos_dev]
        return out

    def set_static_state(self, arrays: list) -> None:
        it = iter(arrays)
        for c in self.layers:
            if c is not None:
                if c.k is not None:
                    c.k = next(it)
                c.v, c.kpos_dev = next(it), next(it)

    def end_static(self, offset: int):
        """Back to the plain path after fast steps: host-side positions from the device, offset set."""
        for c in self.layers:
            if c is not None:
                c.pos = np.asarray(c.ops.numpy(c.kpos_dev)).astype(np.int64)
        self.offset = offset
        self.static = False

    def nbytes(self) -> int:
        tot = 0
        for c in self.layers:
            if c is None:
                continue
            for t in (c.k, c.v):
                if t is not None:
                    tot += int(np.prod(t.shape)) * (t.element_size() if hasattr(t, "element_size") else t.itemsize)
        return tot
