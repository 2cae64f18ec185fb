"""Images in: datasets and image folders, their transforms, and the disjoint calibration/selection/test splits."""
