"""Training recipes of the synthetic benchmark's tiny VLMs (``python -m research.synthetic.train``)."""
