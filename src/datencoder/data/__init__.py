"""Training data sets (``datencoder data ...``): builders and their pure helpers."""
