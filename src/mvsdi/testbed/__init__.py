"""The weights-free ground truth: procedural scenes, the exact denoiser of their renders, metrics.

- ``scenes``: analytic scenes (SDF + colour), ``SceneField`` for the renderer, ``render_truth``;
- ``prior``: ``IdealDenoiserPrior``, the optimal denoiser of the scenes' reference renders,
  behind the ``DiffusionPrior`` protocol;
- ``metrics``: a distilled field against the truth (aligned PSNR, 3D IoU, R-precision, Janus);
- ``study`` (``mvsdi testbed``, ``cli``): K-view methods at equal budget on these scenes, from
  ``settings`` (methods, presets, a cell's run), ``cells`` (training and measuring, in worker
  processes), ``tables`` and ``figures``.
"""

from mvsdi.testbed import sdf
from mvsdi.testbed.metrics import aligned_psnr, diverged, evaluate_field, iou_3d, janus_score, view_r_precision
from mvsdi.testbed.prior import IdealDenoiserPrior
from mvsdi.testbed.scenes import (BACKGROUND, SCENES, ConstantBackground, Scene, SceneField, get_scene, register_scene,
                                  render_truth, truth_mask)

__all__ = ["BACKGROUND", "SCENES", "ConstantBackground", "IdealDenoiserPrior", "Scene", "SceneField", "aligned_psnr",
           "diverged", "evaluate_field", "get_scene", "iou_3d", "janus_score", "register_scene", "render_truth", "sdf",
           "truth_mask", "view_r_precision"]
