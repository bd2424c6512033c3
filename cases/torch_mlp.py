"""PyTorch MLP on the streamed batches: one half of the fairness twins (`keras_mlp.py`).

The model is `cubebench.models.bases.MLP` (built by `cubebench.models.torch.build_mlp`), the
training loop `cubebench.models.torch.fit_stream`; `keras-mlp` differs in its library only.
"""

from __future__ import annotations

from cubebench.models.bases import MLP, TorchCase


class Case(MLP, TorchCase):
    name = "torch-mlp"
    distributed = True  # `run --nproc N`: DDP over N ranks
