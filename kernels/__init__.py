"""Triton kernels and their launchers (installed as `fastunet.kernels`): one file per fused op.

No autograd and no nn here: the op layer (`fastunet.ops`) validates input and calls these.
"""
