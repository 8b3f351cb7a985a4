"""The shape every API error must have (RFC 9457 problem+json with our stable code)."""

from __future__ import annotations

PROBLEM_KEYS = {"type", "title", "status", "code", "detail"}


def assert_problem(resp, status: int, code: str) -> dict:
    """``resp`` is an RFC 9457 problem document with ``status`` and ``code``; return its body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json(force=True)
    assert PROBLEM_KEYS <= body.keys(), body
    assert body["status"] == status and body["code"] == code, body
    assert body["type"].endswith("/" + code)
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body
