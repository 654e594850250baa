"""A small stand-in for mPLUG-DocOwl 1.5's remote code (same class names, attributes and shapes), used to
test the ``docowl`` adapter; loadable with ``trust_remote_code`` from a directory (see ``docowl_tiny.py``)."""
