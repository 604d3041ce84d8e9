"""HeadCTMoLRE library: the Qt-free part of the HeadCTMoLRE 3D Slicer extension.

Everything the Slicer module shows is computed here, so the same code runs inside Slicer, in Slicer's
headless batch mode, from the ``headct-molre`` command line and under pytest.

Data path (see README.md, "Where things are"):
    source -> ct.load_ct -> CTVolume (HU, LPS, true geometry)
           -> ct.preprocess.preprocess -> SliceStack (S x 3 x H x W, 0..1, + map back to patient space)
           -> model (bundle, classifier) / inference.predict -> Prediction
           -> presenters (outputs: files; slicer: MRML nodes; terminal)

Sub-packages, lowest layer first: ``ct``; ``model``; ``inference`` + ``outputs``; ``training`` and
``evaluation``; ``phantoms`` (test and demo data); ``slicer`` and ``cli`` on top. Imports point down.
"""

import os

from .exports import lazy_exports

# No network at run time, ever: Hugging Face libraries read these once, when they are imported, and this
# package is imported before any of our modules imports transformers (every from_pretrained also passes
# local_files_only=True, and a backbone source that is not a local folder is refused).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

__version__ = "0.1.0"
__all__ = ["load_bundle", "load_ct", "predict"]
__getattr__ = lazy_exports(__name__, {"load_ct": "ct.loader", "load_bundle": "model.bundle",
                                      "predict": "inference"})
