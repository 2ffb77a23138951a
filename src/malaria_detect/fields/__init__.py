"""Whole fields: segmentation, cell crops, the analysis of a field, its CSV and overlay. No torch."""

