"""Nearest-neighbour search over the memory bank with FAISS: exact flat L2 (GPU when there is
one), or an index for slow CPU boxes:

- ivf: the bank split into ~sqrt(M) k-means cells (trained on the bank itself at load, fixed
  seed, so deterministic); a query scans only its `nprobe` nearest cells. Exact search here
  is bound by the queries x bank distance matrix, so scanning a few cells is what pays;
- ivf-exact: ivf, then an exact re-check of only the patches that decide. An ivf answer is
  the exact distance to *some* bank row, so it bounds the true nearest distance from above;
  the Scorer re-checks patches exactly (search_exact) in descending order of bound until no
  bound can beat the best exact score (scorer.py). Image scores, thresholded masks and map
  maxima are then flat's, at close to ivf's cost;
- hnsw: a proximity graph; at its default search breadth slower than batched flat search at
  the bank sizes PatchCore uses;
- hnsw-exact: a sparse graph searched narrowly (HNSW_EXACT_*) for the bounds, then ivf-exact's
  re-checks. Its answers, too, are exact distances to some bank row, tighter than ivf's at
  less cost; the results are flat's, as ivf-exact's;
- auto (the default): flat when FAISS has a GPU, else hnsw-exact.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "ivf-exact", "hnsw", "hnsw-exact")
RECHECKED_KINDS = ("ivf-exact", "hnsw-exact")
DEFAULT_INDEX = "auto"
# hnsw-exact's graph: 16 links a row, 4 candidates a search. The graph only bounds; the
# re-checks make the answers flat's, so its breadth trades search time against re-checks. On
# MTD's default bundle (19,415 x 168, int8 trunk, batches of 8, NG maps as the agent makes them)
# the engine did 66.8 img/s (64.8-68.9, six rounds) against 62.7 (61.2-63.6) for the former
# 12 links and 8 candidates, alternated; 16/3, 16/5, 20/4 and 24/3 were within 2% of it, and
# 12/2 re-checked 2.5x as many patches per image score and was slower (BENCHMARKS.md).
HNSW_EXACT_M = 16
HNSW_EXACT_EF = 4
# ivf-exact's results are exact at any nprobe; nprobe only sets its cost: the ivf search grows
# with it, the re-checks shrink. On MTD (default bundle, calibrated, 2 cores) the agent gave
# 64-67 verdicts/s at 4, 58 at 6, 46 at 12, and 66-76 at 2 and 66 at 1 (within run-to-run
# noise of 4, with 2-4x the re-checks per image score and looser maps of bounds for overlays),
# BENCHMARKS.md. Whole maps away from the threshold stay bounds; evaluate re-checks them for its
# pixel metrics. Plain ivf shares the default.
DEFAULT_NPROBE = 4

# Flat search computes ||x||^2 + ||y||^2 - 2 x.y with a GEMM, ivf sums (x - y)^2 directly, so
# the same pair's squared distances differ by float32 rounding: up to 8 eps (||x||^2 + ||y||^2)
# on MTD's 152-d features (measured). Bounds are raised by 100 eps (||q||^2 + max ||y||^2) at
# D = 152, growing like sqrt(D) as a dot product's rounding does, so that they bound flat's
# numbers and not only the true ones.
ROUNDING_MARGIN = 100.0 * float(np.finfo(np.float32).eps)

# ivf-exact's re-checks: up to a few hundred queries at a time (an image score's window, an NG
# frame's mask), where FAISS's flat search runs at 0.3-0.9 ms a query on 19k x 168 on 2 cores,
# against ~0.09 ms from about 770 queries up (measured, BENCHMARKS.md). Below
# RECHECK_PRODUCT_BELOW queries one matrix product ranks the rows instead (2.5-2.8x faster
# there): ||y||^2 - 2 q.y, with ||y||^2 folded into the product as one more column. For k = 1
# the row of the smallest rank is the nearest unless another row ranks within twice the
# product's rounding of it (then the RECHECK_CANDIDATES best are measured, as for k > 1); the
# distance is then summed directly, as flat reports it (equal to 2.4e-7 relative, measured).
# Whole maps (evaluate's exact pixel metrics: ~1,300 queries an image) are ranked by FAISS's
# flat search (about twice as fast as the product there, measured), and its RECHECK_CANDIDATES best
# rows are measured the same way, so that the distances come out of the same sum whatever the
# query count: FAISS's own (a GEMM expansion, its rounding depending on the CPU's BLAS kernels:
# 2.7e-6 relative between them on MTD) would move map pixels across a threshold from one
# CPU to the next.
RECHECK_PRODUCT_BELOW = 768
RECHECK_CANDIDATES = 8
RECHECK_CHUNK = 256  # queries per product: 256 x 19k float32 is 20 MB


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def resolve_kind(kind: str, device: str) -> str:
    """The index `kind` names on this machine: auto -> flat where FAISS runs on a GPU (exact
    search is cheap there), else hnsw-exact."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    return "flat" if device in ("auto", "cuda") and gpu_count() > 0 else "hnsw-exact"


class MemoryBankIndex:
    """k-NN over the bank; returns Euclidean (not squared) distances."""

    def __init__(
        self,
        bank: np.ndarray,
        *,
        kind: str = DEFAULT_INDEX,
        device: str = "auto",
        hnsw_m: int | None = None,
        hnsw_ef_search: int | None = None,
        ivf_nprobe: int = DEFAULT_NPROBE,
    ) -> None:
        """hnsw_m / hnsw_ef_search: the graph's links a row and search breadth (None: 32 / 64
        for hnsw, HNSW_EXACT_M / HNSW_EXACT_EF for hnsw-exact)."""
        kind = resolve_kind(kind, device)
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        dim = bank.shape[1]
        self.exact_index: faiss.Index | None = None  # the flat twin for re-checks
        if kind in ("hnsw", "hnsw-exact"):
            narrow = kind == "hnsw-exact"
            m = hnsw_m or (HNSW_EXACT_M if narrow else 32)
            index = faiss.IndexHNSWFlat(dim, m)
            index.hnsw.efConstruction = 2 * m
            index.add(bank)
            index.hnsw.efSearch = hnsw_ef_search or (HNSW_EXACT_EF if narrow else 64)
        elif kind in ("ivf", "ivf-exact"):
            nlist = max(1, int(np.sqrt(len(bank))))
            quantizer = faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist)
            index.cp.seed = 1234  # k-means seed: the same bank gives the same cells
            index.train(bank)
            index.add(bank)
            index.nprobe = min(ivf_nprobe, nlist)
        else:
            index = faiss.IndexFlatL2(dim)
            index.add(bank)
        if kind in RECHECKED_KINDS:
            self.exact_index = faiss.IndexFlatL2(dim)
            self.exact_index.add(bank)
            self._bank = bank
            bank_sq = np.einsum("ij,ij->i", bank, bank)
            # The re-checks' ranking matrix [-2 y, ||y||^2] (search_exact), stored transposed
            # [D + 1, M]: OpenBLAS multiplies a few dozen queries by it 1.2-1.35x as fast as
            # by the [M, D + 1] matrix's transposed view (19,415 rows, 32-90 queries, measured).
            self._ranker_t = np.ascontiguousarray(
                np.hstack([-2.0 * bank, bank_sq[:, None]]).T, dtype=np.float32
            )
            self._margin = ROUNDING_MARGIN * math.sqrt(dim / 152.0)
            self._bank_sq_max = float(bank_sq.max())
        self.device = "cpu"
        # Only the exact index goes to the GPU: there it is fast enough that approximation
        # buys nothing.
        if device in ("auto", "cuda") and kind == "flat" and gpu_count() > 0:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            self._resources = resources  # must outlive the index
            self.device = "cuda"
        elif device == "cuda":
            log.warning("FAISS has no GPU here (faiss-gpu not installed or no device): using CPU")
        self.index = index
        self.kind = kind
        self.size = bank.shape[0]

    @property
    def rechecks(self) -> bool:
        """Whether search_bounds + search_exact is the way to use this index (RECHECKED_KINDS)."""
        return self.exact_index is not None

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows as this kind finds them (ivf-exact: exact, the cost of flat;
        its Scorer uses search_bounds and re-checks only what decides)."""
        if self.exact_index is not None:
            return self.search_exact(queries, k)
        return _search(self.index, queries, k)

    def search_pointer(self, ptr: int, n: int, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """search() of n float32 rows at address `ptr`: host memory, or CUDA memory when the
        index is on the GPU (FAISS GPU indexes take device pointers, as its contrib helpers
        pass them); the distances and rows come back in host arrays."""
        if self.exact_index is not None:
            raise ValueError(
                f"{self.kind} re-checks on the host: search its features, not a pointer"
            )
        sq = np.empty((n, k), dtype=np.float32)
        idx = np.empty((n, k), dtype=np.int64)
        self.index.search_c(
            n,
            faiss.cast_integer_to_float_ptr(ptr),
            k,
            faiss.swig_ptr(sq),
            faiss.swig_ptr(idx),
        )
        return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq), idx

    def search_exact(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest rows: flat search; for ivf-exact's smaller re-checks, rows ranked
        by one matrix product, the candidates' distances summed directly (RECHECK_*)."""
        if self.exact_index is None:
            return _search(self.index, queries, k)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if len(q) >= RECHECK_PRODUCT_BELOW:
            return self._search_flat_measured(q, k)
        dist = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        c = min(max(k, RECHECK_CANDIDATES), self.size)
        for start in range(0, len(q), RECHECK_CHUNK):
            chunk = q[start : start + RECHECK_CHUNK]
            part = slice(start, start + len(chunk))
            # [q, 1] . [-2 y, ||y||^2] = ||q - y||^2 - ||q||^2: ranks rows like the distance.
            rank = np.hstack([chunk, np.ones((len(chunk), 1), np.float32)]) @ self._ranker_t
            if c == self.size or k > 1:
                cand = (
                    np.broadcast_to(np.arange(self.size), (len(chunk), self.size))
                    if c == self.size  # a bank this small: every row is a candidate
                    else np.argpartition(rank, c - 1, axis=1)[:, :c]
                )
                dist[part], rows[part] = self._measure(chunk, cand, k)
                continue
            # k = 1: the smallest rank is the nearest row unless the second smallest is
            # within twice the product's rounding of it; only those queries measure c rows.
            n = np.arange(len(chunk))
            best = rank.argmin(axis=1)
            low = rank[n, best]
            rank[n, best] = np.inf
            close = rank.min(axis=1) - low <= 2.0 * self._rank_noise(chunk)
            rank[n, best] = low
            d, r = self._measure(chunk, best[:, None], 1)
            if close.any():
                cand = np.argpartition(rank[close], c - 1, axis=1)[:, :c]
                d[close], r[close] = self._measure(chunk[close], cand, 1)
            dist[part], rows[part] = d, r
        return np.sqrt(dist, out=dist), rows

    def _search_flat_measured(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """search_exact for many queries: FAISS's flat search ranks, its c best rows are
        measured directly. A row another CPU's rounding could rank among the k nearest ranks
        within twice the rounding of the k-th here; where the c-th is further than that, every
        such row is measured, and the answer does not depend on the kernels. The rare others
        take the product path, which widens its candidates the same way."""
        c = min(max(k, RECHECK_CANDIDATES), self.size)
        assert self.exact_index is not None
        sq, cand = self.exact_index.search(q, c)
        noise = self._rank_noise(q)
        settled = (cand[:, -1] >= 0) & (sq[:, -1] - sq[:, k - 1] > 2.0 * noise)
        if c == self.size:
            settled[:] = True  # a bank this small: every row is a candidate
        dist = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        dist[settled], rows[settled] = self._measure(q[settled], cand[settled], k)
        dist[settled] = np.sqrt(dist[settled])
        others = np.flatnonzero(~settled)
        step = min(RECHECK_PRODUCT_BELOW - 1, RECHECK_CHUNK)  # chunks the product path takes
        for start in range(0, len(others), step):
            pick = others[start : start + step]
            dist[pick], rows[pick] = self.search_exact(q[pick], k)
        return dist, rows

    def _measure(
        self, queries: np.ndarray, cand: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances [n, k], rows [n, k]): the k nearest of each query's candidate
        rows `cand` [n, c], distances summed directly as flat's search reports them; equal
        distances go to the lower row, whatever order the candidates came in."""
        diff = self._bank[cand] - queries[:, None, :]
        sq = np.einsum("ncd,ncd->nc", diff, diff)
        order = np.lexsort((cand, sq), axis=1)[:, :k]
        return np.take_along_axis(sq, order, axis=1), np.take_along_axis(cand, order, axis=1)

    def _rank_noise(self, queries: np.ndarray) -> np.ndarray:
        """A bound of the product's float32 rounding of each query's ranks: the bounds'
        margin over the sum of its terms' sizes, |2 q.y| + ||y||^2 <= ||q||^2 + 2 max ||y||^2."""
        return self._margin * (np.einsum("ij,ij->i", queries, queries) + 2.0 * self._bank_sq_max)

    def search_bounds(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """ivf-exact / hnsw-exact: (bounds [n, k], rows [n, k]) from the approximate search,
            bound_j = sqrt(d_j^2 + margin * (||q||^2 + max_y ||y||^2)) >= flat's d_j
        (d_j: its j-th distance, summed directly to some row; the margin covers flat's
        rounding). The mean of a row's bounds bounds the mean of the k exact nearest, since
        the k rows are distinct bank rows. inf where the search found fewer than k rows."""
        if self.exact_index is None:
            raise ValueError(f"search_bounds needs one of {RECHECKED_KINDS}, this is {self.kind}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sq, idx = self.index.search(q, k)
        slack = self._margin * (np.einsum("ij,ij->i", q, q) + self._bank_sq_max)
        bounds = np.sqrt(np.maximum(sq, 0.0) + slack[:, None].astype(np.float32))
        bounds[idx < 0] = np.inf
        return bounds, idx


def _search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sq, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    # Squared distances can come out slightly negative from the GEMM expansion.
    return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq), idx
