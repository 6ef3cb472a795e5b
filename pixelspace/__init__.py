"""Pixel-space dataset distillation, registered in distill.methods.registry.

Methods: ``dd`` (DD), ``gradient_matching`` (DC, DSA), ``dm`` (DM), ``mtt`` (MTT, with expert buffers from
``experts``), ``datm`` (DATM), ``dq`` (DQ). Building blocks they share: ``realpool`` (real images per class),
``synthetic`` (initialisation, image optimiser, fresh networks, output), ``gradients`` (DC's gradient distance,
per-class gradients), ``precision`` (bf16 autocast of the expensive side), ``realpass`` (the real-batch pass,
optionally compiled). Reference facts: docs/METHODS.md.
"""
