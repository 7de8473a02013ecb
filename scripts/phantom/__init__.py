"""The synthetic MR–TRUS phantom: anatomy, appearance, known transform, ideal fits, previews."""
