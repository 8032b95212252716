"""Triton kernels of fastlm, one module per op family (installed as fastlm.kernels)."""
