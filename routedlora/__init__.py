"""routedlora: batched routed LoRA (Poly, MHR, C-Poly, MTA) behind a drop-in nn.Module.

See README.md for the API and DESIGN.md for the math.
"""
from . import context, ops, routers
from .backends import BACKENDS, CudaBackendUnavailable, available_backends
from .checkpoint import adapter_state_dict, load_adapter, save_adapter
from .config import RoutedLoraConfig
from .inject import eject, inject, model_config, routed_layers, routing, set_trainable
from .layer import RoutedLoraLinear
from .merge import merge, unmerge
from .mta import MTALinear
from .peft_interop import from_peft, to_peft
from .recipes import mhr_mu, mhr_z, mta_stage2, param_groups
from .routers import Routing

__version__ = "0.1.0"


def __getattr__(name):
    # loaded on first use, not at import: `python -m routedlora.export` runs that module as
    # __main__, which must not already sit in sys.modules
    if name == "export_task_loras":
        from .export import export_task_loras

        return export_task_loras
    raise AttributeError(f"module 'routedlora' has no attribute {name!r}")


__all__ = [
    "BACKENDS", "CudaBackendUnavailable", "MTALinear", "RoutedLoraConfig", "RoutedLoraLinear", "Routing", "adapter_state_dict",
    "available_backends", "context", "eject", "export_task_loras", "from_peft", "inject", "load_adapter", "merge", "mhr_mu", "mhr_z",
    "model_config", "mta_stage2", "ops", "param_groups", "routed_layers", "routers", "routing",
    "save_adapter", "set_trainable", "to_peft", "unmerge",
]
