"""Evaluation: reconstruction R^2 per chain step and the scaling report (`evaluate`), deep-mutational-scanning
files and the ridge protocol (`dms`)."""
