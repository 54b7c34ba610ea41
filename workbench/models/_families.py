"""Imports every family module so that each registers itself (one line per family)."""
from . import llama  # noqa: F401
from . import resnet  # noqa: F401
from . import gpt  # noqa: F401
from . import vgg  # noqa: F401
from . import alexnet  # noqa: F401
from . import fcn  # noqa: F401
from . import unet  # noqa: F401
from . import vit  # noqa: F401
from . import vit_moe  # noqa: F401
from . import lstm  # noqa: F401
from . import yolo  # noqa: F401
from . import detr  # noqa: F401
from . import captioner  # noqa: F401
from . import c3d  # noqa: F401
from . import r2plus1d  # noqa: F401
from . import i3d  # noqa: F401
