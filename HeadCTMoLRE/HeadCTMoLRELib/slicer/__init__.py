"""Everything that speaks MRML or serves the Slicer GUI, without Qt: the module's one Logic (``logic``),
Prediction -> MRML nodes (``mrml``, ``mrml_geometry``, ``mrml_render``), the background worker process
(``worker``), self-test scenarios (``selftest``), the Qt-free Slicer application set-up for slicer-core
(``app``) and dependency checks (``dependencies``). The top layer, beside ``cli``.

Inside this package ``import slicer`` still means 3D Slicer's own package (absolute imports)."""

from ..exports import lazy_exports

__all__ = ["HeadCTMoLRECore"]
__getattr__ = lazy_exports(__name__, {"HeadCTMoLRECore": "logic"})
