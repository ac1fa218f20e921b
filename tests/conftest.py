import os

import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton
# is first imported, so set it here, ahead of any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
