"""Triton kernels and their launchers (installed as `fastunet.kernels`): one file per fused op.

No autograd and no nn here: the op layer (`fastunet.ops`) validates input and calls these.
Importing this package does not import triton; importing one of its modules does.
"""

import os

# Triton decides at kernel definition whether to interpret; this is its rule for the variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")
