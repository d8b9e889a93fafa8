"""The same bundle gives the same scores, verdicts and regions on every x86-64 CPU (issue 33).

On one machine: scripts/kernels_check.py scores a real int8 bundle in subprocesses that run the
kernels another CPU would (FAISS's generic SIMD level; with an LD_PRELOAD shim that makes CPUID
report fewer features, ONNX Runtime's, OpenCV's, NumPy's and OpenBLAS's AVX2 and SSE4.2 code
paths) and compares each stage, bit for bit, with the native run. On any CPU: the exported
graph, a small fit and its scores at every stage must hash to what was recorded on one CPU type.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edge_agent.errors import UserError
from edge_agent.export.backbones import Trunk
from edge_agent.export.fit import FitOptions, fit, platform_record
from edge_agent.model.bundle import load_bundle, read_manifest, write_manifest
from edge_agent.model.scorer import session_settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernels_check.py"
STAGES = ("frames", "features", "knn", "image_scores", "maps")
IMAGES = 24  # of mtd_small's 50 test images, spread over good and every defect type


@pytest.fixture(scope="module")
def int8_small(mtd_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle at the default precision (int8) and image score (smoothed), small."""
    out = tmp_path_factory.mktemp("bundles") / "int8_small"
    opts = FitOptions(
        backbone="efficientnet_lite0",
        image_size=(160, 160),
        coreset=0.05,
        precision="int8",
        progress=False,
    )
    fit(mtd_small, out, opts)
    return out


def _kernels_check(
    bundle: Path, data: Path, modes: str, *more: str
) -> dict[str, dict[str, object]]:
    args = ["--bundle", str(bundle), "--data", str(data), "--limit", str(IMAGES), *more]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--modes", modes, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _kernels_check_module() -> types.ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import kernels_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return kernels_check


def _shim(directory: Path) -> Path:
    """The CPUID shim, built in `directory`; the test skips where it cannot be."""
    kernels_check = _kernels_check_module()
    if not kernels_check.cpuid_fault_available():
        pytest.skip("this CPU cannot make CPUID trap (no cpuid_fault flag): no kernels to fake")
    shim = kernels_check.build_shim(directory)
    if shim is None:
        pytest.skip("no C compiler (cc or gcc) to build the CPUID shim")
    return shim


def _digest_in_mode(snippet: str, path: Path, mode: str, shim: Path) -> str:
    """Run a snippet that prints a digest of `path`'s work, with `mode`'s kernels."""
    proc = subprocess.run(
        [sys.executable, "-c", snippet, str(path)],
        capture_output=True,
        text=True,
        env=_kernels_check_module().mode_env(mode, shim),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


def _assert_identical(result: dict[str, object]) -> None:
    for stage in STAGES:
        assert result[stage]["differ"] == 0, (stage, result)  # type: ignore[index]
    assert result["verdicts_differ"] == 0, result
    assert result["regions_differ"] == 0, result


def test_faiss_generic_kernels_score_the_same(int8_small: Path, mtd_small: Path) -> None:
    """FAISS's generic SIMD level against the one it picks here: whole maps re-check every
    patch with flat search, whose GEMM expansion rounds by the CPU's kernels; the distances
    must come out of the same sum either way. Runs on any CPU."""
    result = _kernels_check(int8_small, mtd_small, "native,faiss-generic")
    _assert_identical(result["faiss-generic"])


def test_older_cpu_kernels_score_the_same(
    int8_small: Path, mtd_small: Path, tmp_path: Path
) -> None:
    """An AVX2 CPU and an SSE4.2-only one (a Celeron J-class edge box) against this one: the
    int8 graph's features, the kNN distances, OpenCV's maps and smoothed image scores must be
    the same bits, so verdicts and regions cannot move (the layout pass, OpenCV's kernels; the
    residual adds have their own test, as this small bundle's do not round near a tie)."""
    _shim(tmp_path)  # kernels_check builds its own; this says why it cannot here
    result = _kernels_check(int8_small, mtd_small, "native,avx2,sse4")
    _assert_identical(result["avx2"])
    _assert_identical(result["sse4"])


_QUANTIZED_ADD_SNIPPET = """
import hashlib, sys
import numpy as np, onnxruntime as ort
from edge_agent.model.scorer import session_settings
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"],
                            **session_settings("int8", 1))
i = np.arange(256, dtype=np.uint8)  # every pair of 8-bit inputs
a, b = np.repeat(i[:, None], 256, 1), np.repeat(i[None, :], 256, 0)
print(hashlib.sha256(sess.run(None, {"a": a, "b": b})[0].tobytes()).hexdigest())
"""


def _quantized_add(path: Path) -> None:
    """DequantizeLinear x 2 -> Add -> QuantizeLinear, as the quantizer writes a residual add,
    with the scales and zero points of real activations (uneven: rounding ties can happen)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    params = {"sa": 0.0371, "za": 131, "sb": 0.0213, "zb": 117, "sc": 0.0452, "zc": 124}
    inits = [
        numpy_helper.from_array(np.array(v, np.float32 if k[0] == "s" else np.uint8), k)
        for k, v in params.items()
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [256, 256]) for n in "aby"]
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
        helper.make_node("Add", ["fa", "fb"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "residual_add", io[:2], io[2:], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_int8_residual_adds_are_the_same_bits_without_avx2(tmp_path: Path) -> None:
    """ONNX Runtime fuses a quantized add into QLinearAdd, fixed-point with AVX2 and float
    without: on an SSE4.2-only CPU 2 of these 65,536 sums round the other way, and on the
    default MTD bundle 17% of the features moved (BENCHMARKS.md). fit writes the add as a Sum,
    which nothing fuses: every CPU computes the same integers."""
    import onnx
    import onnxruntime as ort

    from edge_agent.export.quantize import float_residual_adds

    shim = _shim(tmp_path)
    graph = tmp_path / "add.onnx"
    _quantized_add(graph)
    model = onnx.load(str(graph))
    assert float_residual_adds(model) == 1
    onnx.save(model, str(graph))
    settings = session_settings("int8", 1)
    settings["sess_options"].optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"], **settings)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearAdd" not in ops and "Sum" in ops, ops
    digests = {
        m: _digest_in_mode(_QUANTIZED_ADD_SNIPPET, graph, m, shim)
        for m in ("native", "avx2", "sse4")
    }
    assert digests["avx2"] == digests["native"] and digests["sse4"] == digests["native"], digests


def test_int8_sessions_leave_out_the_cpu_dependent_layout_pass() -> None:
    assert session_settings("int8", 2)["disabled_optimizers"] == ["NchwcTransformer"]
    # float32 keeps it: 2.5-3x its ONNX time without it, and no CPU-independence to gain
    # on CPUs without FMA anyway.
    assert session_settings("float32", None)["disabled_optimizers"] == []
    opts = session_settings("int8", 3)["sess_options"]
    assert opts.intra_op_num_threads == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_fit_records_what_computed_the_bank(int8_small: Path, tmp_path: Path) -> None:
    platform = load_bundle(int8_small).manifest["platform"]
    assert platform == json.loads(json.dumps(platform_record()))  # this machine, as fit saw it
    assert platform["cpu_model"]
    assert {"onnxruntime", "faiss", "numpy", "opencv", "torch"} <= set(platform["libraries"])
    flags = Path("/proc/cpuinfo").read_text(errors="replace")
    if " avx2" in flags:
        assert "avx2" in platform["cpu_simd"]
    # Bundles fitted before the record existed still load.
    old = tmp_path / "old"
    shutil.copytree(int8_small, old)
    manifest = read_manifest(old)
    del manifest["platform"]
    write_manifest(old, manifest)
    assert "platform" not in load_bundle(old).manifest
    # A record of the wrong shape is damage, refused like any other.
    manifest["platform"] = {"cpu_simd": "avx2"}
    write_manifest(old, manifest)
    with pytest.raises(UserError, match="platform"):
        load_bundle(old)


def test_exact_search_sums_the_same_way_for_few_and_many_queries() -> None:
    """A whole map's re-check (FAISS ranks) and an image score's (a product ranks) measure
    their candidates with the same sum: the same bits whatever the query count, the nearest
    row even where two rows are closer than the ranking's rounding (near-equal pairs of rows
    of norm ~1e3, as in test_recheck), equal distances to the lower row."""
    import numpy as np

    from edge_agent.model.knn import RECHECK_PRODUCT_BELOW, MemoryBankIndex

    rng = np.random.default_rng(8)
    centre = rng.standard_normal(16).astype(np.float32) * 250.0
    base = centre + rng.standard_normal((200, 16)).astype(np.float32)
    near = base + rng.standard_normal((200, 16)).astype(np.float32) * 3e-3
    bank = np.concatenate([base, near, base[:5]])  # rows 400-404 repeat rows 0-4
    queries = base[rng.integers(0, 200, 2000)] + rng.standard_normal((2000, 16)).astype(np.float32)
    queries[:5] = base[:5]  # exactly on a repeated row: distance 0 twice
    index = MemoryBankIndex(bank, kind="hnsw-exact", device="cpu")
    many_d, many_r = index.search_exact(queries, 1)
    assert len(queries) >= RECHECK_PRODUCT_BELOW
    step = RECHECK_PRODUCT_BELOW // 3
    few = [index.search_exact(queries[i : i + step], 1) for i in range(0, len(queries), step)]
    np.testing.assert_array_equal(many_d, np.concatenate([d for d, _ in few]))
    np.testing.assert_array_equal(many_r, np.concatenate([r for _, r in few]))
    true = ((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(many_r[:, 0], true.argmin(axis=1))  # lowest row on ties
    assert (many_r[:5, 0] == np.arange(5)).all() and (many_d[:5, 0] == 0).all()


def test_cpu_model_and_simd_flags_from_cpuinfo(tmp_path: Path) -> None:
    from edge_agent.ops.threads import cpu_flags, cpu_model, simd_flags

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Celeron(R) J4125 CPU @ 2.00GHz\n"
        "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt aes rdrand\n"
        "processor\t: 1\nmodel name\t: other\n"
    )
    assert cpu_model(str(info)) == "Intel(R) Celeron(R) J4125 CPU @ 2.00GHz"
    assert simd_flags(cpu_flags(str(info))) == ["sse4_1", "sse4_2"]
    assert simd_flags(frozenset({"avx512_vnni", "avx2", "fma", "avx"})) == [
        "avx",
        "fma",
        "avx2",
        "avx512_vnni",
    ]
    assert cpu_model(str(tmp_path / "absent")) is None


_EXPORT_SNIPPET = """
import hashlib, sys
from pathlib import Path
import onnx
from onnx import numpy_helper
from edge_agent.export.backbones import DEFAULT_LAYERS, load_trunk
from edge_agent.export.extractor import PatchFeatureExtractor
from edge_agent.export.onnx_export import export_onnx
trunk = load_trunk("efficientnet_lite0")
layers = list(DEFAULT_LAYERS["efficientnet_lite0"])
extractor = PatchFeatureExtractor(trunk, layers, patch_size=3, projection="none").eval()
export_onnx(extractor, Path(sys.argv[1]), 160, 160)
digest = hashlib.sha256()
for t in onnx.load(sys.argv[1]).graph.initializer:
    digest.update(t.name.encode() + numpy_helper.to_array(t).tobytes())
print(digest.hexdigest())
"""


def test_the_exported_graph_is_the_same_bits_on_avx2_kernels(tmp_path: Path) -> None:
    """The fit's float graph, exported natively and with AVX2 kernels (the CPUID shim): the
    same weights to the bit. The exporter's own batch-norm folding ran through MKL, whose
    AVX-512 and AVX2 kernels rounded 38 of Lite2's weights an ulp apart on an Intel Xeon, and
    with them the int8 scales and the bank (issue 33); load_trunk now folds them in float64."""
    shim = _shim(tmp_path)
    digests = {
        m: _digest_in_mode(_EXPORT_SNIPPET, tmp_path / f"{m}.onnx", m, shim)
        for m in ("native", "avx2")
    }
    assert digests["native"] == digests["avx2"]


def _unfolded_trunk(name: str, tmp_path: Path) -> Trunk:
    """The backbone as built before fold_batch_norms: Lite with its packaged ImageNet weights,
    a ResNet (no weights can be downloaded here) from random ones, its norms' statistics and
    affine terms random too, so that folding them is not the identity."""
    import torch
    import torchvision

    from edge_agent.export import backbones

    if name.startswith("efficientnet"):
        return backbones._efficientnet_lite(name, None)
    model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    return backbones._torchvision_resnet(name, tmp_path / "weights.pth")


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "efficientnet_lite2", "resnet18", "wide_resnet50_2"]
)
def test_folded_batch_norms_compute_what_the_norms_did(name: str, tmp_path: Path) -> None:
    """Every backbone's blocks register each norm right after the convolution it follows (the
    fold's assumption): the folded stages compute what the norms did, and none is left."""
    import copy

    import torch

    from edge_agent.export import backbones

    trunk = _unfolded_trunk(name, tmp_path)
    reference = copy.deepcopy(trunk.stages).eval()
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    assert backbones.fold_batch_norms(trunk.stages) == n_norms >= 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.stages.modules())
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = x, x
        for before, after in zip(reference, trunk.stages.eval(), strict=True):
            want, got = before(want), after(got)
            assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())
    if name.startswith("efficientnet"):  # load_trunk folds (ResNets would need a download)
        stages = backbones.load_trunk(name).stages
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stages.modules())


# What the same inputs must give on every CPU, recorded with these library versions (pinned by
# scripts/setup.sh's environment: a new release may change a graph or a quantizer, not a CPU).
# Recorded on an AMD EPYC (Zen 3, AVX2, no AVX-512), model.onnx again on an AMD EPYC (Zen 5,
# AVX-512) with the residual adds as Sums, checked there with AVX2 and AVX-512-without-VNNI
# kernels too; the default fit's bank.npy and model.onnx came out byte for byte the same on
# an Intel Xeon with AVX-512 and AMX and on both EPYCs (BENCHMARKS).
RECORDED_VERSIONS = {
    "torch": "2.14.1",
    "onnx": "1.23.2",
    "onnxruntime": "1.32.0",
    "numpy": "2.4.6",
    "faiss-cpu": "1.15.1",
    "opencv-python-headless": "5.1.0.95",
}
RECORDED_DIGESTS = {
    "lite0_export": "b4f698dbbe311fc2a65c9a68d9e2d9914648b5ec04c4fcb9a75c1a369c100451",
    "int8_small/bank.npy": "8ef83e718f546b989ebcaed76b1dfad2d237196468ea58e623b736d8592bedb6",
    "int8_small/model.onnx": "acb323ee85ed0931025e8d47128f0875c00ed40709ed1dd2564ee1cf442b55ef",
    # kernels_check --digest of int8_small on IMAGES of mtd_small's test images, 2 threads
    "frames": "b4acf9b0431b27136e85bdc24cb0b29dbe0096d4638eb156c91e0da6dfd41912",
    "features": "51ebad45d3e89c664b0716e0bd7fdb8b333560ca639eea57b26a5180e99e858d",
    "knn": "254c31e852c20fa6506f7435713a46443494e1f9a023cd5f8ae3e1411ab2d315",
    "image_scores": "40281fae49946e1e1ca5916eae78e4706b970a8a48eb2b32ce9b53b803674de1",
    "maps": "6a2a1977dfa4d4ccbea4d42b644adac9331145e45df2753d247502474317f66f",
    "regions": "8763b2b19d3411c0a40305d84603d18de72efd977f7cac521d3af2ca6605d025",
}


def _require_recorded_versions() -> None:
    from importlib.metadata import version

    here = {name: version(name).split("+")[0] for name in RECORDED_VERSIONS}
    if here != RECORDED_VERSIONS:
        pytest.skip(f"digests recorded with {RECORDED_VERSIONS}, here {here}: record them anew")


def _require_fma() -> None:
    """The fit's int8 scales come from the float graph's activations, whose convolutions
    round otherwise without FMA: a CPU without it fits another (as good) bundle, which it
    then scores as every other CPU would (BENCHMARKS.md)."""
    if " fma" not in Path("/proc/cpuinfo").read_text(errors="replace"):
        pytest.skip("without FMA the fit calibrates on other float roundings: another bundle")


def test_the_exported_graph_is_the_recorded_bits_on_this_cpu(tmp_path: Path) -> None:
    """Any CPU, no shim needed: the float graph exported here has the weights recorded on an
    AVX2-only EPYC. Fails with the float64 fold left out (the exporter's MKL fold)."""
    _require_recorded_versions()
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_SNIPPET, str(tmp_path / "lite0.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == RECORDED_DIGESTS["lite0_export"]


def test_the_fit_is_the_recorded_bundle_on_this_cpu(int8_small: Path) -> None:
    """The whole fit (features, int8 quantizer's calibration, coreset) on this CPU gives the
    bank and graph recorded on an AVX2-only EPYC, byte for byte."""
    import hashlib

    _require_recorded_versions()
    _require_fma()
    for name in ("bank.npy", "model.onnx"):
        got = hashlib.sha256((int8_small / name).read_bytes()).hexdigest()
        assert got == RECORDED_DIGESTS[f"int8_small/{name}"], name


def test_the_bundle_scores_the_recorded_bits_on_this_cpu(int8_small: Path, mtd_small: Path) -> None:
    """The same bundle on the same images, on any CPU (every stage: the
    resized frames, the int8 graph's features, exact kNN distances, image scores, whole maps,
    regions) gives the bits recorded on an AVX2-only EPYC; kernels_check compares kernel sets
    on one machine where CPUID can be faked, this compares machines."""
    _require_recorded_versions()
    _require_fma()  # the bundle is fitted here
    got = _kernels_check(int8_small, mtd_small, "native", "--digest")["digests"]
    assert got == {key: RECORDED_DIGESTS[key] for key in (*STAGES, "regions")}
