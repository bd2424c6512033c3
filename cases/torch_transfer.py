"""Transfer learning with the PyTorch MLP: pretrain on the source region, fine-tune on a small
labelled fraction of the target region, against the source-only and from-scratch baselines
(`cubebench.models.bases.Transfer`; twin: `keras_transfer.py`).
"""

from __future__ import annotations

from cubebench.models.bases import TorchCase, Transfer


class Case(Transfer, TorchCase):
    name = "torch-transfer"
