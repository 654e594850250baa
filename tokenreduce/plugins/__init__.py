"""Built-in methods, one folder each. Importing this package registers them; none imports an optional extra
at import time.

What a method needs trained for your own model is trained by the ``training`` module in its folder
(``python -m tokenreduce.plugins.<method>.training --help``):

* :mod:`tokenreduce.plugins.atp.training`: ATP's threshold heads (``tr.wrap(model, "atp", heads=DIR)``);
* :mod:`tokenreduce.plugins.vqtoken.training`: VQToken's VQ-attention (``attention=DIR``);
* :mod:`tokenreduce.plugins.langdc.training`: LangDC's captioner and post-projector (``captioner=DIR``);
* :mod:`tokenreduce.plugins.ares.training` and :mod:`tokenreduce.plugins.ares.grpo`: ARES's AEPO rewards
  and KL control in TRL's ``GRPOTrainer`` (the ``train`` extra).

How the shipped tiny models and modules were made, and the experiments behind the tables in README.md and docs/, are
research code outside the package (``research/`` in a checkout).
"""

from tokenreduce.plugins import ares, atp, baselines, doc_correlation, langdc, vqtoken  # noqa: F401
