"""Functions of the local lmms-eval task ``tokenreduce_synthetic_image_local`` (see its YAML)."""

from PIL import Image

from tokenreduce.eval.synthetic.prompting import exact_match


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
