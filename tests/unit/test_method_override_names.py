"""Which methods a request names for a backend to route it as (``method_overrides``)."""

from __future__ import annotations

import pytest

from gateway.web.method_override import method_overrides


@pytest.mark.parametrize(
    "query",
    [
        "_method=GET",
        "a=1&_METHOD=get",
        "%5Fmethod=GET",
        # PHP's variable names (Laravel, Symfony): '.', ' ' and '[' become '_', leading
        # spaces go.
        ".method=GET",
        "%2Emethod=GET",
        "[method=GET",
        " _method=GET",
        "+_method=GET",
    ],
)
def test_a_query_parameter_any_backend_reads_as_method_names_one(query: str) -> None:
    assert method_overrides((), query) == ("GET",)


@pytest.mark.parametrize(
    "query", ["method=GET", "x_method=GET", "_methods=GET", "_method[]=GET", "_method=", ""]
)
def test_other_parameters_name_none(query: str) -> None:
    assert method_overrides((), query) == ()


def test_headers_and_query_together_name_each_method_once() -> None:
    assert method_overrides(("delete, GET",), "_method=get&.method=PUT") == ("DELETE", "GET", "PUT")
