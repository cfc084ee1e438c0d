"""The access log's redaction of tokens in query strings."""

from nexus.api.access_log import redact


def test_a_token_in_the_query_is_redacted_and_the_rest_kept():
    assert redact("GET /ui/?token=nx_secret HTTP/1.1") == "GET /ui/?token=*** HTTP/1.1"
    assert redact("GET /ui/?a=1&token=nx_secret&b=2 HTTP/1.1") == "GET /ui/?a=1&token=***&b=2 HTTP/1.1"
    assert redact("token=nx_secret&wait=5") == "token=***&wait=5"
    assert redact("GET /api/v1/jobs?wait=5 HTTP/1.1") == "GET /api/v1/jobs?wait=5 HTTP/1.1"
    assert redact("GET /api/v1/jobs?mytoken=x HTTP/1.1") == "GET /api/v1/jobs?mytoken=x HTTP/1.1"
    assert redact(None) is None and redact("") == ""
