"""The demo accounts printed by `make run` must sign in through the real form."""

from __future__ import annotations

import pytest

from webapp.seed import DEMO_ACCOUNTS, seed


@pytest.mark.parametrize("label, email, role", DEMO_ACCOUNTS)
def test_each_demo_account_signs_in_with_its_printed_password(app, client, label, email, role):
    with app.extensions["db_sessionmaker"].begin() as s:
        created = seed(s, password_factory=lambda: "purple tractor on the moon")
    printed = {e: p for _, e, p in created["accounts"]}
    resp = client.post("/auth/sign-in", data={"email": email, "password": printed[email]})
    assert resp.status_code == 302, resp.get_data(as_text=True)[:500]
    assert client.get("/account/").status_code == 200
