"""Custom MONAI Label tasks of the MRI–TRUS registration app."""
