"""Constants of the embedded synthetic world: grid, land-cover classes, occupancy by zone, surface spectra and backscatter.
"""

from __future__ import annotations

import numpy as np

GENERATOR = "popcorn.datasets.synthetic.world"


#: Same order as ``popcorn.datasets.sentinel.SEASONS`` (the contract in docs/interfaces.md).
SEASONS = ("spring", "summer", "autumn", "winter")


SYNTHETIC_CRS = "EPSG:32632"


PIXEL_SIZE = 10.0  # metres


FINE_FACTOR = 10  # 10 x 10 imagery pixels per 1 ha cell


#: Upper-left corner of the world (UTM 32N, somewhere north of the Alps).
ORIGIN_X = 480_000.0


ORIGIN_Y = 5_260_000.0


MIN_SIZE_PX = 100


S2_BANDS = ("B02", "B03", "B04", "B08")


S1_BANDS = ("VV", "VH")


# --------------------------------------------------------------------------------------------
# Land-cover classes (codes written to land_cover.tif) and occupancy per zone.
URBAN_CENTRE, INNER_TOWN, SUBURB, VILLAGE, INDUSTRIAL = 1, 2, 3, 4, 5


ROAD, PARK, FOREST, FARMLAND, GRASSLAND, WATER = 6, 7, 8, 9, 10, 11


LAND_COVER_CLASSES: dict[int, str] = {
    URBAN_CENTRE: "urban_centre",
    INNER_TOWN: "inner_town",
    SUBURB: "suburb",
    VILLAGE: "village",
    INDUSTRIAL: "industrial_commercial",
    ROAD: "road",
    PARK: "park",
    FOREST: "forest",
    FARMLAND: "farmland",
    GRASSLAND: "grassland",
    WATER: "water",
}


RESIDENTIAL = (URBAN_CENTRE, INNER_TOWN, SUBURB, VILLAGE)


#: Mean people per fully built 10 m pixel (100 m2 of roof), before the multiplicative
#: neighbourhood / block / building variation. Zones not listed hold nobody.
#: Multi-storey apartment blocks in the centre hold ~4x the residents of a detached house
#: per m2 of roof (floors x dwelling size), as in European towns.
OCCUPANCY: dict[str, float] = {
    "urban_centre": 5.5,
    "inner_town": 3.2,
    "suburb": 1.4,
    "village": 1.2,
    "industrial_commercial": 0.0,
}


#: Share of the blocks in a residential zone that hold no residents (shops, offices and
#: schools in towns, farm buildings in villages). Their roofs are flat commercial roofs.
NON_RESIDENTIAL_BLOCKS: dict[str, float] = {
    "urban_centre": 0.15,
    "inner_town": 0.10,
    "suburb": 0.05,
    "village": 0.15,
}


#: Relative std (lognormal sigma) of the multiplicative occupancy variation.
OCCUPANCY_SIGMA = {"neighbourhood": 0.2, "block": 0.3, "building": 0.15}


# Street-grid parameters per zone: street period (px), street half width (px), lot size target
# (px), roof half-size range (px), probability that a lot holds a building, share of the
# non-roof, non-street ground that is paved (rest: gardens, yards).
_ZONE_GRID = {
    #              period hw   lot  hs_lo hs_hi occ  paved
    URBAN_CENTRE: (10.5, 1.0, 4.3, 1.6, 2.05, 0.97, 0.75),
    INNER_TOWN: (12.5, 1.0, 4.6, 1.25, 1.95, 0.92, 0.45),
    SUBURB: (14.0, 0.9, 6.2, 1.1, 1.8, 0.85, 0.20),
    VILLAGE: (16.0, 0.8, 6.2, 1.0, 1.75, 0.95, 0.25),
    INDUSTRIAL: (24.0, 1.2, 10.5, 2.6, 4.6, 0.9, 0.75),
}


# --------------------------------------------------------------------------------------------
# Spectra (reflectance x 1e4, bands B02 B03 B04 B08).
_ROOF_MATERIALS = np.array(
    [
        [1050, 1200, 1650, 1950],  # red clay tiles
        [1450, 1500, 1560, 1850],  # grey concrete / fibre cement
        [1000, 1080, 1150, 1450],  # dark tiles / slate / bitumen
        [1900, 2000, 2080, 2350],  # metal sheet (industrial)
        [2500, 2600, 2650, 2800],  # white membrane (industrial, commercial)
    ],
    dtype=np.float32,
)


# material probabilities: residential centre, other residential, industrial
_MATERIAL_P = {
    "centre": np.array([0.30, 0.45, 0.25, 0.0, 0.0]),
    "residential": np.array([0.50, 0.30, 0.20, 0.0, 0.0]),
    "industrial": np.array([0.0, 0.35, 0.10, 0.40, 0.15]),
}


_ASPHALT = np.array([900, 1000, 1100, 1350], dtype=np.float32)


_PAVED = np.array([1250, 1350, 1450, 1750], dtype=np.float32)


_WATER = np.array([550, 620, 420, 140], dtype=np.float32)


_SOIL = np.array([1000, 1300, 1650, 2250], dtype=np.float32)


_DRY_GRASS = np.array([800, 1050, 1250, 2300], dtype=np.float32)


_GREEN_HERB = np.array([320, 620, 400, 3500], dtype=np.float32)


_DECID_GREEN = np.array([260, 500, 300, 3200], dtype=np.float32)


_DECID_BARE = np.array([600, 720, 820, 1750], dtype=np.float32)


_CONIFER = np.array([220, 400, 260, 2200], dtype=np.float32)


_SEASON_LIGHT = {"spring": 1.0, "summer": 1.04, "autumn": 0.95, "winter": 0.86}


# Herbaceous cover types of the vegetated ground and their greenness per season.
HERB_LAWN, HERB_WINTER_CEREAL, HERB_MAIZE, HERB_RAPESEED, HERB_MEADOW = 0, 1, 2, 3, 4


_GREENNESS = {  # spring, summer, autumn, winter
    HERB_LAWN: (0.75, 0.85, 0.70, 0.40),
    HERB_WINTER_CEREAL: (0.80, 0.20, 0.05, 0.20),
    HERB_MAIZE: (0.03, 0.95, 0.35, 0.00),
    HERB_RAPESEED: (0.85, 0.25, 0.35, 0.30),
    HERB_MEADOW: (0.70, 0.90, 0.70, 0.35),
}


_DECID_GREENNESS = (0.65, 1.0, 0.6, 0.05)


# Backscatter (dB): VV, VH per surface; seasonal terms where it matters.
_S1_ASPHALT = (-15.0, -23.5)


_S1_PAVED = (-13.0, -21.0)


_S1_WATER_VV = {"spring": -19.5, "summer": -22.0, "autumn": -19.0, "winter": -18.5}


_S1_WATER_VH = -27.5


_S1_SOIL_VV = {"spring": -11.5, "summer": -13.0, "autumn": -11.0, "winter": -10.0}


_S1_SOIL_VH = -20.0


_S1_HERB = (-10.0, -16.5)


_S1_TREE = (-7.8, -13.5)


_S1_TREE_BARE = (-9.0, -15.0)


_S1_LOOKS = 10.0  # equivalent number of looks of a seasonal mean composite


def _transform(size_factor: float = 1.0):
    """Affine transform of the 10 m grid (``size_factor=10``: the aligned 1 ha grid)."""
    from affine import Affine

    res = PIXEL_SIZE * size_factor
    return Affine(res, 0.0, ORIGIN_X, 0.0, -res, ORIGIN_Y)
