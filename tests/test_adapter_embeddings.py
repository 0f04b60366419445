"""The embeddings protocol: request validation, the body sent upstream, the answer read back."""

from __future__ import annotations

import base64
import struct

import pytest

from gateway.adapters import embeddings, ir
from gateway.errors import InvalidRequest


def b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


@pytest.mark.parametrize(
    "value",
    ["hello", ["a", "b c"], [1, 2, 3], [[1, 2], [3]]],
    ids=["string", "strings", "tokens", "token-arrays"],
)
def test_every_input_form_is_accepted_as_sent(value):
    assert embeddings.parse_request({"model": "e", "input": value}) == {
        "model": "e",
        "input": value,
    }


def test_options_in_their_right_forms_pass():
    body = {"model": "e", "input": "x", "dimensions": 8, "encoding_format": "base64", "user": "u"}
    assert embeddings.parse_request(body) == {"model": "e", "input": "x"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ([], None, "must be a JSON object"),
        ({"input": "x"}, "model", "model is required"),
        ({"model": 3, "input": "x"}, "model", "non-empty string"),
        ({"model": "e"}, "input", "input is required"),
        ({"model": "e", "input": ""}, "input", "non-empty string"),
        ({"model": "e", "input": []}, "input", "non-empty"),
        ({"model": "e", "input": 5}, "input", "non-empty"),
        ({"model": "e", "input": ["a", ""]}, "input[1]", "non-empty string"),
        ({"model": "e", "input": ["a", 3]}, "input[1]", "token ids"),
        ({"model": "e", "input": [[1], []]}, "input[1]", "token ids"),
        ({"model": "e", "input": [[1], [-1]]}, "input[1][0]", "from 0 to 2147483647, not -1"),
        ({"model": "e", "input": [7, 2**31]}, "input[1]", "a token id from 0 to 2147483647"),
        ({"model": "e", "input": [[1], [5, True]]}, "input[1]", "token ids"),
        ({"model": "e", "input": "x", "dimensions": "8"}, "dimensions", "an integer"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions", "at least 1"),
        ({"model": "e", "input": "x", "encoding_format": "hex"}, "encoding_format", "'float'"),
        ({"model": "e", "input": "x", "user": 1}, "user", "a string"),
    ],
)
def test_invalid_requests_name_the_field(body, param, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        embeddings.parse_request(body)
    assert info.value.param == param


def test_upstream_body_is_the_clients_with_the_providers_model():
    body = {"model": "emb", "input": ["a"], "input_type": "query", "encoding_format": "base64"}
    assert embeddings.build_request(body, "text-embedding-3-small") == {
        **body,
        "model": "text-embedding-3-small",
    }


def test_answer_is_read_in_index_order_with_dimensions_and_tokens():
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.5, 0.25, 1.0]},
            {"object": "embedding", "index": 0, "embedding": b64([1.5, 2.0, -0.5])},
        ],
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    parsed = embeddings.parse_response(answer)
    assert parsed["dimensions"] == 3
    assert parsed["usage"] == ir.usage(input_tokens=7)
    assert embeddings.record_vectors(parsed["vectors"], 100) == [[1.5, 2.0, -0.5], [0.5, 0.25, 1.0]]


@pytest.mark.parametrize("usage", [None, {}, {"prompt_tokens": "7"}])
def test_unknown_token_counts_stay_unknown(usage):
    answer = {"data": [{"embedding": [0.5]}], "usage": usage}
    assert embeddings.parse_response(answer)["usage"]["input_tokens"] is None


@pytest.mark.parametrize(
    "answer",
    [[], {}, {"data": {}}, {"data": [1]}, {"data": [{"embedding": 3}]}, {"data": [{}]}],
)
def test_unusable_answers_are_refused(answer):
    with pytest.raises(ValueError, match="no data array"):
        embeddings.parse_response(answer)


@pytest.mark.parametrize("dims", [1, 2, 3, 4, 5, 1536])
def test_base64_dimensions_are_counted_without_decoding(dims):
    parsed = embeddings.parse_response({"data": [{"embedding": b64([0.5] * dims)}]})
    assert parsed["dimensions"] == dims


def test_record_keeps_whole_vectors_in_order_within_its_budget():
    vectors = [[1.0, 2.0], b64([3.0, 4.0]), [5.0, 6.0]]
    assert embeddings.record_vectors(vectors, 6) == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert embeddings.record_vectors(vectors, 5) == [[1.0, 2.0], [3.0, 4.0]]
    assert embeddings.record_vectors(vectors, 1) == []
    assert embeddings.record_vectors(vectors, 0) == []


def test_record_stops_at_a_vector_that_does_not_decode():
    vectors = [b64([1.0]), "not base64!", b64([2.0])]
    assert embeddings.record_vectors(vectors, 100) == [[1.0]]
    assert embeddings.record_vectors([base64.b64encode(b"\0\0\0").decode()], 100) == []
