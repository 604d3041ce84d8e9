"""SimpleITK images <-> Slicer volume nodes, with the geometry exactly preserved.

Slicer works in RAS, ITK/SimpleITK in LPS: a point (x, y, z) in LPS mm is (-x, -y, z) in RAS mm. A SimpleITK
image maps continuous index (i, j, k) to LPS by ``origin + direction @ diag(spacing) @ (i, j, k)``; the
node's IJKToRAS is therefore ``diag(-1, -1, 1) @ direction @ diag(spacing)`` with the origin flipped in x
and y. Numpy views: SimpleITK and ``slicer.util.arrayFromVolume`` are both (k, j, i) = (z, y, x).

A volume node may sit under a parent transform (Slicer's DICOM plugin adds an acquisition transform for
gantry-tilted or irregularly spaced series). ``image_from_volume_node`` reads the geometry in world
coordinates: a linear parent transform is composed into the grid; a non-linear one is hardened on a
temporary copy (Slicer resamples the voxels through it), so the model never sees the naive geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from ..ct import checks as ct_checks
from ..ct.dicom_series import DicomSeries, read_header, series_warnings
from ..ct.dicom_volume import orthogonal_image
from ..ct.loader import CTVolume

__all__ = ["LPS_TO_RAS", "ijk_to_ras_from_image", "volume_node_from_image", "image_from_volume_node",
           "ct_volume_from_node", "lps_to_ras"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_PIXEL_TYPES = {
    np.dtype(np.uint8): np.uint8, np.dtype(np.int8): np.int8, np.dtype(np.int16): np.int16,
    np.dtype(np.uint16): np.uint16, np.dtype(np.int32): np.int32, np.dtype(np.uint32): np.uint32,
    np.dtype(np.float32): np.float32, np.dtype(np.float64): np.float64,
}


def lps_to_ras(points) -> np.ndarray:
    """(..., 3) LPS mm -> (..., 3) RAS mm (x and y negated)."""
    points = np.array(points, dtype=np.float64)
    points[..., :2] *= -1.0
    return points


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """(4, 4) IJKToRAS matrix of a 3-D SimpleITK image (index i, j, k -> RAS mm)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return matrix


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            out.SetElement(row, col, float(matrix[row, col]))
    return out


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_node_from_image(scene, image: sitk.Image, name: str, *, labelmap: bool = False, node=None):
    """A scalar (or label map) volume node holding ``image``'s voxels on its exact grid.

    image: 3-D single-component SimpleITK image, LPS mm (any direction, any spacing); the voxel type is
        kept (label maps are cast to uint8/int16 as needed by Slicer's label tools: integers only).
    node: update this node instead of creating one (its class must match ``labelmap``).
    Returns the node, with default display nodes created.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"volume_node_from_image: {name!r} must be a 3-D single-component image, got "
                         f"{image.GetDimension()}-D with {image.GetNumberOfComponentsPerPixel()} components.")
    voxels = sitk.GetArrayFromImage(image)  # (k, j, i)
    if labelmap and not np.issubdtype(voxels.dtype, np.integer):
        voxels = np.rint(voxels).astype(np.int16)
    voxels = np.ascontiguousarray(voxels.astype(_PIXEL_TYPES.get(voxels.dtype, np.float32), copy=False))
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    elif not node.IsA(class_name):
        raise TypeError(f"volume_node_from_image: node {node.GetName()!r} is a {node.GetClassName()}, "
                        f"expected {class_name}.")
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_image(image)))
    slicer.util.updateVolumeFromArray(node, voxels)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _world_matrix(node) -> np.ndarray | None:
    """(4, 4) parent-transform-to-world matrix when linear, None when the transform chain is non-linear."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        return None
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _numpy_matrix(matrix)


def _image_from_untransformed(node, ijk_to_ras: np.ndarray) -> sitk.Image:
    voxels = slicer.util.arrayFromVolume(node)  # (k, j, i) view
    if voxels is None or voxels.ndim != 3:
        raise ValueError(f"volume node {node.GetName()!r} holds no 3-D single-component image data.")
    linear = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"volume node {node.GetName()!r} has a zero voxel spacing; its geometry is broken.")
    direction_lps = LPS_TO_RAS @ (linear / spacing[None, :])
    image = sitk.GetImageFromArray(np.array(voxels))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in LPS_TO_RAS @ ijk_to_ras[:3, 3]])
    image.SetDirection([float(v) for v in direction_lps.ravel()])
    return image


def image_from_volume_node(node) -> sitk.Image:
    """The node's voxels as a SimpleITK image in world LPS mm (parent transforms applied).

    Linear parent transforms are composed into the grid (no resampling, so a tilted grid keeps its voxel
    values); non-linear ones are hardened on a temporary copy of the node, which Slicer resamples. The
    voxel type is kept; numpy views of the result are (z, y, x).
    """
    world = _world_matrix(node)
    if world is not None:
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return _image_from_untransformed(node, world @ _numpy_matrix(matrix))
    scene = node.GetScene()
    copy = scene.AddNewNodeByClass(node.GetClassName(), f"{node.GetName()} (hardened)")
    try:
        copy.Copy(node)
        copy.SetName(f"{node.GetName()} (hardened)")
        copy.SetAndObserveImageData(node.GetImageData())
        copy.SetAndObserveTransformNodeID(node.GetTransformNodeID())
        slicer.vtkSlicerTransformLogic.hardenTransform(copy)
        matrix = vtk.vtkMatrix4x4()
        copy.GetIJKToRASMatrix(matrix)
        return _image_from_untransformed(copy, _numpy_matrix(matrix))
    finally:
        scene.RemoveNode(copy)


def _dicom_warnings(node) -> list[str]:
    """Header warnings (contrast, lossy compression, RescaleType) for a node loaded by Slicer's DICOM
    plugin: its "DICOM.instanceUIDs" attribute names the instances, the DICOM database their files; the
    headers go through the same ``dicom_series`` checks as files loaded by ``load_ct``."""
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return []
    paths = [Path(p) for p in (database.fileForInstance(uid) for uid in uids[:1] + uids[-1:]) if p]
    headers = [read_header(path) for path in paths if path.is_file()]
    slices = [h for found in headers if not isinstance(found, str) for h in found]
    if not slices:
        return []
    return [w for w in series_warnings(DicomSeries(uid=slices[0].series_instance_uid, slices=slices))
            if not w.startswith("slice orientations differ")]


def ct_volume_from_node(node) -> CTVolume:
    """A head CT from a Slicer volume node, checked exactly as ``load_ct`` checks files.

    Returns a CTVolume: float32 HU, world LPS geometry (parent transforms applied) on an orthogonal grid
    (a sheared grid is resampled, as for files), NaN/inf voxels set to air with a warning, voxels below
    -1024 HU set to air; contrast / lossy / RescaleType warnings when the node came from Slicer's DICOM
    plugin. Raises CTInputError naming the node when the grid or values cannot be a head CT in HU.
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise ct_checks.CTInputError(f"the input must be a scalar CT volume node; got {kind}. Select a CT volume.")
    name = f"Slicer volume '{node.GetName()}'"
    notes = []
    if node.GetParentTransformNode() is not None:
        linear = node.GetParentTransformNode().IsTransformToWorldLinear()
        notes.append(f"parent transform '{node.GetParentTransformNode().GetName()}' applied "
                     + ("to the geometry" if linear else "by resampling (non-linear, e.g. gantry-tilt correction)"))
    raw = image_from_volume_node(node)
    warnings = ct_checks.check_grid(name, raw.GetSize(), raw.GetSpacing(), raw.GetDirection())
    grid, sheared = orthogonal_image(sitk.Cast(raw, sitk.sitkFloat32), name)
    image, value_warnings, value_notes = ct_checks.checked_values(name, grid, None)
    provenance = {"format": "slicer", "node_name": node.GetName(), "node_id": node.GetID(),
                  "stored_pixel_type": sitk.GetPixelIDValueAsString(raw.GetPixelID()), "hu_offset": None}
    return CTVolume(image=image, warnings=warnings + sheared + value_warnings + _dicom_warnings(node),
                    notes=notes + value_notes, provenance=provenance)
