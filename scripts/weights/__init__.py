"""Weight files: the SHA-256 manifest and the settings a trained model carries."""
