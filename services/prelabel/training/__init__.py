"""Transfer learning: four strategies, an automatic choice among them, calibration, publishing."""
