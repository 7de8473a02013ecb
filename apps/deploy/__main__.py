"""Entry point of the packaged application (the packager runs the app folder's ``__main__.py``)."""

from app import main

main()
