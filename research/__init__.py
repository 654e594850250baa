"""Research code: how the shipped tiny models and trained modules were made, and the experiments behind the
README's numbers. Not part of the ``tokenreduce`` wheel; run from a checkout, e.g.
``python -m research.synthetic.train image``. Results: ``research/RESULTS.md``.
"""
