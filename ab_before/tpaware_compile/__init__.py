"""tpaware_compile: run GPTQ act-order int4 MLPs under tensor parallelism without the AllGather.

``torch.compile(model, backend="tpaware")`` works after install (entry point); the custom ops register on import.
"""

from . import ops  # noqa: F401  registers torch.ops.tpaware.*
from .gptq import GPTQWeight, dequantize, reference_matmul  # noqa: F401
