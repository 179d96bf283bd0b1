"""Property: however a recipe is broken, validation gives one line naming a key, never a
traceback."""

from __future__ import annotations

import copy
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowqk.config import RecipeError, build_recipe, load_recipe_dict

BASE, _ = load_recipe_dict("tiny/gpt")


def _paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(BASE) + [
    ("model", "extra"),
    ("qk", "layers", "bogus"),
    ("nonsense",),
    ("qk", "a:b\nc'd"),
]
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


# derandomize: CI runs the same 300 examples every time (a failure reproduces)
@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(st.tuples(st.sampled_from(PATHS), junk), min_size=1, max_size=4))
def test_random_bad_recipes_give_one_line_naming_a_key(mutations) -> None:
    data = copy.deepcopy(BASE)
    for path, value in mutations:
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    try:
        build_recipe(data, "r.yaml")
    except RecipeError as exc:
        msg = str(exc)
        assert "\n" not in msg and "Traceback" not in msg
        assert re.search(r"key ('.*'|\".*\")", msg), msg
