"""HeadCTMoLRE library: the Qt-free part of the HeadCTMoLRE 3D Slicer extension.

Everything the Slicer module shows is computed here, so the same code runs inside Slicer, in Slicer's
headless batch mode, from the ``headct-molre`` command line and under pytest.

Data path (see README.md):
    source -> ctio.load_ct -> CTVolume (HU, LPS, true geometry)
           -> preprocess.preprocess -> SliceStack (S x 3 x H x W, 0..1, + map back to patient space)
           -> model / inference -> Prediction
           -> presenters (MRML nodes, files, terminal)
"""

__version__ = "0.1.0"
