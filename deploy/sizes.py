"""Every exported size of one artifacts folder as the server holds it: one runtime per size, one text encoder.

A folder exported with `--resolutions` has a transformer and a VAE graph per (height, width) and one
text encoder (`runtime.artifacts.at_size`). The Triton model opens a view per size at load, each with
its own backend (its own ORT sessions or TensorRT engines for that size's graphs), and routes the
text encoder of every view to the first size's backend: the prompt's embeddings do not depend on the
image size, and FLUX.2 [dev]'s text encoder is its largest part (docs/serving.md, "Sizes").
"""

from __future__ import annotations

from common.specs import RESOLUTION_COMPONENTS


class SizedBackend:
    """A size's backend for the graphs that differ per size, another's (the first size's) for the rest.

    Both are of one kind (the same `select_backend` choice, so on one device), so an array one returns
    is a feed the other takes. Closing it closes its own backend only; the shared one is closed by its view.
    """

    def __init__(self, own, shared):
        self.own, self.shared = own, shared
        self.name = own.name

    def _for(self, component: str):
        return self.own if component in RESOLUTION_COMPONENTS else self.shared

    def run(self, component: str, feeds: dict) -> dict:
        return self._for(component).run(component, feeds)

    def from_host(self, array):
        return self.own.from_host(array)

    def to_host(self, array):
        return self.own.to_host(array)

    def unload(self, component: str) -> None:
        self._for(component).unload(component)

    def close(self) -> None:
        self.own.close()


def open_sizes(first, open_backend) -> dict:
    """(height, width) -> Flux2Runtime for every exported size of `first`'s folder, the default first.

    `first`: `runtime.artifacts.open_artifacts(folder)`, the first size's view. `open_backend(artifacts) ->
    Backend` opens one view's backend (the model's `select_backend` call).
    """
    from runtime.artifacts import open_artifacts
    from runtime.pipeline import Flux2Runtime

    folder = first.folder
    shared = open_backend(first)
    runtimes = {first.shapes.sizes[0]: Flux2Runtime(first, shared)}
    for size in first.shapes.sizes[1:]:
        view = open_artifacts(folder, size=size)
        runtimes[size] = Flux2Runtime(view, SizedBackend(open_backend(view), shared))
    return runtimes
