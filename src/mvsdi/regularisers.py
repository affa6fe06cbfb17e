"""Regularisers of the SDI configuration, on one view's render.

All return a scalar per image [N]; the training loop weights them with ``LossWeights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mvsdi.cameras import Cameras


def sparsity(opacity: torch.Tensor) -> torch.Tensor:
    """Smooth L1 of the opacity map: pushes empty space to stay empty early in training."""
    return torch.sqrt(opacity.pow(2) + 0.01).flatten(1).mean(1)


def opacity_entropy(opacity: torch.Tensor) -> torch.Tensor:
    """Binary entropy of the opacity: pixels should be fully empty or fully covered."""
    o = opacity.clamp(1e-3, 1 - 1e-3)
    return -(o * o.log() + (1 - o) * (1 - o).log()).flatten(1).mean(1)


def convexity(normal: torch.Tensor, opacity: torch.Tensor, cameras: Cameras, size: int = 8) -> torch.Tensor:
    """Rewards normals that turn like those of a convex surface across the image.

    Normal maps are taken into the camera frame and shrunk to ``size``²: for a convex surface the
    normal rotates towards +x_cam moving right and towards +y_cam moving up, so the cross products
    of neighbours point along +y_cam (horizontal pairs) and −x_cam (vertical pairs). The reference
    takes the world-z component of both cross products instead, which only measures the horizontal
    term at low elevations; we measure both in the camera frame.
    """
    rot = cameras.camera_to_world()[:, :3, :3].to(normal)  # columns: right, up, back
    n = F.normalize(normal, dim=-1) * opacity  # [N,H,W,3], world
    n_cam = torch.einsum("nhwi,nij->nhwj", n, rot)
    small = F.interpolate(n_cam.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    small = small.permute(0, 2, 3, 1)
    horizontal = torch.cross(small[:, :, :-1], small[:, :, 1:], dim=-1)[..., 1]
    vertical = -torch.cross(small[:, 1:], small[:, :-1], dim=-1)[..., 0]  # rows go down the image
    return -(horizontal.flatten(1).mean(1) + vertical.flatten(1).mean(1))


def total_variation(rgb: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically plus horizontally neighbouring pixels [N] (rgb [N,H,W,3]):
    the reference's lambda_tv term, an L1 smoothness prior on the rendered colours."""
    dy = (rgb[:, 1:] - rgb[:, :-1]).abs().flatten(1).mean(1)
    dx = (rgb[:, :, 1:] - rgb[:, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx
