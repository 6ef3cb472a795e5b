"""Pixel-space dataset distillation: DD, DC, DSA, DM (and MTT, DATM, DQ), registered in distill.methods.registry."""
