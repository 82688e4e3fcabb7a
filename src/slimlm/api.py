"""The Python API; every CLI command is a thin wrapper over one function here.

    import slimlm.api as slim
    report = slim.inspect("path/or/catalog-name")

Each area re-exports its entry points below (one section per area).
"""

# --- inspection: lazy checkpoint reading, parameter counts, catalog (inspect) ---
from slimlm.checkpoint import Checkpoint, TensorInfo, open_checkpoint  # noqa: E402,F401
from slimlm.inspect import InspectReport, inspect  # noqa: E402,F401
from slimlm.spec import ModelSpec  # noqa: E402,F401

# --- GGUF quantization and importance matrices (gguf_io) ---
from slimlm.gguf_io.imatrix import Imatrix, make_imatrix as imatrix, read_imatrix, write_imatrix  # noqa: E402,F401
from slimlm.gguf_io.quantize import QuantizeResult, quantize_gguf  # noqa: E402,F401
