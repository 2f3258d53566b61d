"""The Examples in public docstrings run and print what they claim."""

import doctest

import pytest

from fml import preprocessing
from fml.models import _cnn, _linear, _mlp, _rnn


@pytest.mark.parametrize("module", [_linear, _mlp, _cnn, _rnn, preprocessing])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
