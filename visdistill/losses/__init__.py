"""Pure loss functions: tensors in, tensor out, no parameters."""

from .kd import kd_loss, soft_cross_entropy

__all__ = ["kd_loss", "soft_cross_entropy"]
