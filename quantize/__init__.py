"""Latent-space distillation: encode (``encoders``), cache (``latent_cache``), quantize (``kmeans``), decode
(``diffusion``, priors from ``prior``), composed by the ``oq`` and ``d4m`` methods (``methods``).

Nothing heavy is imported here: ``distill --help`` and the method registry stay fast.
"""
