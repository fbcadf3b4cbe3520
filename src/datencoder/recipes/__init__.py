"""Command recipes: configuration, I/O, logging and progress wired around the library.

The library (everything in ``datencoder`` outside this package) never imports from here.
"""
