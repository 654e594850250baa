"""The synthetic VQA benchmark and the tiny VLMs trained on it: the project's own measuring instrument.

Three families, generated deterministically from a seed with train / validation / test splits:

* ``image``: shapes on textured backgrounds; colour, shape, count, presence, relative position questions;
* ``document``: 336-px pages, mostly margins, text lines and ruled grids, with a few boxes of glyphs;
* ``video``: 16 mostly static frames where a few objects move, change colour, appear or disappear.

Answers depend on a few regions (recorded in ``sample.meta["regions"]``), so most visual tokens are
irrelevant: a good selection keeps accuracy, a random one does not. Usage::

    from tokenreduce.eval.synthetic import load_synthetic, load_model, encode_batch, score
    from tokenreduce.eval.predict import predict

    samples = load_synthetic("image", "test", n=100)
    model, processor = load_model("image")
    print(score(samples, predict(model, processor, samples)))
"""

from .benchmark import (
    CATEGORIES,
    SPLIT_SIZES,
    SPLITS,
    category_of,
    iter_synthetic,
    load_synthetic,
    read_split,
    write_split,
)
from .models import KINDS, MODEL_NAMES, build_processor, build_tokenizer, model_dir
from .models import load as load_model
from .prompting import (
    PROMPT_TEMPLATE,
    encode,
    encode_batch,
    exact_match,
    normalize_answer,
    parse_answer,
    prompt,
    score,
)
from .vocab import COLOURS, SHAPES, vocabulary

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "KINDS",
    "MODEL_NAMES",
    "PROMPT_TEMPLATE",
    "SHAPES",
    "SPLITS",
    "SPLIT_SIZES",
    "build_processor",
    "build_tokenizer",
    "category_of",
    "encode",
    "encode_batch",
    "exact_match",
    "iter_synthetic",
    "load_model",
    "load_synthetic",
    "model_dir",
    "normalize_answer",
    "parse_answer",
    "prompt",
    "read_split",
    "score",
    "vocabulary",
    "write_split",
]
