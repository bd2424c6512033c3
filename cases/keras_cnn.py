"""Keras 3 U-Net filling LST gaps in windows (tf.data): the fairness twin of `torch_cnn.py`.

The same U-Net and hyperparameters (`cubebench.models.bases.UNet`). The windows come as
`(x, packed)`: the target and its mask in one tensor, unpacked by the masked loss; the model
takes channels-first windows like torch's and permutes inside (TensorFlow's CPU convolutions
are channels-last only).
"""

from __future__ import annotations

from cubebench.models.bases import KerasCase, UNet


class Case(UNet, KerasCase):
    name = "keras-cnn"
