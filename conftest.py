"""Fixtures shared by the test files."""
import pytest

import synthetic


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """A demo-kind set of 6 + 3 images of 96 × 64, made once per test session."""
    return synthetic.make_demo(tmp_path_factory.mktemp("tiny_demo"), n_train=6, n_val=3, image_size=(96, 64), seed=3)
