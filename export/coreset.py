"""PatchCore's approximate greedy coreset, selected exactly like the reference but much faster.

The reference (amazon-science/patchcore-inspection, `ApproximateGreedyCoresetSampler`):

1. project the features with a random linear map to `proj_dim` dims (skipped here when
   D <= proj_dim: the distances are then exact instead of approximately preserved);
2. each row starts at d_i = the mean of its distances to `n_starts` random rows (those rows are
   not put into the coreset);
3. `n_select` times: pick i* = argmax d, then d_i = min(d_i, |x_i - x_i*|) for every row.

Step 3 as written reads all N rows per selection: a matrix-vector product, bound by memory
bandwidth (587k x 128 floats, 5.9k times: 487 s in the reference on 2 cores). The selection only
needs the exact maximum of d, so `approximate_greedy_coreset` keeps d lazily:

- the rows are grouped into blocks of nearby rows (nearest of ~N/2048 random seed rows), and each
  block keeps an upper bound of its d (its exact maximum when it was last brought up to date);
- a block is brought up to date only when its bound is the largest, with all the selections
  made since its last update at once: one matrix-matrix product from cache instead of many
  matrix-vector products from memory;
- selections that cannot lower any d in a block are skipped by the triangle inequality:
  |x_i - c| >= |c - seed| - radius >= max d of the block (this pays on clustered data; on real
  PatchCore features, whose intrinsic dimension is high, it skips ~10%);
- the products run in float32 and only screen: a pair whose float32 squared distance exceeds
  d_i^2 by more than a proven error bound cannot lower d_i; the few others (~the rows that do
  get lower) are recomputed in float64.

Every d that the argmax reads is therefore the float64 value that `reference_greedy_coreset`
(the plain algorithm) computes, from the same working rows with the same formula, and ties go to
the lowest index as with np.argmax: the selections are the same. The only possible differences
come from values a few float64 ulps apart (the two use different BLAS kernels for the same dot
products), i.e. ties up to rounding.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

# Rows per chunk when a pass over all rows would otherwise need [N, k] temporaries.
_CHUNK_ROWS = 16384
_CHUNK_ELEMENTS = 1 << 21
# Block size: ~2k rows x 130 float32 is 1 MB, cache-sized; small inputs get smaller blocks so
# that they are still split (and the tests exercise the lazy path).
_BLOCK_ROWS = 2048
_MIN_BLOCK_ROWS = 64
_BLOCKS_FOR_SMALL_INPUTS = 32
# Selections applied to a block per matrix product, to bound the [k, block] temporary.
_PENDING_CHUNK = 256
# Pruning margin, in units of the worst-case rounding error of one computed distance.
_MARGIN_ERRORS = 8.0


# ------------------------------------------------------------------------------ public API


def approximate_greedy_coreset(
    features: np.ndarray,
    n_select: int,
    *,
    proj_dim: int | None = 128,
    n_starts: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Indices (int64, length n_select, distinct) of the selected rows, in selection order.

    Same selection as `reference_greedy_coreset`; n_select >= len(features) returns every index
    (np.arange), as the bank is then the whole set. Extra memory is O(N * proj_dim).
    """
    feats, n_select = _check_arguments(features, n_select, proj_dim, n_starts)
    n = len(feats)
    if n_select >= n:
        return np.arange(n, dtype=np.int64)
    blocked = _blocked_inputs(feats, proj_dim, n_starts, seed)
    selected, _ = _lazy_greedy(blocked, n_select, progress)
    return blocked.layout.order[selected]


def reference_greedy_coreset(
    features: np.ndarray,
    n_select: int,
    *,
    proj_dim: int | None = 128,
    n_starts: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """The plain algorithm, one full pass over all rows per selection (for tests and timing).

    Distances in float64, on one thread like the fast version (a matrix-vector product gains
    little from a second thread: it is bound by memory bandwidth).
    """
    feats, n_select = _check_arguments(features, n_select, proj_dim, n_starts)
    n = len(feats)
    if n_select >= n:
        return np.arange(n, dtype=np.int64)
    work = _prepare(feats, proj_dim, n_starts, seed)
    rows = _augmented_rows(work.x, work.sq_norms)
    rows_t = torch.from_numpy(rows)
    d = work.d0.copy()
    out = np.empty(n_select, dtype=np.int64)
    with _torch_matmul_settings():
        for t in range(n_select):
            i = int(np.argmax(d))
            out[t] = i
            centre = torch.from_numpy(_centre_rows(rows[i : i + 1])[0])
            np.minimum(d, _to_distance(torch.mv(rows_t, centre).numpy()), out=d)
            d[i] = -np.inf  # never again: duplicates of a chosen row still get chosen, by index
    return out


def covering_radius(features: np.ndarray, bank: np.ndarray, *, chunk: int = 65536) -> float:
    """Max over the rows of `features` of the Euclidean distance to the nearest row of `bank`."""
    import faiss  # from the cpu/gpu extras, which the training side has

    feats = _check_matrix(features, "features")
    bank = _check_matrix(bank, "bank")
    if feats.shape[1] != bank.shape[1]:
        raise ValueError(f"features have {feats.shape[1]} columns but the bank has {bank.shape[1]}")
    if not _is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    # For large query batches FAISS computes |q|^2 + |b|^2 - 2 q.b in float32: centring keeps
    # the norms, and so the cancellation error, no larger than the spread of the data.
    centre = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.asarray(bank, dtype=np.float32) - centre)
    worst = 0.0
    for start in range(0, len(feats), int(chunk)):
        queries = np.asarray(feats[start : start + int(chunk)], dtype=np.float32) - centre
        sq, _ = index.search(queries, 1)
        worst = max(worst, float(sq.max()))
    return math.sqrt(max(worst, 0.0))


# ------------------------------------------------------------------------------ validation


def _check_matrix(a: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(
    features: np.ndarray, n_select: int, proj_dim: int | None, n_starts: int
) -> tuple[np.ndarray, int]:
    feats = _check_matrix(features, "features")
    n = feats.shape[0]
    if not _is_int(n_select) or n_select < 1:
        raise ValueError(
            f"n_select must be an integer >= 1 (at most {n} is useful), got {n_select!r}"
        )
    if proj_dim is not None and (not _is_int(proj_dim) or proj_dim < 1):
        raise ValueError(f"proj_dim must be a positive integer or None, got {proj_dim!r}")
    if not _is_int(n_starts) or n_starts < 1:
        raise ValueError(f"n_starts must be a positive integer, got {n_starts!r}")
    return feats, int(n_select)


# ------------------------------------------------------------------------------ shared steps


@dataclass
class _Working:
    """What both algorithms start from, computed once by the same code (so bit-identical)."""

    x: np.ndarray  # [N, Dw] float32: projected (or copied) features, centred
    sq_norms: np.ndarray  # [N] float64: |x_i|^2
    d0: np.ndarray  # [N] float64: mean distance to the starting rows


def _spawn(seed: int) -> list[np.random.Generator]:
    """Independent streams: projection, starting rows, block seeds (which never change results)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def _prepare(feats: np.ndarray, proj_dim: int | None, n_starts: int, seed: int) -> _Working:
    rng_proj, rng_starts, _ = _spawn(seed)
    x = _project(feats, proj_dim, rng_proj)
    # Distances do not change under translation, but the float error of |x|^2 + |c|^2 - 2 x.c
    # scales with the norms, and features after ReLU sit far from the origin: uncentred, the
    # float32 screen below would pass almost every pair on to the float64 recomputation.
    x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    if not np.isfinite(sq_norms).all():
        raise ValueError("features contain NaN or infinite values")
    starts = rng_starts.choice(len(x), size=min(n_starts, len(x)), replace=False)
    d0 = _anchor_distances(x, sq_norms, starts)
    return _Working(x=x, sq_norms=sq_norms, d0=d0)


def _project(feats: np.ndarray, proj_dim: int | None, rng: np.random.Generator) -> np.ndarray:
    """[N, Dw] float32 working rows (a fresh array: the caller centres it in place)."""
    dim = feats.shape[1]
    if proj_dim is None or dim <= proj_dim:
        return np.array(feats, dtype=np.float32, order="C", copy=True)
    matrix = (rng.standard_normal((dim, proj_dim)) / math.sqrt(proj_dim)).astype(np.float32)
    out = np.empty((len(feats), proj_dim), dtype=np.float32)
    for s in range(0, len(feats), _CHUNK_ROWS):  # float64 input must not be cast all at once
        np.matmul(
            np.asarray(feats[s : s + _CHUNK_ROWS], dtype=np.float32),
            matrix,
            out=out[s : s + _CHUNK_ROWS],
        )
    return out


def _augmented_rows(
    x: np.ndarray,
    sq_norms: np.ndarray,
    order: np.ndarray | None = None,
    dtype: type[np.floating] = np.float64,
) -> np.ndarray:
    """[N, Dw + 2] rows [x, |x|^2, 1] (in `order` if given).

    With centre rows [-2c, 1, |c|^2] one dot product is |x - c|^2: a plain GEMM/GEMV gives the
    squared distances with the norms folded in, and no [N, k] temporaries for the sums.
    """
    n, dim = x.shape
    rows = np.empty((n, dim + 2), dtype=dtype)
    for s in range(0, n, _CHUNK_ROWS):
        idx = slice(s, s + _CHUNK_ROWS) if order is None else order[s : s + _CHUNK_ROWS]
        rows[s : s + _CHUNK_ROWS, :dim] = x[idx]
        rows[s : s + _CHUNK_ROWS, dim] = sq_norms[idx]
    rows[:, dim + 1] = 1.0
    return rows


def _centre_rows(rows: np.ndarray) -> np.ndarray:
    """Augmented rows [x, |x|^2, 1] -> centre rows [-2x, 1, |x|^2] (exact: a power-of-2 scale)."""
    dim = rows.shape[1] - 2
    out = np.empty_like(rows)
    np.multiply(rows[:, :dim], -2.0, out=out[:, :dim])
    out[:, dim] = 1.0
    out[:, dim + 1] = rows[:, dim]
    return out


def _to_distance(sq: np.ndarray) -> np.ndarray:
    """Squared distances (rounding can make them slightly negative) -> distances, in place."""
    np.maximum(sq, 0.0, out=sq)
    return np.sqrt(sq, out=sq)


def _anchor_distances(x: np.ndarray, sq_norms: np.ndarray, starts: np.ndarray) -> np.ndarray:
    centres = _centre_rows(_augmented_rows(x[starts], sq_norms[starts]))
    d0 = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), _CHUNK_ROWS):
        block = _augmented_rows(x[s : s + _CHUNK_ROWS], sq_norms[s : s + _CHUNK_ROWS])
        d0[s : s + _CHUNK_ROWS] = _to_distance(block @ centres.T).mean(axis=1)
    return d0


def _rounding_error(dim: int, max_sq: float) -> float:
    """Bound on the error of one computed float64 distance between two working rows.

    A (Dw + 2)-term float64 dot product errs by at most (Dw + 2) * eps * sum |terms|, and the
    terms sum to at most 2 (|x|^2 + |c|^2) <= 4 max|x|^2; |sqrt(a) - sqrt(b)| <= sqrt(|a - b|).
    """
    return math.sqrt(4.0 * (dim + 2) * np.finfo(np.float64).eps * max_sq)


# ------------------------------------------------------------------------------ blocks


@dataclass
class _Layout:
    """Rows grouped into blocks of nearby rows; rows are stored in `order` (block by block)."""

    order: np.ndarray  # [N] int64: original index of each stored row
    starts: np.ndarray  # [B] first stored row of each block
    ends: np.ndarray  # [B] one past its last
    seed_of: np.ndarray  # [B] which seed row the block was built around
    seeds: np.ndarray  # [S, Dw + 2] augmented seed rows
    radius: np.ndarray  # [B] max distance from the seed to a row of the block


def _block_layout(work: _Working, rng: np.random.Generator) -> _Layout:
    n = len(work.x)
    size = min(_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, n // _BLOCKS_FOR_SMALL_INPUTS))
    n_seeds = max(1, -(-n // size))
    # Random seeds follow the density, so dense regions get more (and smaller) cells.
    seed_idx = np.sort(rng.choice(n, size=n_seeds, replace=False))
    seeds = _augmented_rows(work.x[seed_idx], work.sq_norms[seed_idx])
    label, dist = _nearest_seed(work.x, work.sq_norms, _centre_rows(seeds))
    # Stable: within a block, stored order is index order, so argmax breaks ties like np.argmax.
    order = np.argsort(label, kind="stable")
    label, dist = label[order], dist[order]
    starts, ends = _split_cells(label, size)
    return _Layout(
        order=order,
        starts=starts,
        ends=ends,
        seed_of=label[starts],
        seeds=seeds,
        radius=np.maximum.reduceat(dist, starts),
    )


def _nearest_seed(
    x: np.ndarray, sq_norms: np.ndarray, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    label = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float64)
    step = max(1, min(_CHUNK_ROWS, _CHUNK_ELEMENTS // len(centres)))
    for s in range(0, len(x), step):
        sq = _augmented_rows(x[s : s + step], sq_norms[s : s + step]) @ centres.T
        best = sq.argmin(axis=1)
        label[s : s + step] = best
        dist[s : s + step] = _to_distance(np.take_along_axis(sq, best[:, None], 1)[:, 0])
    return label, dist


def _split_cells(label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal (sorted) labels, each cut into near-equal blocks of at most `size` rows."""
    cuts = np.flatnonzero(np.diff(label)) + 1
    cell_starts = np.concatenate([[0], cuts])
    cell_ends = np.concatenate([cuts, [len(label)]])
    starts, ends = [], []
    for s, e in zip(cell_starts.tolist(), cell_ends.tolist(), strict=True):
        pieces = -(-(e - s) // size)
        edges = s + (np.arange(pieces + 1) * (e - s)) // pieces
        starts.append(edges[:-1])
        ends.append(edges[1:])
    return np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)


# ------------------------------------------------------------------------------ lazy greedy


def _float32_slack(dim: int) -> float:
    """f such that f (|x|^2 + |c|^2) is 4x the worst-case error of a float32 |x - c|^2.

    The (Dw + 2)-term float32 dot product errs by at most gamma * sum |terms| (any summation
    order, FMA or not), the terms sum to at most (2 + u) (|x|^2 + |c|^2), and rounding the stored
    norms to float32 adds u each. A pair whose float32 value exceeds d^2 + slack is then above
    d^2 by 3 errors, far more than the float64 error (~1e-9 of it): it cannot lower d.
    """
    u = float(np.finfo(np.float32).eps) / 2
    n = dim + 2
    gamma = n * u / (1 - n * u)
    return 4.0 * ((2 + u) * gamma + u)


@dataclass
class _Blocked:
    """The fast algorithm's inputs, in block order."""

    rows: np.ndarray  # [N, Dw + 2] float32 augmented rows [x, |x|^2, 1]
    sq_norms: np.ndarray  # [N] float64 |x|^2 (the exact ones)
    d: np.ndarray  # [N] float64 initial d
    layout: _Layout


def _blocked_inputs(feats: np.ndarray, proj_dim: int | None, n_starts: int, seed: int) -> _Blocked:
    work = _prepare(feats, proj_dim, n_starts, seed)
    layout = _block_layout(work, _spawn(seed)[2])
    order = layout.order
    # float32 rows hold x exactly (x is float32), so float64 rows can be rebuilt when needed.
    rows = _augmented_rows(work.x, work.sq_norms, order, np.float32)
    return _Blocked(rows=rows, sq_norms=work.sq_norms[order], d=work.d0[order], layout=layout)


class _LazyState:
    """Per-block bounds of d, and the selections each block has not been updated with."""

    def __init__(self, blocked: _Blocked, n_select: int):
        self.rows = blocked.rows
        self.sq_norms = blocked.sq_norms
        self.d = blocked.d
        self.layout = blocked.layout
        width = self.rows.shape[1]
        self.centres = np.empty((n_select, width), dtype=np.float64)  # [-2c, 1, |c|^2]
        self.centres32 = np.empty((n_select, width), dtype=np.float32)
        self.count = 0  # selections made so far
        self.bound = np.maximum.reduceat(self.d, self.layout.starts)  # >= max d of the block
        self.seen = np.zeros(len(self.layout.starts), dtype=np.int64)  # selections applied
        max_sq = float(self.sq_norms.max())
        self.margin = _MARGIN_ERRORS * _rounding_error(width - 2, max_sq)
        self.slack = _float32_slack(width - 2) * (self.sq_norms + max_sq)
        block = int((self.layout.ends - self.layout.starts).max())
        self._products = np.empty(_PENDING_CHUNK * block, dtype=np.float32)
        self.pairs = 0  # row-centre distances computed in float32 (for tests and measurements)
        self.exact_pairs = 0  # ... and recomputed in float64

    def refresh(self, j: int) -> None:
        """Apply the selections block j has not seen; its bound becomes its exact max again."""
        lo, hi = int(self.layout.starts[j]), int(self.layout.ends[j])
        first = int(self.seen[j])
        self.seen[j] = self.count
        near = first + self._near(j, self.centres[first : self.count])
        if near.size:
            self._lower(lo, hi, near)
        self.bound[j] = self.d[lo:hi].max()

    def _near(self, j: int, pending: np.ndarray) -> np.ndarray:
        """Positions in `pending` of the centres that may lower some d in block j.

        A centre c lowers d_i only if |x_i - c| < d_i <= bound, and |x_i - c| >= |c - seed| -
        radius; the margin covers rounding in all of those computed distances.
        """
        seed_row = self.layout.seeds[self.layout.seed_of[j]]
        to_seed = _to_distance(pending @ seed_row)
        reach = self.layout.radius[j] + self.bound[j] + self.margin
        return np.flatnonzero(to_seed < reach)

    def _lower(self, lo: int, hi: int, centres: np.ndarray) -> None:
        """d = min(d, distance to each of `centres`) on stored rows lo:hi.

        float32 GEMMs (twice the float64 speed) screen the pairs: one whose float32 squared
        distance exceeds d^2 + slack cannot lower d, in float64 either. The few others (about
        the rows that do get lower) are recomputed in float64, as the reference computes them.
        """
        d = self.d[lo:hi]
        limit = np.copysign(d * d, d) + self.slack[lo:hi]  # chosen rows (d = -inf) never pass
        block = torch.from_numpy(self.rows[lo:hi])
        n = hi - lo
        hit_rows, hit_centres = [], []
        for a in range(0, len(centres), _PENDING_CHUNK):
            part = centres[a : a + _PENDING_CHUNK]
            sq = self._products[: len(part) * n].reshape(len(part), n)
            torch.mm(torch.from_numpy(self.centres32[part]), block.T, out=torch.from_numpy(sq))
            close = np.flatnonzero(sq.min(axis=0) <= limit)
            if close.size:
                c, r = np.nonzero(sq[:, close] <= limit[close])
                hit_rows.append(close[r])
                hit_centres.append(part[c])
        self.pairs += n * len(centres)
        if hit_rows:
            r = np.concatenate(hit_rows)
            self.exact_pairs += len(r)
            # min is exact and order-free: the same result as one centre at a time.
            np.minimum.at(d, r, self._exact_distance(lo + r, np.concatenate(hit_centres)))

    def _exact_rows(self, pos: np.ndarray) -> np.ndarray:
        """float64 augmented rows of stored rows `pos` (x exact, |x|^2 from float64)."""
        dim = self.rows.shape[1] - 2
        out = np.empty((len(pos), dim + 2), dtype=np.float64)
        out[:, :dim] = self.rows[pos, :dim]
        out[:, dim] = self.sq_norms[pos]
        out[:, dim + 1] = 1.0
        return out

    def _exact_distance(self, pos: np.ndarray, centres: np.ndarray) -> np.ndarray:
        sq = np.einsum("ij,ij->i", self._exact_rows(pos), self.centres[centres])
        return _to_distance(sq)

    def next_row(self) -> int | None:
        """Stored position of the row with the largest d, or None if a block must refresh first.

        Ties go to the lowest original index, like np.argmax over all rows.
        """
        j = int(np.argmax(self.bound))
        if self.seen[j] < self.count:
            self.refresh(j)
            return None
        tied = np.flatnonzero(self.bound == self.bound[j])
        if tied.size > 1:
            stale = tied[self.seen[tied] < self.count]
            if stale.size:
                self.refresh(int(stale[0]))
                return None
            candidates = [self._block_argmax(int(k)) for k in tied]
            return min(candidates, key=lambda pos: self.layout.order[pos])
        return self._block_argmax(j)

    def _block_argmax(self, j: int) -> int:
        lo, hi = int(self.layout.starts[j]), int(self.layout.ends[j])
        return lo + int(np.argmax(self.d[lo:hi]))

    def select(self, pos: int) -> None:
        self.centres[self.count] = _centre_rows(self._exact_rows(np.array([pos])))[0]
        self.centres32[self.count] = self.centres[self.count]
        self.count += 1
        self.d[pos] = -np.inf  # chosen; its block is now stale and refreshes before it is read


def _lazy_greedy(blocked: _Blocked, n_select: int, progress: bool) -> tuple[np.ndarray, _LazyState]:
    """Stored positions of the selected rows, in order, and the final state (for its counts)."""
    state = _LazyState(blocked, n_select)
    chosen = np.empty(n_select, dtype=np.int64)
    with (
        _torch_matmul_settings(),
        tqdm(total=n_select, desc="Coreset", unit="row", disable=not progress) as bar,
    ):
        while state.count < n_select:
            pos = state.next_row()
            if pos is None:
                continue
            chosen[state.count] = pos
            state.select(pos)
            bar.update(1)
    return chosen, state


@contextlib.contextmanager
def _torch_matmul_settings() -> Iterator[None]:
    """One thread and full float32 precision for torch's GEMMs, restored afterwards.

    The products here are small (2k x 130 by a few dozen centres): a second BLAS thread gains
    little on an idle machine and, when another process holds a core, every product waits for
    the descheduled thread (measured 5-20x slower on the shared 2-core build machine).
    "highest" precision: a caller's "medium" would let oneDNN use bf16, beyond the error bound.
    """
    threads = torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
