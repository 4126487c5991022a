"""Sample-quality and representation evaluation: FID/sFID/IS/precision/recall, CKNNA."""
