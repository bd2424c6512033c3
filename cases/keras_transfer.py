"""Transfer learning with the Keras MLP: pretrain on the source region, fine-tune on a small
labelled fraction of the target region, against the source-only and from-scratch baselines
(`cubebench.models.bases.Transfer`; twin: `torch_transfer.py`).
"""

from __future__ import annotations

from cubebench.models.bases import KerasCase, Transfer


class Case(Transfer, KerasCase):
    name = "keras-transfer"
