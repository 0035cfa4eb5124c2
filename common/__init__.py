"""What export, engines and runtime all need: component specs, the manifest, errors.

Imports none of the three packages, and nothing heavy (no torch, no onnx) at module level.
"""
