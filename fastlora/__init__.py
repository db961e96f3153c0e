"""fastlora: fused LoRA-family adapters that fine-tune without forgetting.

    import fastlora
    model = fastlora.inject(model, fastlora.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
"""
from .adapters_api import (
    TrainableParameters,
    active_adapter,
    adapter_names,
    adapter_stats,
    add_adapter,
    delete_adapter,
    disable_adapter,
    set_adapter,
    trainable_parameters,
    unload,
)
from .checkpoint import load_adapter, read_adapter_config, save_adapter
from .config import (
    AdapterConfig,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from .inject import (
    inject,
    set_adapters_enabled,
    trainable_parameter_count,
)
from .layer import AdapterLinear
from .merging import merge, merge_and_unload, unmerge
from .model_tree import adapter_layers
from .peft_accelerate import accelerate, accelerated_layers, deaccelerate
from .peft_interop import load_peft_adapter, save_peft_adapter
from .plan_tuning import tune
from .tasks import next_task
from .training import TrainingHooks, attach_training_hooks, regularization_loss

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLinear", "CascadeLoraConfig", "CurLoraConfig", "FastLoraCallback", "FastLoraTrainer",
    "LoraConfig", "NeatConfig", "RankSelectiveLoraConfig", "SelectiveLoraConfig", "TrainableParameters",
    "TrainingHooks", "accelerate", "accelerated_layers", "active_adapter", "adapter_layers", "adapter_names",
    "adapter_stats", "add_adapter", "attach_training_hooks", "deaccelerate", "delete_adapter", "disable_adapter",
    "inject", "load_adapter", "load_peft_adapter", "merge", "merge_and_unload", "next_task", "read_adapter_config",
    "regularization_loss", "save_adapter", "save_peft_adapter", "set_adapter", "set_adapters_enabled",
    "trainable_parameter_count", "trainable_parameters", "tune", "unload", "unmerge",
]


def __getattr__(name: str):
    """FastLoraCallback and FastLoraTrainer import transformers, so they load on first use."""
    if name in ("FastLoraCallback", "FastLoraTrainer"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'fastlora' has no attribute {name!r}")
