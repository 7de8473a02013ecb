"""Geometry: frames and the network box, the ANTs rigid step, composed transforms and files, point mapping."""
