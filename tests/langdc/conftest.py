import pytest

from tokenreduce.testing.tiny import tiny_model

from .helpers import fit_tiny_captioner


class TinySetups:
    """Per family, lazily: a tiny random VLM and a captioner fitted to its default video batch."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def __call__(self, family: str):
        if family not in self.cache:
            model = tiny_model(family)
            path = self.root / f"captioner-{family}"
            captioner = fit_tiny_captioner(path, family, model)
            self.cache[family] = (model, str(path), captioner)
        return self.cache[family]


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    return TinySetups(tmp_path_factory.mktemp("langdc"))
