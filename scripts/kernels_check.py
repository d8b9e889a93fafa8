"""Does a bundle score the same whatever CPU kernels run? Stage by stage, on this one machine.

Every library on the scoring path picks its SIMD kernels from what CPUID reports: ONNX Runtime's
MLAS (AVX-512 VNNI, AVX-512, AVX2, SSE), FAISS (dynamic dispatch), OpenCV, NumPy and OpenBLAS.
On a CPU with the `cpuid_fault` flag (Linux, x86-64), an LD_PRELOAD shim makes CPUID trap and
answers it without the features a mode removes, so one machine runs the kernels an older CPU
would. Each mode scores the same images in its own process; the stages are compared with the
native run's:

- prepare: decode + the bundle's resize (OpenCV), uint8 frames;
- features: the ONNX graph on the *native* frames (so a resize difference does not hide in it);
- knn: exact nearest-bank distances of the *native* features (the Scorer's index);
- score: the whole path from the image files: image scores, verdicts, anomaly maps, regions.

    .venv/bin/python scripts/kernels_check.py --bundle B --data MTD [--limit 60] [--json]

Across machines: `--digest` prints a sha256 of each stage of the native run (and of the
regions), to compare with the digests another CPU printed for the same bundle and images.

Modes: native; noamx (no AMX, no AVX512-FP16); avx512 (no VNNI); avx2 (no AVX-512); avx (no
AVX2/FMA); sse4 (no AVX); each below native also without AMX. Without
`cpuid_fault` or a C compiler only FAISS_SIMD_LEVEL=NONE ("faiss-generic") is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* 0 native, 1 no VNNI/BF16, 2 no AVX-512, 3 no AVX2/FMA/F16C, 4 no AVX (SSE4.2 is the top);
   each also without AMX and AVX512-FP16, as is -1: an AVX-512 VNNI CPU without them (AMD Zen 4,
   Intel Ice Lake) on one that has them (Intel Sapphire Rapids and later). */
static int level;

static void on_cpuid(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *r = uc->uc_mcontext.gregs;
    unsigned char *ip = (unsigned char *)r[REG_RIP];
    unsigned a, b, c, d, leaf, sub;
    (void)si;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it kill the process */
        signal(sig, SIG_DFL);
        return;
    }
    leaf = (unsigned)r[REG_RAX];
    sub = (unsigned)r[REG_RCX];
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        d &= ~((1u << 22) | (1u << 23) | (1u << 24) | (1u << 25)); /* AMX-BF16/FP16, TILE, INT8 */
        if (level >= 1) c &= ~(1u << 11);
        if (level >= 2) {
            b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28)
                   | (1u << 30) | (1u << 31));
            c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
            d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
        }
        if (level >= 3) b &= ~((1u << 5) | (1u << 3) | (1u << 8));
    }
    if (leaf == 7 && sub == 1) a &= ~(1u << 21); /* AMX-FP16 */
    if (leaf == 7 && sub == 1 && level >= 1) a &= ~((1u << 4) | (1u << 5));
    if (leaf == 1) {
        if (level >= 3) c &= ~((1u << 12) | (1u << 29));
        if (level >= 4) c &= ~((1u << 28) | (1u << 27));
    }
    if (leaf == 0x80000001u && level >= 3) c &= ~(1u << 16);
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    const char *m = getenv("CPUID_MASK");
    struct sigaction sa;
    if (!m) return;
    if (!strcmp(m, "noamx")) level = -1;
    else if (!strcmp(m, "avx512")) level = 1;
    else if (!strcmp(m, "avx2")) level = 2;
    else if (!strcmp(m, "avx")) level = 3;
    else if (!strcmp(m, "sse4")) level = 4;
    else return;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_cpuid;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
"""

# Mode -> (CPUID_MASK, OpenBLAS core type for that CPU: OPENBLAS_CORETYPE beats CPUID).
CPU_MODES: dict[str, tuple[str | None, str | None]] = {
    "native": (None, None),
    "noamx": ("noamx", None),
    "avx512": ("avx512", None),
    "avx2": ("avx2", "Haswell"),
    "avx": ("avx", "Sandybridge"),
    "sse4": ("sse4", "Nehalem"),
}
FAISS_GENERIC = "faiss-generic"


def cpuid_fault_available() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " cpuid_fault" in flags


def build_shim(directory: Path) -> Path | None:
    """The CPUID-masking library, compiled into `directory`; None without a compiler or
    without the cpuid_fault CPU feature it relies on."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not cpuid_fault_available():
        return None
    src, lib = directory / "cpuid_mask.c", directory / "cpuid_mask.so"
    src.write_text(SHIM_SOURCE)
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def mode_env(mode: str, shim: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if mode == FAISS_GENERIC:
        env["FAISS_SIMD_LEVEL"] = "NONE"
        return env
    mask, coretype = CPU_MODES[mode]
    if mask is not None:
        if shim is None:
            raise RuntimeError(f"mode {mode} needs the CPUID shim")
        env["LD_PRELOAD"] = str(shim)
        env["CPUID_MASK"] = mask
        env.pop("FAISS_SIMD_LEVEL", None)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    return env


# ------------------------------------------------------------------------------ worker


STAGES = ("frames", "features", "knn", "image_scores", "maps")


def worker(args: argparse.Namespace) -> int:
    from edge_agent.ops.threads import quiet_thread_pools

    quiet_thread_pools()
    import numpy as np

    from edge_agent.images import read_image
    from edge_agent.model.bundle import load_bundle
    from edge_agent.model.knn import RECHECK_PRODUCT_BELOW
    from edge_agent.model.scorer import Scorer
    from edge_agent.model.scoring import find_regions

    bundle = load_bundle(args.bundle)
    scorer = Scorer(bundle, device="cpu", threads=args.threads)
    paths = [Path(p) for p in json.loads(args.images.read_text())]
    frames = np.stack([scorer.prepare(read_image(p)) for p in paths])
    ref = np.load(args.ref) if args.ref else None
    ref_frames = frames if ref is None else ref["frames"]
    feats = np.concatenate(
        [scorer.features(ref_frames[i : i + 8]) for i in range(0, len(ref_frames), 8)]
    )
    ref_feats = feats if ref is None else ref["features"]
    flat = ref_feats.reshape(-1, ref_feats.shape[-1])
    # Both ways an exact search goes: a few patches (an image score's re-checks) and many (a
    # whole map's), each in chunks that take that way.
    knn = np.concatenate(
        [
            scorer.index.search_exact(flat[i : i + step], 1)[0][:, 0]
            for step in (RECHECK_PRODUCT_BELOW // 3, 2 * RECHECK_PRODUCT_BELOW)
            for i in range(0, len(flat), step)
            if step < RECHECK_PRODUCT_BELOW or len(flat[i : i + step]) >= RECHECK_PRODUCT_BELOW
        ]
    )
    scores, maps = [], []
    for i in range(0, len(frames), 8):
        result = scorer.score(frames[i : i + 8])
        scores.append(result.image_scores)
        maps += [scorer.exact_map(result, j, peak=False) for j in range(len(result.image_scores))]
    image_scores = np.concatenate(scores)
    amaps = np.stack(maps)
    # Regions at the bundle's pixel threshold; an uncalibrated bundle's at the native run's
    # 99.9th map percentile (the same threshold for every mode).
    pixel = bundle.thresholds.get("pixel")
    if pixel is None:
        pixel = float(np.quantile(amaps if ref is None else ref["maps"], 0.999))
    regions = [[r.as_dict() for r in find_regions(m, pixel)] for m in amaps]
    np.savez(
        args.out,
        frames=frames,
        features=feats,
        knn=knn,
        image_scores=image_scores,
        maps=amaps,
    )
    args.out.with_suffix(".json").write_text(
        json.dumps({"regions": regions, "pixel_threshold": pixel, "device": scorer.device})
    )
    return 0


# ------------------------------------------------------------------------------ driver


def _relative(a, b) -> float:
    import numpy as np

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = max(float(np.abs(a64).max()), 1e-30)
    return float(np.abs(a64 - b64).max() / scale)


def compare(ref: Path, other: Path, image_threshold: float | None) -> dict[str, object]:
    import numpy as np

    a, b = np.load(ref), np.load(other)
    ja, jb = (
        json.loads(ref.with_suffix(".json").read_text()),
        json.loads(other.with_suffix(".json").read_text()),
    )
    out: dict[str, object] = {}
    for key in STAGES:
        x, y = a[key], b[key]
        out[key] = {
            "differ": int(np.count_nonzero(x != y)),
            "of": int(x.size),
            "max_rel": _relative(x, y)
            if x.dtype.kind == "f"
            else float(np.abs(x.astype(np.int64) - y.astype(np.int64)).max()),
        }
    s_a, s_b = a["image_scores"].astype(np.float64), b["image_scores"].astype(np.float64)
    out["score_rel_max"] = float((np.abs(s_a - s_b) / np.maximum(np.abs(s_a), 1e-30)).max())
    # Verdicts at the bundle's image threshold; an uncalibrated bundle's at the native run's
    # median score (half the images NG: every one of them near enough to count).
    bar = float(np.median(s_a)) if image_threshold is None else image_threshold
    out["verdicts_differ"] = int(np.count_nonzero((s_a >= bar) != (s_b >= bar)))
    out["regions_differ"] = sum(
        1 for ra, rb in zip(ja["regions"], jb["regions"], strict=True) if ra != rb
    )
    return out


def digests(run: Path) -> dict[str, str]:
    """sha256 of each stage a worker saved, and of its regions, in a form any CPU can compare."""
    import hashlib

    import numpy as np

    arrays = np.load(run)
    out = {key: hashlib.sha256(arrays[key].tobytes()).hexdigest() for key in STAGES}
    regions = json.loads(run.with_suffix(".json").read_text())["regions"]
    out["regions"] = hashlib.sha256(json.dumps(regions, sort_keys=True).encode()).hexdigest()
    return out


def images_of(data: Path, limit: int | None) -> list[str]:
    from edge_agent.tools.dataset import test_samples

    samples = test_samples(data)
    if limit:
        step = max(1, len(samples) // limit)
        samples = samples[::step][:limit]
    return [str(s.path) for s in samples]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, help="MVTec-layout dataset (its test images are scored)")
    p.add_argument("--limit", type=int, help="score this many test images, spread over the set")
    p.add_argument("--modes", default=",".join([*CPU_MODES, FAISS_GENERIC]))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--digest", action="store_true", help="print the native run's stage digests")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.data is None:
        p.error("--data is required")
    from edge_agent.model.bundle import load_bundle

    threshold = load_bundle(args.bundle).thresholds.get("image")
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shim = build_shim(work)
        if shim is None:
            print("no cpuid_fault or no C compiler: comparing FAISS's generic kernels only")
            modes = [m for m in modes if m in ("native", FAISS_GENERIC)]
        images = work / "images.json"
        images.write_text(json.dumps(images_of(args.data, args.limit)))
        results: dict[str, object] = {}
        ref = work / "native.npz"
        for mode in ["native", *[m for m in modes if m != "native"]]:
            out = work / f"{mode}.npz"
            cmd = [sys.executable, __file__, "--worker", "--bundle", str(args.bundle)]
            cmd += ["--images", str(images), "--out", str(out), "--threads", str(args.threads)]
            if mode != "native":
                cmd += ["--ref", str(ref)]
            subprocess.run(cmd, check=True, env=mode_env(mode, shim), cwd=ROOT)
            if mode == "native" and args.digest:
                results["digests"] = digests(out)
                print("digests", json.dumps(results["digests"]), flush=True)
            if mode != "native":
                results[mode] = compare(ref, out, threshold)
                print(mode, json.dumps(results[mode]), flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
