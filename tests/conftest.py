"""Shared test settings: hypothesis profiles (CI runs the full example counts)."""
import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in its interpreter (float32 on CPU). The variable must be
# set before anything imports triton: @triton.jit reads it at decoration time, and a kernel
# module imported first without it cannot run interpreted later in the same process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests use tiny tensors and run in 2 xdist workers on 2 cores: one intra-op thread per
# worker avoids OpenMP contention that made small ops 10-20x slower.
torch.set_num_threads(1)

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
