"""PyTorch U-Net filling LST gaps in windows: one half of the fairness twins (`keras_cnn.py`).

The model sees a window's air temperature, its visible LST (with the visibility mask) and the
coordinate planes, and is trained on the MSE of the hidden pixels only
(`cubebench.models.bases.UNet`, built by `cubebench.models.torch.build_unet`).
"""

from __future__ import annotations

from cubebench.models.bases import TorchCase, UNet


class Case(UNet, TorchCase):
    name = "torch-cnn"
    distributed = True  # `run --nproc N`: DDP over N ranks
