"""engines.build: against the real TensorRT-RTX binding where it is installed (CI), and against the fake
TensorRT for what needs a GPU (enterprise TensorRT's builder and its timing cache)."""

import sys
import types
from dataclasses import replace

import onnx
import pytest
from onnx import TensorProto, helper

from common.engine_manifest import check_engines_usable, engines_dir, read_engine_manifest
from common.errors import ArtifactsError, UsageError
from common.manifest import sha256_file
from common.specs import TensorSpec
from common.tensorrt_env import Platform, module_status, trt_status
from engines.build import BuildConfig, PlanInputs, build_engines, parse_compute_capabilities
from engines.trt_build import EngineBuildError, TrtApi, configure
from tests.fake_trt import TIMING_CACHE_HEADER, BuilderFlag, FakeTrt, IBuilderConfig
from tests.support import artifacts_manifest, assert_one_line_error, component_record, run_cli

PLATFORM = Platform("tensorrt", "10.15.1.29", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")
RTX_DEFAULT = Platform(
    "rtx", "1.7.1.116", compute_capabilities=("8.0", "8.6", "8.9", "12.0", "12.1"),
    compute_capabilities_from="TensorRT-RTX default",
)  # fmt: skip
INPUTS = (TensorSpec("x", (1, 4), "float32"),)
OUTPUTS = (TensorSpec("y", (1, 4), "float32"),)
HAS_RTX, RTX_REASON = module_status("rtx")


@pytest.fixture(scope="module")
def rtx():
    if not HAS_RTX:
        pytest.skip(f"needs tensorrt_rtx (pip install tensorrt-rtx, in the dev extra): {RTX_REASON}")
    import tensorrt_rtx

    return tensorrt_rtx


def _artifacts(folder, components=("text_encoder", "vae"), dims=(1, 4), precision="fp32"):
    folder.mkdir(parents=True)
    entries = {}
    for index, name in enumerate(components):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"], name=f"relu{index}")],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(folder / f"{name}.onnx"))
        digest = {f"{name}.onnx": sha256_file(folder / f"{name}.onnx")}
        entries[name] = component_record(name, digest, INPUTS, OUTPUTS, precision)
    return folder, artifacts_manifest(entries, precision, folder)


def _parsed(trt, target, folder):
    api = TrtApi(trt, target)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = api.create_network(builder)
    assert trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING)).parse_from_file(str(folder / "vae.onnx"))
    return api, builder, network


# -- the real TensorRT-RTX binding ------------------------------------------------------------------


def test_real_rtx_network_is_strongly_typed_and_configured(rtx, tmp_path):
    folder, _ = _artifacts(tmp_path / "a")
    api, builder, network = _parsed(rtx, "rtx", folder)
    assert network.get_flag(rtx.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    config = builder.create_builder_config()
    assert config.get_flag(rtx.BuilderFlag.TF32)  # on unless cleared
    build = BuildConfig(opt_level=5, workspace_gib=2, compute_capabilities=("8.9", "12.0"))
    configure(api, builder, network, config, build, INPUTS, folder / "vae.onnx")
    assert config.builder_optimization_level == 5
    assert config.get_memory_pool_limit(rtx.MemoryPoolType.WORKSPACE) == 2 * 2**30
    assert not config.get_flag(rtx.BuilderFlag.TF32)  # fp32 math stays fp32
    assert config.num_compute_capabilities == 2
    assert [config.get_compute_capability(i) for i in range(2)] == [
        rtx.ComputeCapability.SM89,
        rtx.ComputeCapability.SM120,
    ]
    for removed in ("FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        assert not hasattr(rtx.BuilderFlag, removed)  # precision is the graph's: no flag could set it
    stripped = builder.create_builder_config()
    configure(api, builder, network, stripped, replace(build, strip_weights=True), INPUTS, folder / "vae.onnx")
    assert stripped.get_flag(rtx.BuilderFlag.STRIP_PLAN) and stripped.get_flag(rtx.BuilderFlag.REFIT)


def test_real_rtx_build_records_manifest_and_reuses_until_an_input_changes(rtx, tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    logs = []
    built = build_engines(artifacts=folder, target="rtx", trt=rtx, log=logs.append)
    on_disk = read_engine_manifest(folder, "rtx")
    assert on_disk == built and on_disk.target == "rtx"
    for name in ("text_encoder", "vae"):
        entry = on_disk.engines[name]
        plan = engines_dir(folder, "rtx") / entry.plan
        assert entry.platform == replace(RTX_DEFAULT, tensorrt=rtx.__version__)
        assert entry.onnx_sha256 == manifest.components[name].sha256
        assert entry.plan_sha256 == sha256_file(plan) and entry.plan_bytes == plan.stat().st_size > 0
    assert any("    Building engine" in line for line in logs)  # the progress monitor was called back

    def builds(**kwargs):
        logs.clear()
        build_engines(artifacts=folder, target="rtx", trt=rtx, log=logs.append, **kwargs)
        return [line for line in logs if ": building (" in line]

    assert builds() == []  # same inputs: nothing is built
    rebuilt = builds(build=BuildConfig(opt_level=1))
    assert len(rebuilt) == 2 and all("(flags changed)" in line for line in rebuilt)
    rebuilt = builds(build=BuildConfig(opt_level=1, compute_capabilities=("8.9",)))
    assert len(rebuilt) == 2 and all("(platform changed)" in line for line in rebuilt)
    builds()
    plan = engines_dir(folder, "rtx") / "vae.plan"
    plan.write_bytes(b"x" * plan.stat().st_size)
    assert [line.split(":")[0] for line in builds()] == ["[2/2] vae"]
    assert len(builds(force=True)) == 2
    assert sorted(p.name for p in engines_dir(folder, "rtx").iterdir()) == [
        "manifest.json",
        "text_encoder.plan",
        "vae.plan",
    ]


def test_rtx_garbage_timing_cache_is_discarded_in_one_line_and_the_build_goes_on(rtx, tmp_path):
    folder, _ = _artifacts(tmp_path / "a")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00garbage, not a timing cache")
    result = run_cli("-m", "engines.build", "--artifacts", str(folder), "--target", "rtx", "--timing-cache", str(cache))
    assert result.returncode == 0, result.stderr
    discarded = [line for line in result.stdout.splitlines() if "discarded" in line]
    assert len(discarded) == 1 and str(cache) in discarded[0]
    engines = read_engine_manifest(folder, "rtx").engines
    assert set(engines) == {"text_encoder", "vae"}
    assert all(e.timing_cache == {"file": str(cache), "used": False} and e.plan_bytes > 0 for e in engines.values())
    assert cache.read_bytes() == b"\x00garbage, not a timing cache"  # not ours to overwrite


def test_dynamic_input_refused_at_build_time_naming_it(rtx, tmp_path):
    folder, _ = _artifacts(tmp_path / "a", components=("vae",), dims=("batch", 4))
    result = run_cli("-m", "engines.build", "--artifacts", str(folder), "--target", "rtx")
    assert_one_line_error(result, "input 'x' has a dynamic shape (-1, 4)", "vae.onnx", "re-export")
    assert not (engines_dir(folder, "rtx") / "vae.plan").exists()


def test_parse_failure_names_the_node_and_keeps_finished_engines(rtx, tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    build_engines(artifacts=folder, target="rtx", trt=rtx, log=lambda m: None)
    model = onnx.load(str(folder / "vae.onnx"))
    model.graph.node[0].op_type, model.graph.node[0].name = "Unique", "unique_node"
    onnx.save(model, str(folder / "vae.onnx"))
    vae = replace(manifest.components["vae"], sha256={"vae.onnx": sha256_file(folder / "vae.onnx")})
    artifacts_manifest({**manifest.components, "vae": vae}, folder=folder)
    with pytest.raises(
        EngineBuildError, match="could not parse .*vae.onnx: In node 0 with name: unique_node and operator: Unique"
    ):
        build_engines(artifacts=folder, target="rtx", trt=rtx, log=lambda m: None)
    assert set(read_engine_manifest(folder, "rtx").engines) == {"text_encoder", "vae"}  # the previous plans stand
    assert not [p for p in engines_dir(folder, "rtx").iterdir() if p.name.startswith(".")]  # no temporary left


def test_cli_make_engines_builds_rtx_on_a_machine_without_a_gpu(export_tiny):
    out = export_tiny("fp32")
    build = run_cli("-m", "engines.build", "--artifacts", str(out))
    assert build.returncode == 0, build.stderr
    lines = [line for line in (build.stdout + build.stderr).splitlines() if line.strip()]
    if not HAS_RTX:
        assert len(lines) == 1 and lines[0].startswith("engine building skipped: TensorRT is not installed")
        assert not engines_dir(out, "rtx").exists()
        return
    assert "data-center (Hopper) engines need TensorRT on the node" in lines[0]
    engines = read_engine_manifest(out, "rtx").engines
    assert set(engines) == {"text_encoder", "transformer", "vae"}
    assert all((engines_dir(out, "rtx") / e.plan).stat().st_size == e.plan_bytes > 0 for e in engines.values())


# -- options, keys and refusals (no TensorRT needed) ------------------------------------------------


def test_compute_capability_option():
    assert parse_compute_capabilities("89,120") == ("8.9", "12.0")
    assert parse_compute_capabilities("8.6, 121,86") == ("8.6", "12.1")
    with pytest.raises(UsageError, match=r"9.0 \(Hopper, H100/H200\) is no TensorRT-RTX target.*--target tensorrt"):
        parse_compute_capabilities("90")
    with pytest.raises(UsageError, match="--compute-capability 70 is not a TensorRT-RTX target; choose from 75, 80"):
        parse_compute_capabilities("70")


def test_fp8_below_sm89_refused_naming_both(tmp_path):
    folder, _ = _artifacts(tmp_path / "a", precision="fp8")
    with pytest.raises(
        UsageError, match=r"--compute-capability 80,86 cannot run fp8 engines \(FP8 needs compute capability 8.9"
    ):
        build_engines(
            artifacts=folder, target="rtx", trt=FakeTrt(), build=BuildConfig(compute_capabilities=("8.0", "8.6", "8.9"))
        )
    with pytest.raises(UsageError, match="--compute-capability applies to --target rtx"):
        build_engines(
            artifacts=folder, target="tensorrt", trt=FakeTrt(), build=BuildConfig(compute_capabilities=("8.9",))
        )
    assert not engines_dir(folder, "rtx").exists()


def test_build_config_rejects_bad_values():
    with pytest.raises(UsageError, match="0..5"):
        BuildConfig(opt_level=6)
    with pytest.raises(UsageError, match="must be positive"):
        BuildConfig(workspace_gib=0)


def test_every_key_input_changes_the_key():
    rtx_platform = replace(RTX_DEFAULT, compute_capabilities=("8.9",))
    base = PlanInputs(
        "transformer", {"transformer.onnx": "a", "transformer.onnx.data": "b"}, PLATFORM, BuildConfig().flags()
    )
    variants = [
        {"component": "vae"},
        {"onnx_sha256": {"transformer.onnx": "a", "transformer.onnx.data": "c"}},
        {"platform": replace(PLATFORM, tensorrt="10.16.0")},
        {"platform": replace(PLATFORM, gpu="NVIDIA H200")},
        {"platform": replace(PLATFORM, compute_capability="10.0")},
        {"platform": rtx_platform},
        {"platform": replace(rtx_platform, compute_capabilities=("8.9", "12.0"))},
        {"platform": replace(rtx_platform, tensorrt="1.8.0")},
        {"flags": replace(BuildConfig(), opt_level=4).flags()},
        {"flags": replace(BuildConfig(), workspace_gib=8).flags()},
        {"flags": replace(BuildConfig(), tf32=True).flags()},
        {"flags": replace(BuildConfig(), strip_weights=True).flags()},
    ]
    keys = {base.key} | {replace(base, **v).key for v in variants}
    assert len(keys) == 1 + len(variants)
    assert base.key == replace(base).key  # and it is deterministic
    # The key is over the platform's JSON: plans built before the manifests were typed are still reused.
    # This is the key the dict-based engine_key of 2b9880b computed for the same inputs.
    assert base.key == "76ff4871c5a32ccb56a5fbb54f15287420a2d762ae6957482a1ab8cf3de74aa4"


def test_engines_refused_for_another_gpu_tensorrt_or_onnx(tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    engines = build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    cases = [
        (
            replace(PLATFORM, tensorrt="10.16.0"),
            manifest,
            "built with TensorRT 10.15.1.29, this node has TensorRT 10.16.0",
        ),
        (
            replace(PLATFORM, gpu="NVIDIA H200"),
            manifest,
            "built for NVIDIA H100 80GB HBM3 .* this node has NVIDIA H200",
        ),
        (replace(PLATFORM, compute_capability="10.0"), manifest, r"compute capability 9.0\), this node .*10.0"),
    ]
    stale_vae = replace(manifest.components["vae"], sha256={"vae.onnx": "0" * 64})
    stale = replace(manifest, components={**manifest.components, "vae": stale_vae})
    cases.append((PLATFORM, stale, "built from other vae ONNX files"))
    # A graph with no plan (engines are looked up by the graph's file, as a --resolutions view names them).
    unbuilt = replace(manifest.components["vae"], file="transformer.onnx")
    more = replace(manifest, components={**manifest.components, "transformer": unbuilt})
    cases.append((PLATFORM, more, "has no engine for transformer"))
    for present, expected_from, message in cases:
        with pytest.raises(ArtifactsError, match=message):
            check_engines_usable(engines, expected_from, present, folder)


def test_rtx_engines_refused_on_a_gpu_they_were_not_built_for(tmp_path):
    folder, manifest = _artifacts(tmp_path / "a", precision="fp8")
    engines = build_engines(artifacts=folder, target="rtx", trt=FakeTrt(), platform=RTX_DEFAULT, log=lambda m: None)

    def present(gpu, capability, tensorrt="1.7.1.116"):
        return Platform("rtx", tensorrt, gpu=gpu, compute_capability=capability)

    check_engines_usable(engines, manifest, present("NVIDIA RTX 4090", "8.9"), folder)
    with pytest.raises(ArtifactsError, match=r"TensorRT-RTX fp8 engine for compute capability 8.9, 12.0, 12.1; this node's "
                       r"NVIDIA H100 .* is 9.0: Hopper is no TensorRT-RTX target: build with `python -m engines.build "
                       r".*--target tensorrt` on this node"):  # fmt: skip
        check_engines_usable(engines, manifest, present("NVIDIA H100 80GB HBM3", "9.0"), folder)
    with pytest.raises(
        ArtifactsError, match=r"this node's NVIDIA RTX 3090 is 8.6: rebuild with .*--compute-capability 86"
    ):
        check_engines_usable(engines, manifest, present("NVIDIA RTX 3090", "8.6"), folder)
    with pytest.raises(ArtifactsError, match="built with TensorRT-RTX 1.7.1.116, this node has TensorRT-RTX 1.8.0"):
        check_engines_usable(engines, manifest, present("G", "8.9", tensorrt="1.8.0"), folder)


# -- enterprise TensorRT's builder (needs a GPU): the fake ------------------------------------------


def _calls(trt, name):
    return [c for c in trt.calls if c[0] == name]


def test_tensorrt_target_flags_and_timing_cache_reused(tmp_path):
    folder, _ = _artifacts(tmp_path / "a")
    trt, cache = FakeTrt(), tmp_path / "timing.cache"
    build = BuildConfig(opt_level=5, workspace_gib=2, strip_weights=True)
    build_engines(
        artifacts=folder,
        target="tensorrt",
        trt=trt,
        platform=PLATFORM,
        build=build,
        timing_cache=cache,
        log=lambda m: None,
    )
    assert ("create_network", 1 << 1) in trt.calls  # 1 << STRONGLY_TYPED, which is 1 in TensorRT 10.x
    assert (
        _calls(trt, "set_flag") == [("set_flag", BuilderFlag.STRIP_PLAN), ("set_flag", BuilderFlag.REFIT_IDENTICAL)] * 2
    )
    assert ("clear_flag", BuilderFlag.TF32) in trt.calls and ("builder_optimization_level", 5) in trt.calls
    assert cache.read_bytes() == TIMING_CACHE_HEADER + b"+timed+timed"  # created, extended by each build, saved
    entry = read_engine_manifest(folder, "tensorrt").engines["vae"]
    assert entry.timing_cache == {"file": str(cache), "used": True} and entry.strip_weights is True


def test_tensorrt_mismatched_timing_cache_discarded_and_nothing_fails_after_a_plan(tmp_path, monkeypatch):
    folder, _ = _artifacts(tmp_path / "a")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    logs = []
    build_engines(
        artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=PLATFORM, timing_cache=cache, log=logs.append
    )
    assert len([line for line in logs if "discarded" in line]) == 1
    assert cache.read_bytes() == TIMING_CACHE_HEADER + b"+timed+timed"  # a fresh cache, written back
    assert read_engine_manifest(folder, "tensorrt").engines["vae"].timing_cache["discarded"] is True
    # get_timing_cache() answering None (as TensorRT-RTX's does) after a build: the plans are still recorded.
    monkeypatch.setattr(IBuilderConfig, "get_timing_cache", lambda self: None)
    build_engines(
        artifacts=folder,
        target="tensorrt",
        trt=FakeTrt(),
        platform=PLATFORM,
        timing_cache=cache,
        force=True,
        log=logs.append,
    )
    assert set(read_engine_manifest(folder, "tensorrt").engines) == {"text_encoder", "vae"}


def test_tensorrt_build_failure_keeps_finished_engines(tmp_path):
    folder, _ = _artifacts(tmp_path / "a")
    with pytest.raises(EngineBuildError, match="could not parse .*text_encoder.onnx: In node 0 with name: relu0"):
        build_engines(
            artifacts=folder, target="tensorrt", trt=FakeTrt(fail_parse=True), platform=PLATFORM, log=lambda m: None
        )
    assert not (engines_dir(folder, "tensorrt") / "manifest.json").exists()
    build_engines(artifacts=folder, target="tensorrt", trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    with pytest.raises(EngineBuildError, match="failed to build an engine"):
        build_engines(
            artifacts=folder,
            target="tensorrt",
            trt=FakeTrt(fail_build=True),
            platform=PLATFORM,
            force=True,
            log=lambda m: None,
        )
    assert set(read_engine_manifest(folder, "tensorrt").engines) == {"text_encoder", "vae"}
    assert not [p for p in engines_dir(folder, "tensorrt").iterdir() if p.name.startswith(".")]


def test_trt_status_never_raises(monkeypatch):
    available, reason = trt_status()
    if "tensorrt" not in sys.modules:  # this workplace: TensorRT cannot be installed
        assert available is False and reason.startswith("TensorRT is not installed")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert trt_status()[0] is False
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.15.1"))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trt_status() == (False, "TensorRT 10.15.1 is installed but torch sees no CUDA GPU")


def test_rtx_weight_stripped_plans_refused_without_a_gpu(rtx, tmp_path):
    """TensorRT-RTX 1.7.1 builds REFIT/STRIP_PLAN plans only with a GPU (measured: a Myelin CUDA check fails)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the weight-stripped build is possible here")
    folder, _ = _artifacts(tmp_path / "a")
    with pytest.raises(
        UsageError, match="--strip-weights: TensorRT-RTX .* compiles refittable plans only with a CUDA GPU"
    ):
        build_engines(
            artifacts=folder, target="rtx", trt=rtx, build=BuildConfig(strip_weights=True), log=lambda m: None
        )
    assert not (engines_dir(folder, "rtx") / "vae.plan").exists()
