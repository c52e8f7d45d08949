"""Fixtures of the zero-shot tests (library and CLI): a text, two local lm-eval tasks from its held-out part, a tiny
model; import them into a test module to use them."""

import pytest

from tiny_io import zeroshot_inputs


@pytest.fixture(scope="module")
def zs_inputs(tmp_path_factory):
    return zeroshot_inputs(tmp_path_factory)


@pytest.fixture(scope="module")
def text_file(zs_inputs):
    return zs_inputs[0]


@pytest.fixture(scope="module")
def task_dir(zs_inputs):
    return zs_inputs[1]


@pytest.fixture(scope="module")
def model_dir(zs_inputs):
    return zs_inputs[2]
