"""Repository tools not shipped in the zoo package: the CLI, the demo, the packager, the exporter."""
