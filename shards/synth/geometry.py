"""Physical-space geometry for the synthetic generator.

Anatomy lives in millimetres in a patient frame: x = left→right (lateral is +x), y = posterior→
anterior, z = inferior→superior. Each imaging plane samples that frame on its own axis-aligned grid
(slices, rows, cols), so one anatomy and one set of findings appear consistently in all planes,
each with its own anisotropic spacing. Primitives only evaluate inside their bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Physical axis of (slices, rows, cols) per plane, and whether that grid axis runs high→low.
PLANE_AXES = {"sag": ("x", "z", "y"), "cor": ("y", "z", "x"), "ax": ("z", "y", "x")}
PLANE_DESCENDING = {"sag": (False, True, True), "cor": (False, True, False), "ax": (False, True, False)}
AXIS_INDEX = {"x": 0, "y": 1, "z": 2}


@dataclass
class PlaneGrid:
    """Sample positions of one plane. ``sub`` sub-slices per slice model slice thickness."""

    plane: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sub: int = 3

    def axis_coords(self) -> list[np.ndarray]:
        coords = []
        for dim, (n, step, desc) in enumerate(zip(self.shape, self.spacing, PLANE_DESCENDING[self.plane])):
            if dim == 0:  # sub-slices spread over the slice thickness
                c = (np.arange(n * self.sub) + 0.5) * (step / self.sub) - n * step / 2
            else:
                c = (np.arange(n) + 0.5) * step - n * step / 2
            coords.append((c[::-1] if desc else c).astype(np.float32))
        return coords

    @property
    def dense_shape(self) -> tuple[int, int, int]:
        return (self.shape[0] * self.sub, self.shape[1], self.shape[2])


class Sampler:
    """Broadcastable physical coordinates for index sub-blocks of a plane grid."""

    def __init__(self, grid: PlaneGrid):
        self.grid = grid
        self.coords = grid.axis_coords()
        self.axes = PLANE_AXES[grid.plane]

    def block(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices covering the physical box [lo, hi] and the X, Y, Z arrays on that block."""
        slices, xyz = [], [None, None, None]
        for dim, axis in enumerate(self.axes):
            a = AXIS_INDEX[axis]
            c = self.coords[dim]
            idx = np.nonzero((c >= lo[a]) & (c <= hi[a]))[0]
            if idx.size == 0:
                return None, None
            s = slice(int(idx.min()), int(idx.max()) + 1)
            slices.append(s)
            shape = [1, 1, 1]
            shape[dim] = s.stop - s.start
            xyz[a] = c[s].reshape(shape)
        return tuple(slices), xyz


def _rot(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


@dataclass
class Ellipsoid:
    center: np.ndarray
    radii: np.ndarray
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def bbox(self):
        r = float(np.max(self.radii))
        return self.center - r, self.center + r

    def distance(self, x, y, z):
        """Normalised radius: < 1 inside."""
        rot = _rot(self.angles).T
        d = [x - self.center[0], y - self.center[1], z - self.center[2]]
        q = [rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2] for i in range(3)]
        return np.sqrt(sum((q[i] / self.radii[i]) ** 2 for i in range(3)))

    def inside(self, x, y, z):
        return self.distance(x, y, z) < 1.0


@dataclass
class Capsule:
    """All points within ``radius`` of the segment p0–p1 (tendons, ligaments, bone shafts)."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float

    def bbox(self):
        return np.minimum(self.p0, self.p1) - self.radius, np.maximum(self.p0, self.p1) + self.radius

    def along(self, x, y, z):
        v = self.p1 - self.p0
        d = [x - self.p0[0], y - self.p0[1], z - self.p0[2]]
        return np.clip((d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / float(v @ v), 0.0, 1.0)

    def distance(self, x, y, z):
        t = self.along(x, y, z)
        p = [self.p0[i] + t * (self.p1[i] - self.p0[i]) for i in range(3)]
        return np.sqrt((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / self.radius

    def inside(self, x, y, z):
        return self.distance(x, y, z) < 1.0

    def point(self, t: float) -> np.ndarray:
        return self.p0 + t * (self.p1 - self.p0)


@dataclass
class Ring:
    """A C-shaped tube around ``center`` in the plane normal to ``axis`` (menisci, labrum)."""

    center: np.ndarray
    major: float
    minor: float
    axis: str = "z"
    arc: tuple[float, float] = (0.0, 360.0)

    def bbox(self):
        r = self.major + self.minor
        return self.center - r, self.center + r

    def _local(self, x, y, z):
        d = [x - self.center[0], y - self.center[1], z - self.center[2]]
        a = AXIS_INDEX[self.axis]
        u, v = [d[i] for i in range(3) if i != a]
        return u, v, d[a]

    def distance(self, x, y, z):
        u, v, w = self._local(x, y, z)
        rho = np.sqrt(u ** 2 + v ** 2)
        return np.sqrt((rho - self.major) ** 2 + w ** 2) / self.minor

    def inside(self, x, y, z):
        u, v, _ = self._local(x, y, z)
        ang = np.degrees(np.arctan2(v, u)) % 360.0
        lo, hi = self.arc
        in_arc = (ang >= lo) & (ang <= hi) if lo <= hi else (ang >= lo) | (ang <= hi)
        return (self.distance(x, y, z) < 1.0) & in_arc


@dataclass
class Shell:
    """The band between an ellipsoid and the same ellipsoid grown by ``thickness`` mm, kept where
    the coordinate ``axis`` is on the ``side`` (+1/-1) of the centre (articular cartilage)."""

    inner: Ellipsoid
    thickness: float
    axis: str = "z"
    side: int = -1

    def bbox(self):
        lo, hi = self.inner.bbox()
        return lo - self.thickness, hi + self.thickness

    def inside(self, x, y, z):
        outer = Ellipsoid(self.inner.center, self.inner.radii + self.thickness, self.inner.angles)
        coord = (x, y, z)[AXIS_INDEX[self.axis]] - self.inner.center[AXIS_INDEX[self.axis]]
        return outer.inside(x, y, z) & ~self.inner.inside(x, y, z) & (coord * self.side > 0)


@dataclass
class Blob:
    """A soft Gaussian weight (findings): 1 at the centre, fading over ``sigma`` mm per axis."""

    center: np.ndarray
    sigma: np.ndarray

    def bbox(self):
        return self.center - 3 * self.sigma, self.center + 3 * self.sigma

    def weight(self, x, y, z):
        return np.exp(-0.5 * sum(((c - self.center[i]) / self.sigma[i]) ** 2
                                 for i, c in enumerate((x, y, z)))).astype(np.float32)


def paint(labels: np.ndarray, sampler: Sampler, shape, value: int) -> None:
    """Set ``labels`` to ``value`` inside ``shape`` (painter's order: later shapes win)."""
    lo, hi = shape.bbox()
    sl, xyz = sampler.block(lo, hi)
    if sl is None:
        return
    mask = np.broadcast_to(shape.inside(*xyz), labels[sl].shape)
    labels[sl][mask] = value


def blend(image: np.ndarray, sampler: Sampler, blob: Blob, toward: np.ndarray | float,
          amount: float, within: np.ndarray | None = None) -> None:
    """Move ``image`` toward ``toward`` by ``amount`` × the blob weight (optionally only where
    ``within`` is true). ``toward`` may be an image of the same shape."""
    lo, hi = blob.bbox()
    sl, xyz = sampler.block(lo, hi)
    if sl is None or amount == 0:
        return
    w = np.broadcast_to(blob.weight(*xyz), image[sl].shape) * amount
    if within is not None:
        w = w * within[sl]
    target = toward[sl] if isinstance(toward, np.ndarray) else toward
    image[sl] += w * (target - image[sl])
