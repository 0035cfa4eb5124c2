"""engines.build without TensorRT: the calls made on a fake `trt`, the cache key, the engine manifest."""

import json
import sys
import types
from dataclasses import replace

import onnx
import pytest
from onnx import TensorProto, helper

from common.engine_manifest import check_engines_usable, engines_dir, read_engine_manifest
from common.errors import ArtifactsError, UsageError
from common.manifest import FORMAT, FORMAT_VERSION, sha256_file
from common.tensorrt_env import trt_status
from engines.build import BuildConfig, build_engines, engine_key
from engines.trt_build import EngineBuildError, configure, create_network
from tests.fake_trt import BuilderFlag, FakeTrt, MemoryPoolType
from tests.support import run_cli

PLATFORM = {"tensorrt": "10.15.1.29", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
INPUTS = [{"name": "x", "shape": [1, 4], "dtype": "float32"}]


def _configure(trt, build, network_inputs=None, timing_cache=b""):
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = create_network(trt, builder)
    network.inputs = [
        type("T", (), {"name": n, "shape": tuple(s)})() for n, s in (network_inputs or {"x": (1, 4)}).items()
    ]
    config = builder.create_builder_config()
    configure(trt, builder, network, config, build, INPUTS, timing_cache)
    return config


def test_strongly_typed_no_precision_flags_level_and_pool_given():
    trt = FakeTrt()
    config = _configure(trt, BuildConfig(opt_level=5, workspace_gib=2), timing_cache=b"cache")
    assert ("create_network", 1 << 0) in trt.calls  # 1 << STRONGLY_TYPED
    assert [c for c in trt.calls if c[0] == "set_flag"] == []  # no FP16/BF16/FP8/INT8/OBEY_PRECISION_CONSTRAINTS
    assert ("clear_flag", BuilderFlag.TF32) in trt.calls  # fp32 math stays fp32
    assert ("builder_optimization_level", 5) in trt.calls
    assert ("set_memory_pool_limit", MemoryPoolType.WORKSPACE, 2 * 2**30) in trt.calls
    assert ("create_timing_cache", b"cache") in trt.calls and ("set_timing_cache", b"cache", False) in trt.calls
    assert config.profiles == []  # static network inputs need no optimization profile


def test_default_workspace_leaves_tensorrt_default():
    trt = FakeTrt()
    _configure(trt, BuildConfig())
    assert not [c for c in trt.calls if c[0] == "set_memory_pool_limit"]
    assert ("builder_optimization_level", 3) in trt.calls


def test_dynamic_input_pinned_to_manifest_shape_and_mismatch_refused():
    trt = FakeTrt()
    config = _configure(trt, BuildConfig(), network_inputs={"x": (-1, 4)})
    assert config.profiles[0].shapes == {"x": ((1, 4), (1, 4), (1, 4))}
    with pytest.raises(EngineBuildError, match=r"has shape \(2, 4\), the manifest declares \(1, 4\)"):
        _configure(FakeTrt(), BuildConfig(), network_inputs={"x": (2, 4)})


def test_build_config_rejects_bad_values():
    with pytest.raises(UsageError, match="0..5"):
        BuildConfig(opt_level=6)
    with pytest.raises(UsageError, match="must be positive"):
        BuildConfig(workspace_gib=0)


def test_every_key_input_changes_the_key():
    base = dict(
        component="transformer",
        onnx_sha256={"transformer.onnx": "a", "transformer.onnx.data": "b"},
        platform=PLATFORM,
        flags=BuildConfig().flags(),
    )
    variants = [
        {"component": "vae"},
        {"onnx_sha256": {"transformer.onnx": "a", "transformer.onnx.data": "c"}},
        {"platform": {**PLATFORM, "tensorrt": "10.16.0"}},
        {"platform": {**PLATFORM, "gpu": "NVIDIA H200"}},
        {"platform": {**PLATFORM, "compute_capability": "10.0"}},
        {"flags": replace(BuildConfig(), opt_level=4).flags()},
        {"flags": replace(BuildConfig(), workspace_gib=8).flags()},
        {"flags": replace(BuildConfig(), tf32=True).flags()},
    ]
    keys = {engine_key(**base)} | {engine_key(**{**base, **v}) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert engine_key(**base) == engine_key(**dict(base))  # and it is deterministic


def _artifacts(folder, components=("text_encoder", "vae")):
    folder.mkdir(parents=True)
    entries = {}
    for index, name in enumerate(components):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"], name=f"relu{index}")],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(folder / f"{name}.onnx"))
        entries[name] = {
            "file": f"{name}.onnx",
            "sha256": {f"{name}.onnx": sha256_file(folder / f"{name}.onnx")},
            "inputs": INPUTS,
            "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}],
        }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "precision": "fp32", "components": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def _builds(trt):
    return sum(1 for c in trt.calls if c[0] == "build_serialized_network")


def test_build_records_manifest_and_reuses_until_an_input_changes(tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    logs = []
    trt = FakeTrt()
    cache = tmp_path / "timing.cache"
    built = build_engines(artifacts=folder, trt=trt, platform=PLATFORM, timing_cache=cache, log=logs.append)
    assert _builds(trt) == 2
    on_disk = read_engine_manifest(folder)
    assert on_disk == built
    for name in ("text_encoder", "vae"):
        entry = on_disk["engines"][name]
        plan = engines_dir(folder) / entry["plan"]
        assert entry["platform"] == PLATFORM and entry["flags"]["strongly_typed"] is True
        assert entry["onnx_sha256"] == manifest["components"][name]["sha256"]
        assert entry["plan_sha256"] == sha256_file(plan) and entry["plan_bytes"] == plan.stat().st_size
        assert entry["key"] == engine_key(
            component=name, onnx_sha256=entry["onnx_sha256"], platform=PLATFORM, flags=entry["flags"]
        )
    assert cache.read_bytes() == b"+timed+timed"  # loaded, extended and saved by each build
    assert any("built in" in line for line in logs) and "engines in" in logs[-1]
    check_engines_usable(on_disk, manifest, PLATFORM, folder)

    # Same inputs: nothing is built.
    trt = FakeTrt()
    build_engines(artifacts=folder, trt=trt, platform=PLATFORM, log=logs.append)
    assert _builds(trt) == 0 and "reused" in logs[-1]

    # Each of: build flags, TensorRT version, GPU, a damaged plan, --force rebuilds.
    for kwargs, reason in (
        ({"build": BuildConfig(opt_level=1)}, "(flags changed)"),
        ({"platform": {**PLATFORM, "tensorrt": "10.16.0"}}, "(platform, flags changed)"),  # flags: back to level 3
        ({"platform": {**PLATFORM, "gpu": "NVIDIA H200"}}, "(platform changed)"),
    ):
        trt = FakeTrt()
        logs.clear()
        build_engines(artifacts=folder, trt=trt, log=logs.append, **{"platform": PLATFORM, **kwargs})
        assert _builds(trt) == 2 and any(reason in line for line in logs), logs
    build_engines(artifacts=folder, trt=FakeTrt(), platform=PLATFORM, log=logs.append)  # back to the first GPU
    (engines_dir(folder) / "vae.plan").write_bytes(b"x" * (engines_dir(folder) / "vae.plan").stat().st_size)
    trt = FakeTrt()
    logs.clear()
    build_engines(artifacts=folder, trt=trt, platform=PLATFORM, log=logs.append)
    assert _builds(trt) == 1 and any("differs from its recorded sha256" in line for line in logs)
    trt = FakeTrt()
    build_engines(artifacts=folder, trt=trt, platform=PLATFORM, force=True, log=logs.append)
    assert _builds(trt) == 2
    assert sorted(p.name for p in engines_dir(folder).iterdir()) == ["manifest.json", "text_encoder.plan", "vae.plan"]


def test_a_changed_onnx_file_rebuilds_only_that_engine(tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    build_engines(artifacts=folder, trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    model = onnx.load(str(folder / "vae.onnx"))
    model.doc_string = "re-exported"
    onnx.save(model, str(folder / "vae.onnx"))
    manifest["components"]["vae"]["sha256"]["vae.onnx"] = sha256_file(folder / "vae.onnx")  # as a re-export records
    (folder / "manifest.json").write_text(json.dumps(manifest))
    trt, logs = FakeTrt(), []
    build_engines(artifacts=folder, trt=trt, platform=PLATFORM, log=logs.append)
    assert _builds(trt) == 1 and any("vae: building (onnx_sha256 changed)" in line for line in logs)


def test_parse_or_build_failure_keeps_finished_engines(tmp_path):
    folder, _ = _artifacts(tmp_path / "a")
    with pytest.raises(EngineBuildError, match="could not parse .*text_encoder.onnx: In node 0"):
        build_engines(artifacts=folder, trt=FakeTrt(fail_parse=True), platform=PLATFORM, log=lambda m: None)
    assert not (engines_dir(folder) / "manifest.json").exists()
    build_engines(artifacts=folder, trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    with pytest.raises(EngineBuildError, match="failed to build an engine"):
        build_engines(artifacts=folder, trt=FakeTrt(fail_build=True), platform=PLATFORM, force=True, log=lambda m: None)
    assert set(read_engine_manifest(folder)["engines"]) == {"text_encoder", "vae"}  # the previous plans stand
    assert not [p for p in engines_dir(folder).iterdir() if p.name.startswith(".")]  # no temporary left


def test_engines_refused_for_another_gpu_tensorrt_or_onnx(tmp_path):
    folder, manifest = _artifacts(tmp_path / "a")
    engines = build_engines(artifacts=folder, trt=FakeTrt(), platform=PLATFORM, log=lambda m: None)
    cases = [
        (
            {**PLATFORM, "tensorrt": "10.16.0"},
            manifest,
            "built with TensorRT 10.15.1.29, this node has TensorRT 10.16.0",
        ),
        ({**PLATFORM, "gpu": "NVIDIA H200"}, manifest, "built for NVIDIA H100 80GB HBM3 .* this node has NVIDIA H200"),
        ({**PLATFORM, "compute_capability": "10.0"}, manifest, r"compute capability 9.0\), this node .*10.0"),
    ]
    stale = json.loads(json.dumps(manifest))
    stale["components"]["vae"]["sha256"]["vae.onnx"] = "0" * 64
    cases.append((PLATFORM, stale, "built from other vae ONNX files"))
    more = json.loads(json.dumps(manifest))
    more["components"]["transformer"] = manifest["components"]["vae"]
    cases.append((PLATFORM, more, "has no engine for transformer"))
    for present, artifacts_manifest, message in cases:
        with pytest.raises(ArtifactsError, match=message):
            check_engines_usable(engines, artifacts_manifest, present, folder)


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


def test_cli_check_and_build_on_tiny_artifacts_without_tensorrt(export_tiny):
    out = export_tiny("fp32")
    check = run_cli("-m", "engines.check", str(out))
    assert check.returncode == 0, check.stderr
    assert check.stdout.count(" pass") == 3
    build = run_cli("-m", "engines.build", "--artifacts", str(out))
    assert build.returncode == 0, build.stderr
    lines = [line for line in (build.stdout + build.stderr).splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("engine building skipped: TensorRT is not installed")
    assert lines[0].endswith("the runtime will use ONNX Runtime")
    assert not engines_dir(out).exists()  # nothing partial
