"""Reading taps for heads: row blocks within a memory budget, statistics, shuffled batches.

Everything here works on a :class:`featlab.features.store.FeatureStore` and numpy; no TensorFlow.

- :func:`read_blocks`: sorted row groups of at most ``budget`` bytes (as float32).
- :func:`feature_stats`: mean and std of the (pooled, flattened) features over some rows, in blocks,

- fusion keys: ``res12+res14+embedding`` names one head input made of several taps
  (:func:`fusion_parts`); :func:`read_input` gives a list of arrays for them, :func:`read_pooled` their
  pooled, flattened concatenation, :func:`check_finite` checks every part.
- :class:`ShuffledBatches`: batches of a split read from the file when it does not fit in memory. Every
  epoch draws a fresh permutation of all the split's rows (a shuffle across the whole train set, as in
  memory), reads it in blocks that fit the budget, and cuts each block into batches; validation reads
  only its own rows.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FeatlabError
from ..paths import FUSION
from .store import FeatureStore


def fusion_parts(key: str) -> list[str]:
    """The taps of a head input: ``"res12+res14"`` -> ``["res12", "res14"]``; a plain tap -> ``[key]``."""
    parts = [p for p in str(key).split(FUSION)]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise FeatlabError(f"fusion key {key!r}: name each tap once, joined by '+' (e.g. res12+res14+embedding)")
    return parts


def is_fusion(key: str) -> bool:
    return FUSION in str(key)


def read_input(store: FeatureStore, key: str, rows):
    """What a head's model takes for ``rows``: the tap's array, or for a fusion key a list (one per tap)."""
    if not is_fusion(key):
        return store.read(key, rows)
    return [store.read(p, rows) for p in fusion_parts(key)]


def read_pooled(store: FeatureStore, key: str, rows, pool=None) -> np.ndarray:
    """The head's (pooled, flattened) input features for ``rows``, a fusion key's taps concatenated (float32)."""
    xs = [pool_np(store.read(p, rows), pool).reshape(len(rows), -1) for p in fusion_parts(key)]
    return xs[0].astype(np.float32, copy=False) if len(xs) == 1 else np.concatenate(xs, axis=1).astype(np.float32)


def check_finite(store: FeatureStore, key: str, rows) -> None:
    """:meth:`FeatureStore.check_finite` for every tap of ``key``."""
    for p in fusion_parts(key):
        store.check_finite(p, rows)


def pool_np(x: np.ndarray, pool: str | None) -> np.ndarray:
    if pool and x.ndim == 4:
        return x.mean(axis=(2, 3)) if pool == "avg" else x.max(axis=(2, 3))
    return x


def row_bytes(store: FeatureStore, key: str) -> int:
    """Bytes of one row as float32 (what heads read); a fusion key counts all its taps."""
    return sum(int(np.prod(store.array(p).shape[1:])) * 4 for p in fusion_parts(key))


def read_blocks(rows, store: FeatureStore, key: str, budget_bytes: int = 256 << 20):
    """Consecutive groups of ``rows`` of at most ~``budget_bytes`` each (as float32)."""
    per = max(1, int(budget_bytes) // max(1, row_bytes(store, key)))
    rows = np.asarray(rows, dtype=np.int64)
    for i in range(0, len(rows), per):
        yield rows[i : i + per]


def feature_stats(store: FeatureStore, key: str, rows: np.ndarray, pool=None, x=None,
                  budget_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the pooled, flattened features over ``rows``, read in blocks of about
    ``budget_bytes`` (or from ``x`` when the rows are in memory already, walked in slices so no full-size
    float64 copy is made). Constant features get std 1. Callers check finiteness first
    (:meth:`FeatureStore.check_finite`)."""
    s = s2 = None
    n = 0
    if x is not None:
        per = max(1, int(budget_bytes) // max(1, int(np.prod(x.shape[1:])) * 8))
        blocks = (x[i : i + per] for i in range(0, len(x), per))
    else:
        blocks = (store.read(key, r) for r in read_blocks(rows, store, key, budget_bytes // 3))
    for b in blocks:
        b = pool_np(b, pool).reshape(len(b), -1).astype(np.float64)
        if s is None:
            s, s2 = np.zeros(b.shape[1]), np.zeros(b.shape[1])
        s += b.sum(axis=0)
        s2 += (b * b).sum(axis=0)
        n += len(b)
    if not n:
        raise FeatlabError(f"tap {key}: no rows to compute statistics on")
    mean = s / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6 * max(1.0, float(np.abs(mean).max(initial=0.0)))] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


class ShuffledBatches:
    """Batches ``(x, y[, w])`` of ``rows`` of tap ``key``, read from the file within ``budget_bytes``.

    With ``shuffle``, every epoch uses a fresh seeded permutation of all the rows; the permutation is read
    in blocks (each block sorted for the read, then put back in permuted order), so consecutive batches
    are uniform random draws from the whole split — the same mix as in-memory training, whatever order
    the file is in. Without ``shuffle`` the rows are read in file order. ``reads`` counts block reads and
    ``rows_read`` the rows read (validation reads only its own rows).
    """

    def __init__(self, store: FeatureStore, key: str, rows, y, w=None, batch_size: int = 128, shuffle: bool = True,
                 seed: int = 0, budget_bytes: int = 256 << 20):
        self.store, self.key = store, key
        self.rows = np.asarray(rows, dtype=np.int64)
        self.y, self.w = y, w
        self.bs = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        per = max(1, int(budget_bytes) // max(1, row_bytes(store, key)))
        self.block = max(self.bs, per // self.bs * self.bs)  # whole batches per block
        self.epoch = 0
        self.reads = 0
        self.rows_read = 0
        self._plan()
        self._cached = (None, None)

    def _plan(self) -> None:
        n = len(self.rows)
        self.order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                      else np.arange(n))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.bs)

    def _load(self, b: int):
        if self._cached[0] != b:
            pos = self.order[b * self.block : (b + 1) * self.block]
            x = self.store.read(self.key, self.rows[pos])  # store.read sorts for the read, returns in this order
            self.reads += 1
            self.rows_read += len(pos)
            self._cached = (b, (x, pos))
        return self._cached[1]

    def batch(self, i: int):
        per_block = self.block // self.bs
        x, pos = self._load(i // per_block)
        s = slice((i % per_block) * self.bs, (i % per_block + 1) * self.bs)
        out = (x[s], self.y[pos[s]])
        if self.w is not None:
            out = out + (self.w[pos[s]],)
        return out

    def next_epoch(self) -> None:
        self.epoch += 1
        self._plan()
