"""focusvlm.eval.instructions.check_all stays importable for old callers but says it is deprecated."""

import pytest

from focusvlm.eval.instructions import check, check_all


def test_check_all_warns_and_still_answers():
    with pytest.deprecated_call(match="check_all is deprecated"):
        got = check_all("punctuation:no_comma", "no commas here")
    assert got == {"strict": check("punctuation:no_comma", "no commas here"),
                   "loose": check("punctuation:no_comma", "no commas here", loose=True)} == {"strict": True,
                                                                                             "loose": True}
