"""The real tritonserver serving editing artifacts: reference images sent as encoded files, prepared as --image is.

One server for the module, on the tiny [dev] checkpoint exported with one reference image
(128 x 128, 128 tokens), asked over HTTP for 2-step images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import ask_triton, run_cli, triton_env

pytestmark = pytest.mark.slow

PROMPT = "make the fox blue"
STEPS = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from PIL import Image

    from common.specs import Shapes
    from deploy.local_server import LocalServer, processes_mentioning
    from deploy.triton import ModelSettings, write_repository
    from export.run import export_artifacts

    env = triton_env()
    root = tmp_path_factory.mktemp("served-editing")
    artifacts = root / "artifacts"
    shapes = Shapes(height=128, width=128, max_sequence_length=128, reference_images=1)
    export_artifacts(model="tiny", out=artifacts, shapes=shapes, skip_check=True, log=lambda m: None)
    repository = root / "repository"
    write_repository(artifacts=artifacts, repository=repository, settings=ModelSettings(name="flux2", backend="ort"))
    # A JPEG of another size than exported: the server decodes it and fits it to 128 x 128, as runtime.generate does.
    y, x = np.mgrid[0:200, 0:150]
    pixels = np.stack([x * 255 // 150, y * 255 // 200, (x + y) % 256], axis=-1).astype(np.uint8)
    image = root / "reference.jpg"
    Image.fromarray(pixels).save(image, quality=90)
    server = LocalServer(repository, triton_env=env)
    server.start()
    server.artifacts, server.image = artifacts, image
    yield server
    server.stop()
    assert processes_mentioning(str(repository.resolve())) == [], "a server or stub process outlived the test"


def test_client_image_draws_the_png_runtime_generate_draws(served, tmp_path):
    from runtime.generate import generate

    expected = generate(artifacts=served.artifacts, prompts=[PROMPT], out=tmp_path / "generate", backend="ort",
                        progress=False, log=lambda m: None, steps=STEPS, seed=4, images=[served.image])[0]  # fmt: skip
    out = tmp_path / "client"
    result = run_cli("-m", "deploy.client", "--url", served.url, "--prompt", PROMPT, "--seed", "4",
                     "--steps", str(STEPS), "--image", str(served.image), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    png = out / "000-00-seed4.png"
    assert png.read_bytes() == expected.read_bytes()  # byte for byte: the same pixels, encoded by the same writer
    sidecar, wanted = (json.loads(p.with_suffix(".json").read_text()) for p in (png, expected))
    assert {k: v for k, v in sidecar.items() if k != "timings"} == {k: v for k, v in wanted.items() if k != "timings"}
    assert "resized and center-cropped to the exported reference size 128x128" in served.log()


def _encoded(*blobs: bytes) -> np.ndarray:
    return np.array([list(blobs)], dtype=np.object_)


BAD_REFERENCES = [
    ("two images", lambda image: _encoded(image, image), "2 reference image(s) sent, but this model takes exactly 1"),
    ("not an image", lambda image: _encoded(b"not an image"), "reference_images[0] is not an image PIL can read"),
    (
        "missing",
        lambda image: None,
        "missing input 'reference_images'; this model was exported with --reference-images 1",
    ),
]


@pytest.mark.parametrize("case, references, reason", BAD_REFERENCES, ids=[case[0] for case in BAD_REFERENCES])
def test_bad_references_are_a_400_with_one_line(served, case, references, reason):
    values = {
        "prompt": np.array([[PROMPT.encode()]], dtype=np.object_),
        "steps": np.array([[STEPS]], dtype=np.int32),
        "reference_images": references(served.image.read_bytes()),
    }
    status, _, message = ask_triton(served.url, **values)
    assert status == 400, message
    assert reason in message and "\n" not in message, message
