"""Real DICOM series stacked into volumes for the 3-D augmentation and 3-D SwAV tests."""
from __future__ import annotations

import numpy as np
import pydicom


def load_series(folder):
    """[D, H, W] float32 volume in [0, 1] (modality LUT applied, min-max) and its (z, y, x) spacing,
    slices sorted by their position along the normal of the image plane."""
    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    row, col = (np.asarray(slices[0].ImageOrientationPatient, np.float64).reshape(2, 3))
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))))
    pos = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))) for ds in slices]
    vol = np.stack([ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
                    + float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in slices])
    vol = (vol - vol.min()) / max(vol.max() - vol.min(), 1e-12)
    dz = float(np.median(np.diff(pos)))
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    return vol.astype(np.float32), (dz, dy, dx)
