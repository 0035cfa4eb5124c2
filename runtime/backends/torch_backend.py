"""PyTorch backend: diffusers' own modules from the checkpoint the manifest names; the numerics reference.

It computes each stage the way `Flux2Pipeline.__call__` does (transformers' hidden states stacked,
the transformer called with position ids, the pipeline's unpack / BatchNorm / unpatchify before
`vae.decode`), so comparing it with the graphs checks the export end to end. diffusers and
transformers are imported here, lazily: only this backend needs them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from common.errors import ArtifactsError
from common.manifest import ArtifactsManifest
from common.precision import precision as declared


class TorchBackend:
    # It runs diffusers' modules, not the exported graphs: the step cache's head/tail/out are not here.
    runs_graphs = False

    def __init__(
        self,
        artifacts: Path,
        manifest: ArtifactsManifest,
        *,
        low_vram: bool = False,
        device: str | None = None,
        checkpoint: Path | None = None,
    ):
        import torch

        self.manifest = manifest
        self.precision = manifest.precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = f"torch-{self.device.type}"
        self.dtype = declared(self.precision).torch_dtype()
        self.checkpoint = Path(checkpoint or manifest.source.checkpoint).expanduser()
        if not (self.checkpoint / "model_index.json").is_file():
            raise ArtifactsError(
                f"the torch backend loads the source checkpoint {self.checkpoint} recorded in {Path(artifacts) / 'manifest.json'}, "
                "which is not there; pass the checkpoint's new location (--model) or use --backend ort"
            )
        geometry, shapes = manifest.geometry, manifest.shapes
        self.layers = tuple(geometry.text_out_layers)
        step = geometry.pixels_per_token
        self.rows, self.cols = shapes.height // step, shapes.width // step
        self.pipeline_class = geometry.pipeline_class
        self.reference_images = shapes.reference_images
        if self.reference_images:
            reference_height, reference_width = shapes.reference_size
            self.reference_grid = (reference_height // step, reference_width // step)
        self._pipe = None
        # LoRAs as peft adapters on diffusers' transformer (common.lora.load_into_pipeline): those the
        # manifest says were baked in, then those of use_loras; applied when the transformer next runs.
        self._baked_records, self._where = manifest.loras, f"artifacts {artifacts}"
        self._baked = None  # read on first use
        self._loras: tuple = ()
        self._applied = ()

    def use_loras(self, loras: tuple) -> None:
        """Draw with `loras` ((Lora, scale) pairs) on top of the baked ones; the graphs take them as slot inputs."""
        self._loras = tuple(loras)

    def _sync_loras(self, pipe) -> None:
        from common.lora import baked_loras, load_into_pipeline

        if self._baked is None:
            self._baked = baked_loras(self._baked_records, self._where)
        wanted = self._baked + self._loras
        if [(lora.sha256, scale) for lora, scale in wanted] != [(lora.sha256, scale) for lora, scale in self._applied]:
            load_into_pipeline(pipe, wanted)
            self._applied = wanted

    @classmethod
    def around(
        cls, pipe, artifacts: Path, manifest: ArtifactsManifest, checkpoint: Path, precision: str = "fp32"
    ) -> TorchBackend:
        """This backend's stages over an already built pipeline (runtime.check's float32 reference, which
        also draws the reference image), so both sides of a comparison feed the modules the same way."""
        manifest = dataclasses.replace(manifest, precision=precision)
        backend = cls(artifacts, manifest, device=str(pipe._execution_device), checkpoint=checkpoint)
        backend._pipe = pipe
        return backend

    @property
    def pipe(self):
        if self._pipe is None:
            from common.reference_pipeline import reference_pipeline

            self._pipe = reference_pipeline(
                self.checkpoint, dtype=declared(self.precision).compute_dtype, device=str(self.device)
            )
        return self._pipe

    def run(self, component: str, feeds: dict) -> dict:
        import torch

        stage = {
            "text_encoder": self._text_encoder,
            "vae_encoder": self._vae_encoder,
            "transformer": self._transformer,
            "vae": self._vae,
        }.get(component)
        if stage is None:
            raise ValueError(component)
        with torch.no_grad():
            return stage(self.pipe, feeds)

    def _text_encoder(self, pipe, feeds: dict) -> dict:
        import torch

        output = pipe.text_encoder(
            input_ids=feeds["input_ids"],
            attention_mask=feeds["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([output.hidden_states[k] for k in self.layers], dim=1)
        b, c, length, hidden = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, c * hidden)
        return {"prompt_embeds": embeds.float()}

    def _vae_encoder(self, pipe, feeds: dict) -> dict:
        import torch

        # Flux2Pipeline._encode_vae_image (argmax, patchify, BatchNorm) + _pack_latents, per image
        images = feeds["reference_images"].to(self.dtype)
        tokens = [pipe._pack_latents(pipe._encode_vae_image(image[None], None)) for image in images]
        return {"reference_tokens": torch.cat(tokens).float()}

    def _transformer(self, pipe, feeds: dict) -> dict:
        import torch

        self._sync_loras(pipe)
        hidden = feeds["hidden_states"]
        tokens = hidden.shape[1]
        latent_grid = torch.zeros(hidden.shape[0], 1, self.rows, self.cols)
        img_ids = pipe._prepare_latent_ids(latent_grid).to(self.device)
        if "reference_latents" in feeds:  # as the pipeline's loop: concatenated latents and ids
            grids = [torch.zeros(1, 1, *self.reference_grid)] * self.reference_images
            reference_ids = pipe._prepare_image_ids(grids).repeat(hidden.shape[0], 1, 1).to(self.device)
            img_ids = torch.cat([img_ids, reference_ids], dim=1)
            hidden = torch.cat([hidden, feeds["reference_latents"]], dim=1)
        txt_ids = pipe._prepare_text_ids(feeds["encoder_hidden_states"]).to(self.device)
        guidance = feeds.get("guidance")
        velocity = pipe.transformer(
            hidden_states=hidden.to(self.dtype),
            encoder_hidden_states=feeds["encoder_hidden_states"].to(self.dtype),
            # as Flux2Pipeline: t = sigma * 1000 cast to the latents dtype, then / 1000
            timestep=(feeds["timestep"] * 1000).to(self.dtype) / 1000,
            guidance=None if guidance is None else guidance.float(),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return {"velocity": velocity[:, :tokens].float()}

    def _vae(self, pipe, feeds: dict) -> dict:
        import torch

        packed = feeds["packed_latents"].to(self.dtype)
        latent_grid = torch.zeros(packed.shape[0], 1, self.rows, self.cols)
        latents = pipe._unpack_latents_with_ids(packed, pipe._prepare_latent_ids(latent_grid).to(self.device))
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        return {"image": pipe.vae.decode(latents, return_dict=False)[0].float()}

    def from_host(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_host(self, array) -> np.ndarray:
        return array.detach().float().cpu().numpy() if array.is_floating_point() else array.cpu().numpy()

    def unload(self, component: str) -> None:
        pass  # the reference keeps the whole pipeline

    def close(self) -> None:
        self._pipe = None
