"""Custom code of the MRI-TRUS registration bundle: everything the configs import that MONAI lacks."""
