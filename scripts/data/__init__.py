"""Data: μ-RegPro split lists, checked NIfTI reading and atomic writing, case folders, dictionary transforms."""
