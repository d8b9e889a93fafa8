"""Nearest-neighbour search over the memory bank with FAISS: exact flat L2 (GPU when there is
one), or an approximate index for slow CPU boxes:

- ivf: the bank split into ~sqrt(M) k-means cells (trained on the bank itself at load, fixed
  seed, so deterministic); a query scans only its `nprobe` nearest cells. Exact search here
  is bound by the queries x bank distance matrix, so scanning a few cells is what pays;
- hnsw: a proximity graph; fast for single queries, slower than batched flat search at the
  bank sizes PatchCore uses.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_INDEX = "flat"
DEFAULT_NPROBE = 8


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


class MemoryBankIndex:
    """k-NN over the bank; returns Euclidean (not squared) distances."""

    def __init__(
        self,
        bank: np.ndarray,
        *,
        kind: str = DEFAULT_INDEX,
        device: str = "auto",
        hnsw_m: int = 32,
        hnsw_ef_search: int = 64,
        ivf_nprobe: int = DEFAULT_NPROBE,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        dim = bank.shape[1]
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m)
            index.hnsw.efConstruction = 2 * hnsw_m
            index.add(bank)
            index.hnsw.efSearch = hnsw_ef_search
        elif kind == "ivf":
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

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        sq, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        # Squared distances can come out slightly negative from the GEMM expansion.
        return np.sqrt(np.maximum(sq, 0.0, out=sq), out=sq), idx
