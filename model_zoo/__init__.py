"""deqbench model zoo: DEQ classifiers with observable neural dynamics, and baselines.

>>> import model_zoo
>>> model_zoo.list_models()                      # registered names
>>> m = model_zoo.create("deq_tiny_fashion_mnist", defense="early:7")
>>> rec = m.run(x, per_state=True)               # states, per-state logits, entropies, f-evals
>>> model_zoo.check_deq_protocol(my_model, x)    # what a model lacks for the DEQ-aware protocol
>>> model_zoo.TorchDEQClassifier(my_torchdeq_net, input_shape=(1, 28, 28), num_classes=10)
"""
from .forward import (EarlyState, EntropyReduction, FinalState, ForwardRecord, RandomIntermediate, SegmentedSolve,
                      make_defense, prediction_entropy)
from .mdeq import MDEQ_CONFIGS, InputError, MDEQClassifier, MDEQConfig
from .registry import (CheckpointError, ModelEntry, checkpoint_status, create, get_entry,
                       list_models, load, register, save_checkpoint, sha256_file)
from .solvers import Anderson, Broyden, FixedPoint, Trajectory, make_solver
from .protocol import DEQContext, DEQModel, ProtocolError, check_deq_protocol, is_deq_aware
from .torchdeq_adapter import TorchDEQClassifier

__all__ = [
    "EarlyState", "EntropyReduction", "FinalState", "ForwardRecord", "RandomIntermediate", "SegmentedSolve",
    "make_defense", "prediction_entropy", "MDEQ_CONFIGS", "InputError", "MDEQClassifier",
    "MDEQConfig", "CheckpointError", "ModelEntry", "checkpoint_status", "create", "get_entry",
    "list_models", "load", "register", "save_checkpoint", "sha256_file", "Anderson", "Broyden",
    "FixedPoint", "Trajectory", "make_solver",
    "DEQContext", "DEQModel", "ProtocolError", "check_deq_protocol", "is_deq_aware",
    "TorchDEQClassifier",
]
