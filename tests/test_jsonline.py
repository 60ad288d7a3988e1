import json
import math

from sponge.report.jsonline import json_line


def test_non_finite_numbers_become_null_and_the_line_is_strict_json() -> None:
    line = json_line({"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2, "x")})
    assert "\n" not in line and "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"]}
