"""The phantom's anatomy: tissue labels and structure masks, laid out in mm around the field of view's centre."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import PhantomConfig
from .geometry import Box, Grid, bezier, ellipse2d, paint, tube, union_box
from .structures import _VERTEBRAE, ANATOMY_PATHS


# Tissue label ids. Each structure owns a contiguous id range so that its mask is one range test.
_AIR, _FAT, _SOFT, _DISC, _CANAL = 0, 1, 2, 3, 4
_BRONCHUS_WALL, _BRONCHUS_LUMEN, _VESSEL = 5, 6, 7  # main bronchi, pulmonary arteries and vena cava: unlabelled
_LUNG_RIGHT, _LUNG_VESSEL_RIGHT, _LUNG_LEFT, _LUNG_VESSEL_LEFT = 8, 9, 10, 11
_LIVER, _SPLEEN, _STOMACH_WALL, _STOMACH_FLUID, _STOMACH_GAS = 12, 13, 14, 15, 16
_HEART_WALL, _HEART_BLOOD = 17, 18
_AORTA = 19
_ESOPHAGUS = 20
_TRACHEA_WALL, _TRACHEA_LUMEN = 21, 22
_VERT_CORTEX, _VERT_CANCELLOUS, _VERT_POSTERIOR = 23, 24, 25
_RIB_CORTEX, _RIB_MARROW = 26, 27
_STERNUM_CORTEX, _STERNUM_MARROW = 28, 29
_N_LABELS = 30

_STRUCTURE_LABELS = {
    "lung_right": (_LUNG_RIGHT, _LUNG_VESSEL_RIGHT),  # intrapulmonary vessels belong to the lung
    "lung_left": (_LUNG_LEFT, _LUNG_VESSEL_LEFT),
    "heart": (_HEART_WALL, _HEART_BLOOD),
    "aorta": (_AORTA, _AORTA),
    "trachea": (_TRACHEA_WALL, _TRACHEA_LUMEN),
    "esophagus": (_ESOPHAGUS, _ESOPHAGUS),
    "liver": (_LIVER, _LIVER),
    "spleen": (_SPLEEN, _SPLEEN),
    "stomach": (_STOMACH_WALL, _STOMACH_GAS),
    "vertebrae": (_VERT_CORTEX, _VERT_POSTERIOR),
    "ribs": (_RIB_CORTEX, _RIB_MARROW),
    "sternum": (_STERNUM_CORTEX, _STERNUM_MARROW),
}


@dataclass
class Anatomy:
    labels: np.ndarray  # (D, H, W) uint8 tissue labels
    masks: dict[str, np.ndarray]
    lung_box: Box  # box holding both lungs, for the parenchyma texture


@dataclass
class _Patient:
    """Random patient-level geometry in mm (z superior, y posterior, x patient-left), shared by the builders."""

    cy: float  # body centre
    cx: float
    body_semi: tuple[float, float]  # (AP, LR) semi-axes of the skin outline
    fat: float  # subcutaneous fat thickness
    cavity_semi: tuple[float, float]  # inner chest wall at full width
    apex: float  # z of the lung apices
    dome_right: float  # z of the top of the right hemidiaphragm
    dome_left: float
    t1_top: float  # z of the upper endplate of T1
    spine_y: float  # y of the vertebral body centres
    carina: tuple[float, float, float]  # (z, y, x) of the tracheal bifurcation

    def taper(self, z: np.ndarray) -> np.ndarray:
        """Relative width of the thoracic cage at height z: 1 below the mid-chest, narrowing to the apex."""
        u = np.clip((z - 30.0) / (self.apex - 30.0 + 10.0), 0.0, 1.0)
        return 1.0 - 0.22 * u**1.5

    def in_cavity(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ellipse2d(y, x, (self.cy, self.cx), self.cavity_semi) <= self.taper(z) ** 2

    def diaphragm(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the diaphragm surface over (y, x): two domes, deeper laterally and in the posterior recesses."""
        ry = (y - self.cy) / 90.0
        domes = [
            top - 55.0 * ((x - (self.cx + side * 55.0)) / 75.0) ** 2 - 35.0 * ry**2 - 20.0 * ry
            for top, side in ((self.dome_right, -1.0), (self.dome_left, 1.0))
        ]
        return np.maximum(*domes)


def build_anatomy(grid: Grid, rng: np.random.Generator, cfg: PhantomConfig) -> Anatomy:
    """Paint the tissue label volume, later structures over earlier ones, and cut the structure masks from it."""
    jit, sj = cfg.position_jitter_mm, cfg.size_jitter

    def offset(scale: float = 1.0) -> float:
        return float(rng.uniform(-jit, jit)) * scale

    def grow() -> float:
        return 1.0 + float(rng.uniform(-sj, sj))

    scale = grow()
    gz, gy, gx = offset(), offset(), offset()
    body_semi = (115.0 * scale, 160.0 * scale)
    fat = float(rng.uniform(8.0, 25.0))
    wall = fat + 14.0  # fat + chest-wall muscle
    dome_right = -35.0 + gz + offset(0.5)
    t1_top = 122.0 + gz + offset(0.3)
    p = _Patient(
        cy=10.0 + gy,
        cx=gx,
        body_semi=body_semi,
        fat=fat,
        cavity_semi=(body_semi[0] - wall, body_semi[1] - wall),
        apex=128.0 + gz + offset(0.5),
        dome_right=dome_right,
        dome_left=dome_right - 15.0 + offset(0.5),
        t1_top=t1_top,
        spine_y=10.0 + gy + 48.0 + offset(0.3),
        carina=(t1_top - 72.0 + offset(0.3), 2.0 + gy + offset(0.3), gx - 3.0 + offset(0.3)),
    )
    labels = np.zeros(grid.shape, dtype=np.uint8)
    boxes: dict[str, Box] = {}

    _body(grid, labels, p)
    _abdomen(grid, labels, p)
    boxes["lung_right"], boxes["lung_left"], fissures = _lungs(grid, labels, p, rng, offset, grow)
    boxes["spleen"], boxes["stomach"] = _spleen_and_stomach(grid, labels, p, offset, grow)
    boxes["liver"] = _liver(grid, labels, p, offset, grow)
    boxes["heart"] = _heart(grid, labels, p, rng, offset, grow)
    hila = _great_vessels(grid, labels, p, offset)
    for hilum, lung, vessel, box in zip(
        hila,
        (_LUNG_RIGHT, _LUNG_LEFT),
        (_LUNG_VESSEL_RIGHT, _LUNG_VESSEL_LEFT),
        (boxes["lung_right"], boxes["lung_left"]),
        strict=True,
    ):
        _lung_vessels(grid, labels, rng, hilum, lung, vessel, box)
    boxes["esophagus"] = _esophagus(grid, labels, p, offset)
    boxes["aorta"] = _aorta(grid, labels, p, offset)
    boxes["trachea"] = _airways(grid, labels, p)
    boxes["vertebrae"], level_boxes = _spine(grid, labels, p)
    rib_voxels: dict[str, np.ndarray] = {}
    if cfg.ribs:
        boxes["ribs"], boxes["sternum"], rib_voxels = _ribs_and_sternum(grid, labels, p, rng)

    masks = {"body": labels != _AIR}
    for name, box in boxes.items():
        lo, hi = _STRUCTURE_LABELS[name]
        mask = np.zeros(grid.shape, dtype=bool)
        local = labels[box]
        mask[box] = (local >= lo) & (local <= hi) if lo != hi else local == lo
        masks[name] = mask
    masks.update(_split_lobes(grid, masks, boxes, fissures))
    if cfg.bone_levels:
        for name, box in level_boxes.items():
            masks[name] = np.zeros(grid.shape, dtype=bool)
            masks[name][box] = masks["vertebrae"][box]
        for name, flat in rib_voxels.items():
            masks[name] = np.zeros(grid.shape, dtype=bool)
            masks[name].reshape(-1)[flat] = True
    order = {name: i for i, name in enumerate(ANATOMY_PATHS)}
    masks = dict(sorted(masks.items(), key=lambda item: order[item[0]]))
    return Anatomy(labels, masks, union_box(boxes["lung_right"], boxes["lung_left"]))


def _body(grid: Grid, labels: np.ndarray, p: _Patient) -> None:
    """Skin outline (a squarish super-ellipse, the same on every slice), subcutaneous fat and muscle."""
    y, x = grid.y[:, None], grid.x[None, :]
    power = 2.4
    outer = np.abs((y - p.cy) / p.body_semi[0]) ** power + np.abs((x - p.cx) / p.body_semi[1]) ** power <= 1
    inner_semi = (p.body_semi[0] - p.fat, p.body_semi[1] - p.fat)
    inner = np.abs((y - p.cy) / inner_semi[0]) ** power + np.abs((x - p.cx) / inner_semi[1]) ** power <= 1
    section = np.where(inner, np.uint8(_SOFT), np.where(outer, np.uint8(_FAT), np.uint8(_AIR)))
    labels[...] = section  # (H, W) → every slice


def _abdomen(grid: Grid, labels: np.ndarray, p: _Patient) -> None:
    """Below the diaphragm: intra-abdominal fat under a 6 mm diaphragm muscle (organs are painted over it)."""
    cay, cax = p.cavity_semi
    box = grid.box((-1e4, p.cy - cay, p.cx - cax), (max(p.dome_right, p.dome_left), p.cy + cay, p.cx + cax))
    z, y, x = grid.coords(box)
    inside = ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1  # (1, h, w)
    dome = p.diaphragm(y, x)
    below = inside & (z < dome)
    paint(labels, box, below, _FAT)
    paint(labels, box, below & (z >= dome - 6.0), _SOFT)


def _lungs(grid: Grid, labels: np.ndarray, p: _Patient, rng, offset, grow):
    """Mediastinal fat, then both lungs: ellipsoids cut by the chest wall, the diaphragm and the mediastinum."""
    # Mediastinum: an elliptic column between the lungs, fat above the diaphragm.
    med_centre, med_semi = (p.cy - 5.0, p.cx + 2.0), (72.0, 28.0 * grow())
    box = grid.box(
        (-200.0, med_centre[0] - med_semi[0], med_centre[1] - med_semi[1]),
        (200.0, med_centre[0] + med_semi[0], med_centre[1] + med_semi[1]),
    )
    z, y, x = grid.coords(box)
    column = ellipse2d(y, x, med_centre, med_semi) <= 1
    paint(labels, box, column & (z > p.diaphragm(y, x)) & (z < p.apex + 10.0), _FAT)

    lung_boxes, fissures = [], {}
    cay, cax = p.cavity_semi
    for side, label in ((-1.0, _LUNG_RIGHT), (1.0, _LUNG_LEFT)):
        s = grow()
        semi = (170.0 * s, cay + 10.0, (0.5 * cax + 2.0) * (1.0 if side < 0 else 0.95))
        centre = (p.apex - semi[0], p.cy + 2.0 + offset(0.3), p.cx + side * (0.5 * cax + 4.0) + offset(0.3))
        box = grid.around(centre, semi)
        z, y, x = grid.coords(box)
        inside = ((z - centre[0]) / semi[0]) ** 2 + ellipse2d(y, x, centre[1:], semi[1:]) <= 1
        inside &= p.in_cavity(z, y, x)
        inside &= z > p.diaphragm(y, x)
        inside &= ~(ellipse2d(y, x, med_centre, med_semi) <= 1)
        paint(labels, box, inside, label)
        lung_boxes.append(box)
        # Oblique fissure z = z0 + slope (y - cy): the lower lobe is below/behind it (posterior-inferior).
        fissures[label] = {
            "oblique": (-5.0 + offset(0.5), 0.9 + float(rng.uniform(-0.08, 0.08))),
            "horizontal": 5.0 + offset(0.5),  # right lung only: upper/middle lobe boundary
            "cy": p.cy,
        }
    return lung_boxes[0], lung_boxes[1], fissures


def _split_lobes(grid: Grid, masks: dict[str, np.ndarray], boxes: dict[str, Box], fissures) -> dict[str, np.ndarray]:
    """Lobe masks: each lung cut by its oblique fissure (and, on the right, the horizontal fissure)."""
    lobes = {}
    for name, label in (("lung_right", _LUNG_RIGHT), ("lung_left", _LUNG_LEFT)):
        box, f = boxes[name], fissures[label]
        z, y, _ = grid.coords(box)
        lung = masks[name][box]
        z0, slope = f["oblique"]
        lower = z < z0 + slope * (y - f["cy"])  # (d, h, 1)
        parts = {"lower": lung & lower}
        if label == _LUNG_RIGHT:
            middle = z < f["horizontal"]
            parts["middle"] = lung & ~lower & middle
            parts["upper"] = lung & ~lower & ~middle
        else:
            parts["upper"] = lung & ~lower
        side = "right" if label == _LUNG_RIGHT else "left"
        for part, local in parts.items():
            mask = np.zeros(grid.shape, dtype=bool)
            mask[box] = local
            lobes[f"lung_{part}_lobe_{side}"] = mask
    return lobes


def _liver(grid: Grid, labels: np.ndarray, p: _Patient, offset, grow) -> Box:
    """Liver: right upper abdomen under the diaphragm; its left lobe is thinner and anterior."""
    s = grow()
    semi = (80.0 * s, 85.0 * s, 100.0 * s)
    centre = (p.dome_right - 65.0 + offset(0.5), p.cy + offset(0.5), p.cx - 45.0 + offset())
    box = grid.around(centre, semi)
    z, y, x = grid.coords(box)
    inside = ((z - centre[0]) / semi[0]) ** 2 + ellipse2d(y, x, centre[1:], semi[1:]) <= 1
    inside &= z < p.diaphragm(y, x) - 6.0  # below the diaphragm muscle
    inside &= ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1  # inside the abdominal wall
    inside &= (y - p.cy) < 90.0 - 1.2 * np.maximum(x - p.cx + 10.0, 0.0)  # the left lobe is anterior only
    paint(labels, box, inside, _LIVER)
    return box


def _spleen_and_stomach(grid: Grid, labels: np.ndarray, p: _Patient, offset, grow) -> tuple[Box, Box]:
    """Spleen (posterior-left) and stomach (anterior-left: 4 mm wall, fluid, gas rising anteriorly) under the
    left hemidiaphragm."""

    def organ(centre, semi) -> tuple[Box, np.ndarray, np.ndarray]:
        box = grid.around(centre, semi)
        z, y, x = grid.coords(box)
        r2 = ((z - centre[0]) / semi[0]) ** 2 + ellipse2d(y, x, centre[1:], semi[1:])
        allowed = (z < p.diaphragm(y, x) - 6.0) & (ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1)
        return box, r2, allowed & (r2 <= 1)

    cay, cax = p.cavity_semi  # organs sit relative to the abdominal wall, whatever the body size
    s = grow()
    spleen_box, _, spleen = organ(
        (p.dome_left - 45.0 + offset(0.5), p.cy + 0.55 * cay + offset(0.5), p.cx + cax - 32.0 + offset(0.3)),
        (50.0 * s, 50.0 * s, 25.0 * s),
    )
    paint(labels, spleen_box, spleen, _SPLEEN)
    s = grow()
    semi = (55.0 * s, 45.0 * s, 40.0 * s)
    centre = (p.dome_left - 50.0 + offset(0.5), p.cy - 15.0 + offset(0.5), p.cx + 0.45 * cax + offset(0.5))
    box, r2, stomach = organ(centre, semi)
    lumen = stomach & (r2 <= (1 - 4.0 / min(semi)) ** 2)
    _, y, _ = grid.coords(box)
    paint(labels, box, stomach, _STOMACH_WALL)
    paint(labels, box, lumen, _STOMACH_FLUID)
    paint(labels, box, lumen & (y < centre[1] - 0.55 * semi[1]), _STOMACH_GAS)  # supine: gas is anterior
    return spleen_box, box


def _heart(grid: Grid, labels: np.ndarray, p: _Patient, rng, offset, grow) -> Box:
    """Heart: an ellipsoid whose long axis points anterior-left-inferior, wrapped in pericardial fat."""
    s = grow()
    semi = (52.0 * s, 68.0 * s, 50.0 * s)  # (z, long axis, short axis)
    centre = (p.dome_left + 28.0 + offset(0.5), p.cy - 30.0 + offset(0.5), p.cx + 22.0 + offset(0.5))
    angle = math.radians(35.0 + float(rng.uniform(-8.0, 8.0)))
    box = grid.around(centre, (semi[0] + 5.0, semi[1] + 5.0, semi[1] + 5.0))
    z, y, x = grid.coords(box)
    dy, dx = y - centre[1], x - centre[2]
    u = dx * math.cos(angle) - dy * math.sin(angle)  # towards patient-left and anterior
    v = dx * math.sin(angle) + dy * math.cos(angle)
    dz = z - centre[0]
    cavity = p.in_cavity(z, y, x)

    def radius2(grow_mm: float) -> np.ndarray:
        a, b, c = semi[0] + grow_mm, semi[1] + grow_mm, semi[2] + grow_mm
        return (dz / a) ** 2 + (u / b) ** 2 + (v / c) ** 2

    paint(labels, box, (radius2(4.0) <= 1) & cavity, _FAT)  # pericardial fat
    heart = (radius2(0.0) <= 1) & cavity
    paint(labels, box, heart, _HEART_WALL)
    paint(labels, box, heart & (radius2(-8.0) <= 1), _HEART_BLOOD)  # 8 mm myocardium
    return box


def _great_vessels(grid: Grid, labels: np.ndarray, p: _Patient, offset) -> list[np.ndarray]:
    """Superior vena cava, pulmonary trunk and pulmonary arteries (unlabelled). Returns the right and left hila
    (the ends of the pulmonary arteries, inside the lungs) in mm."""
    cz = p.carina[0]
    cy, cx = p.cy + offset(0.3), p.cx + offset(0.3)
    bifurcation = [cz - 15.0, cy - 15.0, cx + 25.0]
    right = np.array([bifurcation, [cz - 22.0, cy - 17.0, cx - 20.0], [cz - 25.0, cy - 12.0, cx - 52.0]])
    left = np.array([bifurcation, [cz - 5.0, cy + 8.0, cx + 50.0]])
    for points, radius in (
        ([[110.0, cy - 35.0, cx - 28.0], [p.dome_left + 45.0, cy - 30.0, cx - 27.0]], [10.0, 10.0]),  # SVC
        ([[p.dome_left + 60.0, cy - 50.0, cx + 30.0], bifurcation], [13.0, 13.0]),  # pulmonary trunk
        (right, [9.0, 8.0, 7.0]),
        (left, [9.0, 7.0]),
    ):
        tube(grid, labels, np.array(points), np.array(radius), _VESSEL)
    return [right[-1], left[-1]]


def _lung_vessels(
    grid: Grid, labels: np.ndarray, rng: np.random.Generator, hilum: np.ndarray, lung: int, vessel: int, box: Box
) -> None:
    """A three-generation pulmonary vessel tree from the hilum, drawn only over that lung's parenchyma.

    Branches head for random lung voxels: 5 from the hilum (radius 4 → 2.8 mm), 3 from each of their ends
    (2.4 → 1.6 mm) and 2 from each of those (1.4 → 0.9 mm).
    """
    idx = np.stack([rng.integers(s.start, max(s.stop, s.start + 1), size=600) for s in box], axis=1)
    idx = idx[labels[idx[:, 0], idx[:, 1], idx[:, 2]] == lung]
    if len(idx) == 0:
        return
    targets = np.stack([grid.z[idx[:, 0]], grid.y[idx[:, 1]], grid.x[idx[:, 2]]], axis=1).astype(np.float64)

    def branch(start: np.ndarray, outward: np.ndarray | None, max_length: float, r0: float, r1: float):
        picks = targets[rng.integers(len(targets), size=8)]
        if outward is not None:
            picks = picks[(picks - start) @ outward > 0]  # keep heading away from the hilum
        if len(picks) == 0:
            return None
        step = picks[0] - start
        length = float(np.linalg.norm(step))
        end = start + step * min(0.55, max_length / max(length, 1e-6))
        tube(grid, labels, np.array([start, end]), np.array([r0, r1]), vessel, within=lung)
        return end

    for _ in range(5):
        end1 = branch(hilum, None, 1e4, 4.0, 2.8)
        for _ in range(3 if end1 is not None else 0):
            end2 = branch(end1, end1 - hilum, 50.0, 2.4, 1.6)
            for _ in range(2 if end2 is not None else 0):
                branch(end2, end2 - end1, 30.0, 1.4, 0.9)


def _esophagus(grid: Grid, labels: np.ndarray, p: _Patient, offset) -> Box:
    """Esophagus: behind the trachea, in front of the spine, turning left through the diaphragm to the stomach."""
    shift = np.array([offset(0.3), offset(0.3), offset(0.3)])
    points = np.array([[200.0, p.cy + 15, p.cx + 3], [-40.0, p.cy + 14, p.cx + 8], [-85.0, p.cy, p.cx + 35]])
    return tube(grid, labels, points + shift, np.full(3, 7.5), _ESOPHAGUS)


def _aorta(grid: Grid, labels: np.ndarray, p: _Patient, offset) -> Box:
    """Aorta: root inside the heart, ascending anterior, arch over the left main bronchus, descending left of
    the spine into the abdomen."""
    shift = np.array([offset(0.5), offset(0.5), offset(0.5)])
    cy, cx = p.cy, p.cx
    ascending = np.array([[p.dome_left + 45.0, cy - 30.0, cx + 2.0], [60.0, cy - 38.0, cx + 4.0]])
    arch = bezier((60.0, cy - 38.0, cx + 4.0), (100.0, cy - 5.0, cx + 24.0), (62.0, cy + 28.0, cx + 26.0))
    descending = np.array([[-90.0, cy + 28.0, cx + 24.0], [-200.0, cy + 26.0, cx + 8.0]])
    points = np.concatenate([ascending, arch[1:], descending]) + shift
    radius = np.concatenate([[15.0, 15.0], np.linspace(15.0, 12.0, len(arch) - 1), [12.0, 11.0]])
    return tube(grid, labels, points, radius, _AORTA)


def _airways(grid: Grid, labels: np.ndarray, p: _Patient) -> Box:
    """Trachea (lumen + 2 mm wall) down to the carina, then the two main bronchi (not in the trachea mask)."""
    carina = np.array(p.carina)
    trachea = np.array([[220.0, carina[1], carina[2]], carina])
    right = np.array([carina, carina + [-25.0, 6.0, -35.0]])
    left = np.array([carina, carina + [-35.0, 10.0, 43.0]])
    # All walls first, then all lumens, so that no wall covers the lumen of an airway drawn earlier.
    for points, radius, label in (
        (right, 7.0, _BRONCHUS_WALL),
        (left, 6.0, _BRONCHUS_WALL),
        (trachea, 10.0, _TRACHEA_WALL),
        (right, 5.5, _BRONCHUS_LUMEN),
        (left, 4.5, _BRONCHUS_LUMEN),
        (trachea, 8.0, _TRACHEA_LUMEN),
    ):
        box = tube(grid, labels, points, np.full(len(points), radius), label)
        if label == _TRACHEA_WALL:
            trachea_box = box
    return trachea_box


def _spine(grid: Grid, labels: np.ndarray, p: _Patient) -> tuple[Box, dict[str, Box]]:
    """Vertebrae C5-L3 (bodies with cortex and endplates, posterior arch, spinous and transverse processes),
    discs and the spinal canal. Returns the spine box and each level's box."""
    n_levels = len(_VERTEBRAE)
    first_t = 3  # index of T1 in _VERTEBRAE
    # Body heights grow down the spine (mm); discs are thicker in the lumbar spine.
    heights = np.interp(np.arange(n_levels), [0, first_t, first_t + 11, n_levels - 1], [13.0, 17.0, 23.0, 26.0])
    discs = np.where(np.arange(n_levels) >= first_t + 12, 8.0, 4.5)
    tops = np.empty(n_levels)
    tops[first_t] = p.t1_top
    for i in range(first_t + 1, n_levels):
        tops[i] = tops[i - 1] - heights[i - 1] - discs[i - 1]
    for i in range(first_t - 1, -1, -1):
        tops[i] = tops[i + 1] + discs[i] + heights[i]

    body_semi_y = np.interp(np.arange(n_levels), [0, first_t, n_levels - 1], [9.0, 12.0, 18.0])
    body_semi_x = np.interp(np.arange(n_levels), [0, first_t, n_levels - 1], [13.0, 15.0, 24.0])
    canal_y = p.spine_y + 14.0 + 8.0
    half = (60.0, 46.0)  # in-plane half extent of the whole vertebra (y, x) around (spine_y + 25, cx)
    centre_y = p.spine_y + 25.0
    box = grid.box((-1e4, centre_y - half[0], p.cx - half[1]), (1e4, centre_y + half[0], p.cx + half[1]))
    _, y, x = grid.coords(box)
    y, x = y[0], x[0]  # (h, 1), (1, w)

    def extrude(z_low: float, z_high: float, area: np.ndarray, label: int) -> None:
        zbox = grid.box((z_low, 0, 0), (z_high, 0, 0))[0]
        sub = (zbox, box[1], box[2])
        paint(labels, sub, area[None], label)

    # Spinal canal (CSF and cord) runs through every level and disc.
    canal = ellipse2d(y, x, (canal_y, p.cx), (8.0, 8.0)) <= 1
    arch = (ellipse2d(y, x, (canal_y, p.cx), (14.0, 13.0)) <= 1) & ~canal
    arch |= ellipse2d(y, x, (canal_y + 22.0, p.cx), (9.0, 4.0)) <= 1  # spinous process
    arch |= ellipse2d(y, x, (canal_y - 2.0, p.cx - 22.0), (5.0, 12.0)) <= 1  # transverse processes
    arch |= ellipse2d(y, x, (canal_y - 2.0, p.cx + 22.0), (5.0, 12.0)) <= 1
    endplate = max(grid.spacing[0], 2.0)
    level_boxes = {}
    for i, name in enumerate(_VERTEBRAE):
        top, bottom = tops[i], tops[i] - heights[i]
        body_r2 = ellipse2d(y, x, (p.spine_y, p.cx), (body_semi_y[i], body_semi_x[i]))
        body = body_r2 <= 1
        cortex_in = (1 - 2.5 / min(body_semi_y[i], body_semi_x[i])) ** 2
        extrude(bottom, top, arch & ~body, _VERT_POSTERIOR)
        extrude(bottom, top, body, _VERT_CORTEX)
        extrude(bottom + endplate, top - endplate, body_r2 <= cortex_in, _VERT_CANCELLOUS)
        extrude(bottom - discs[i], bottom, body, _DISC)
        level_boxes[name] = (grid.box((bottom, 0, 0), (top, 0, 0))[0], box[1], box[2])
    extrude(-1e4, 1e4, canal, _CANAL)
    level_boxes = {k: v for k, v in level_boxes.items() if v[0].stop > v[0].start}
    return box, level_boxes


def _ribs_and_sternum(grid: Grid, labels: np.ndarray, p: _Patient, rng):
    """Twelve pairs of ribs in the chest wall and the sternum.

    Each rib follows the (tapered) inner chest-wall ellipse 5 mm outside the lungs, from the transverse process
    around to the front, dropping ~60 mm from back to front. All ribs are rasterised in one pass over the ring of
    pixels near that ellipse, as a (D, K) problem (K ring pixels), instead of one sweep per rib.

    Returns:
        Rib box, sternum box and ``{"rib_left_4": flat voxel indices, ...}``.
    """
    semi = (p.cavity_semi[0] + 5.0, p.cavity_semi[1] + 5.0)
    dy, dx = grid.y[:, None] - p.cy, grid.x[None, :] - p.cx
    rho = np.sqrt((dy / semi[0]) ** 2 + (dx / semi[1]) ** 2)
    taper = p.taper(grid.z)  # (D,)
    ring = (rho > taper.min() - 0.12) & (rho < 1.12)
    rows, cols = np.nonzero(ring)
    rho_k, dy_k, dx_k = rho[rows, cols], dy[rows, 0], dx[0, cols]
    mm_per_rho = np.sqrt(dy_k**2 + dx_k**2) / np.maximum(rho_k, 1e-6)
    phi = np.arctan2(np.abs(dx_k) / semi[1], dy_k / semi[0]) / np.pi  # 0 at the spine, 1 at the sternum

    # Posterior heights of ribs 1..12 at their vertebrae (T1..T12), spaced like the vertebrae.
    level_z = p.t1_top - 10.0 - np.arange(12) * 24.5 - np.cumsum(np.linspace(0.0, 1.2, 12))
    drop = 60.0 + float(rng.uniform(-8.0, 8.0))
    reach = np.array([0.78] * 7 + [0.72, 0.68, 0.62, 0.5, 0.38])  # anterior end of each rib, as phi

    radial = (rho_k[None, :] - taper[:, None]) * mm_per_rho[None, :]  # (D, K) mm from the rib ellipse
    d_idx, k_idx = np.nonzero(np.abs(radial) < 3.5)
    radial = radial[d_idx, k_idx]
    u = grid.z[d_idx] + drop * phi[k_idx]  # height the point would have at the rib's posterior end
    rib = np.clip(np.rint(np.interp(-u, -level_z, np.arange(12))), 0, 11).astype(int)
    dist = ((u - level_z[rib]) / 6.0) ** 2 + (radial / 3.5) ** 2  # elliptic cross-section, 12 x 7 mm
    keep = (dist <= 1) & (phi[k_idx] >= 0.13) & (phi[k_idx] <= reach[rib])
    d_idx, k_idx, rib, dist = d_idx[keep], k_idx[keep], rib[keep], dist[keep]
    flat = np.ravel_multi_index((d_idx, rows[k_idx], cols[k_idx]), grid.shape)
    labels.reshape(-1)[flat] = np.where(dist > 0.45, _RIB_CORTEX, _RIB_MARROW).astype(np.uint8)
    left = dx_k[k_idx] > 0
    rib_voxels = {
        f"rib_{'left' if is_left else 'right'}_{k + 1}": flat[(rib == k) & (left == is_left)]
        for is_left in (False, True)
        for k in range(12)
    }
    rib_voxels = {name: idx for name, idx in rib_voxels.items() if idx.size}
    rib_box = grid.box((-1e4, -1e4, -1e4), (1e4, 1e4, 1e4))

    # Sternum: a flat elliptic bar in the anterior chest wall from the manubrium to the xiphoid.
    centre = (p.cy - p.cavity_semi[0] - 8.0, p.cx)
    sternum_box = grid.box(
        (p.dome_left - 15.0, centre[0] - 7.0, centre[1] - 15.0), (p.t1_top - 25.0, centre[0] + 7.0, centre[1] + 15.0)
    )
    _, y, x = grid.coords(sternum_box)
    r2 = ellipse2d(y, x, centre, (6.0, 14.0))
    paint(labels, sternum_box, r2 <= 1, _STERNUM_CORTEX)
    paint(labels, sternum_box, r2 <= 0.4, _STERNUM_MARROW)
    return rib_box, sternum_box, rib_voxels
